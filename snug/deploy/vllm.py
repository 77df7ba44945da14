"""`snug serve --engine vllm`: the same endpoints from vLLM's own OpenAI server, started with
snug's choices and rules: the base as snug resolves it (a merged model, or the base the adapters'
runs trained), each adapter under its name, "base" for the base, the chat template the runs
trained with, and snug's defaults (loopback unless keyed, no CORS unless named).

vLLM does the serving (continuous batching, paged attention, multi-LoRA); snug only builds its
command line. vLLM serves LoRA adapters only (no DoRA, IA3 or prompt learning): others are
refused here, with the snug engine named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# --max-lora-rank values vLLM accepts (vllm/config/lora.py: MaxLoRARanks)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's tool parsers for the formats snug's built-in templates write (snug/deploy/toolcalls.py)
TOOL_PARSERS = {"qwen": "hermes", "llama3": "llama3_json", "mistral": "mistral"}


def vllm_command(args: argparse.Namespace, template_dir: Path) -> list[str]:
    """`vllm serve ...` for what --model and --adapter name (the key goes by environment)."""
    from snug.core.registry import get_method
    from snug.data.templates import BUILTIN
    from snug.deploy.merge import read_adapter_config
    from snug.deploy.session import (
        BASE,
        SessionError,
        parse_adapters,
        resolve_model,
        sources_of,
    )
    from snug.deploy.toolcalls import BY_TEMPLATE

    base = resolve_model(args.model, args.trust_remote_code) if args.model else None
    pairs = parse_adapters(args.adapter)
    sources = sources_of(pairs, base.name_or_path if base else None, args.trust_remote_code)
    if not sources and base is None:
        raise SessionError("name a model: --model BASE_OR_RUN and/or --adapter RUN_OR_DIR.")
    cfg = sources[0].cfg if sources else base.run_cfg
    model = sources[0].cfg.model.name_or_path if sources else base.name_or_path
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    command += ["--served-model-name", BASE, "--host", args.host, "--port", str(args.port)]
    command += ["--allowed-origins", json.dumps(args.cors_origin)]  # vLLM's default is ["*"]
    if args.dtype != "auto":
        command += ["--dtype", args.dtype]
    if args.trust_remote_code:
        command += ["--trust-remote-code"]
    if cfg is not None and cfg.model.quant in ("nf4", "fp4"):
        command += ["--quantization", "bitsandbytes"]  # a QLoRA run's base, as it trained
    if cfg is not None and cfg.model.quant == "int8":
        raise SessionError("vLLM does not load 8-bit bitsandbytes bases; use --engine snug.")
    ranks = []
    for (name, _), src in zip(pairs, sources, strict=True):
        config = read_adapter_config(src.adapter_dir)
        if get_method(src.method).tuner != "lora" or config.get("use_dora"):
            raise SessionError(
                f"--adapter {name}: vLLM serves LoRA adapters only, not {src.method}; use "
                "--engine snug."
            )
        ranks.append(int(config.get("r", 8)))
    if pairs:
        modules = [
            f"{name}={src.adapter_dir}" for (name, _), src in zip(pairs, sources, strict=True)
        ]
        rank = next((r for r in LORA_RANKS if r >= max(ranks)), max(ranks))
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(pairs))]
        command += ["--lora-modules", *modules]
    template = args.template or (cfg.data.template if cfg is not None else None)
    if template in BUILTIN:
        path = template_dir / f"{template}.jinja"
        path.write_text(BUILTIN[template], encoding="utf-8")
        command += ["--chat-template", str(path)]
    if BY_TEMPLATE.get(template) in TOOL_PARSERS:
        command += ["--enable-auto-tool-choice", "--tool-call-parser"]
        command += [TOOL_PARSERS[BY_TEMPLATE[template]]]
    return command


def serve_with_vllm(args: argparse.Namespace, key: str | None) -> int:
    """Run vLLM's server in the foreground (this process waits for it; Ctrl-C stops both)."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="snug-vllm-") as tmp:
        command = vllm_command(args, Path(tmp))
        env = dict(os.environ)
        if key is not None:
            env["VLLM_API_KEY"] = key  # not on the command line, where `ps` would show it
        print("snug serve: starting vLLM: " + " ".join(command), flush=True)
        return subprocess.call(command, env=env)
