"""The Plan tab: a model, a GPU, a GPU count and a sequence length in; `snug plan --search
--json`'s plan out (snug/plan/report.py: make_plan, called in this process), as a table of
every candidate, a stacked bar of each one's memory against the card, and the recommendation
with its why; "Use this in Train" writes the chosen candidate's config under the root."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import gradio as gr
from matplotlib.figure import Figure

from snug.config import Config, save_config
from snug.core.sections import DataConfig
from snug.errors import UserError
from snug.plan.hardware import GIB, catalog_models, gpu_table
from snug.plan.report import data_naming_no_file, make_plan
from snug.plan.search import method_label
from snug.ui.safety import UiError, inside_root

COLUMNS = [
    "candidate",
    "method",
    "micro-batch",
    "memory options",
    "peak GiB",
    "reserved GiB",
    "fits",
    "step s",
    "tokens/s",
]
# the peak's parts (Simulation.breakdown), then what the device holds beyond the peak
PARTS = (
    "weights",
    "trainable",
    "gradients",
    "optimizer",
    "activations",
    "logits",
    "temporary",
    "overhead",
)
RESERVED = {"cuda_context": "CUDA context", "allocator": "allocator"}
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def local_models(root: Path) -> list[str]:
    """Model folders (a config.json) up to three levels under `root`, relative to it; a
    symlink that leads outside the root is left out."""
    found = []
    for pattern in ("*/config.json", "*/*/config.json", "*/*/*/config.json"):
        for path in sorted(root.glob(pattern)):
            try:
                inside_root(root, path.parent)
            except UiError:
                continue
            found.append(str(path.parent.relative_to(root)))
    return found


def model_name(root: Path, choice: str) -> str:
    """What `snug plan --model` is given for a choice: a catalog name as it is, else a model
    folder under the root."""
    choice = (choice or "").strip()
    if choice in catalog_models():
        return choice
    if not choice:
        raise UiError("choose a model: a catalog name or a model folder under the root.")
    folder = inside_root(root, choice)
    if not (folder / "config.json").is_file():
        raise UiError(
            f"{choice}: neither a bundled model (snug plan --list-models) nor a model folder "
            f"with a config.json under {root}."
        )
    return str(folder)


def plan_args(model: str, gpu: str, num_gpus: int, seq_len: int | None) -> argparse.Namespace:
    """The arguments `snug plan --search --json --model M --gpu G --num-gpus N --seq-len S`
    parses to (tests/test_ui.py holds them to the parser's)."""
    return argparse.Namespace(
        config=None,
        overrides=[],
        model=model,
        gpu=gpu,
        device=None,
        num_gpus=num_gpus,
        seq_len=seq_len,
        micro_batch=None,
        method=None,
        search=True,
        max_micro_batch=64,
        json=True,
        explain=False,
        write_config=None,
        list_models=False,
    )


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f}"


def memory_options(cfg: Config) -> str:
    m, d = cfg.memory, cfg.dist
    said = ["checkpointing" if m.grad_checkpointing else "no checkpointing"]
    said += ["activation offload"] * m.offload_activations + [
        "weights streamed"
    ] * m.offload_weights
    said += [m.optimizer] + ([f"{d.strategy} x{d.nproc}"] if d.processes > 1 else [])
    return ", ".join(said)


def table_rows(cands, result: dict) -> list[list]:
    """One row per candidate, from the plan's JSON (`result['candidates']`)."""
    rows = []
    for cand, c in zip(cands, result["candidates"], strict=True):
        step, speed = c["step_seconds"], c["tokens_per_second"]  # None: a size, no FLOP rate
        rows.append(
            [
                c["name"],
                method_label(cand.cfg),
                c["config"]["train"]["micro_batch"],
                memory_options(cand.cfg),
                _gib(c["peak_bytes"]),
                _gib(c["reserved_bytes"]),
                "error" if c["error"] else {True: "yes", False: "no", None: "—"}[c["fits"]],
                "—" if step is None else f"{step:.2f}",
                "—" if speed is None else f"{speed:,.0f}",
            ]
        )
    return rows


def memory_figure(result: dict) -> Figure:
    """Each candidate's peak by part, then what the device holds beyond it (hatched), stacked,
    against the card's usable memory (the dashed line)."""
    cands = [c for c in result["candidates"] if c["breakdown"] is not None][::-1]  # first on top
    fig = Figure(figsize=(9, 1.5 + 0.4 * max(len(cands), 1)), layout="constrained")
    ax = fig.add_subplot()
    names = [c["name"] for c in cands]
    left = [0.0] * len(cands)
    for key in (*PARTS, *RESERVED):
        if key in PARTS:
            widths = [c["breakdown"].get(key, 0) / GIB for c in cands]
        else:
            widths = [c["reserved_terms"].get(key, {}).get("bytes", 0) / GIB for c in cands]
        if any(widths):
            label, hatch = (RESERVED[key], "//") if key in RESERVED else (key, None)
            ax.barh(names, widths, left=left, label=label, hatch=hatch)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    device = result["device"]
    if device["memory_bytes"]:
        usable = device["memory_bytes"] / GIB
        ax.axvline(
            usable, color="black", linestyle="--", label=f"{device['name']}: {usable:.1f} GiB"
        )
    ax.set_xlabel("GiB per device")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    return fig


def write_config(root: Path, cfg: Config, name: str) -> str:
    """The candidate's config as configs/NAME.yaml under the root (never over a file); what
    was written, with the data keys still to fill in."""
    name = (name or "").strip()
    if not CONFIG_NAME.fullmatch(name):
        raise UiError(
            f"config name {name!r}: use letters, digits, '.', '_' and '-' (at most 64), "
            "starting with a letter or digit."
        )
    path = inside_root(root, Path("configs") / f"{name}.yaml")
    if path.exists():
        raise UiError(f"{path}: exists; name a new config so nothing is overwritten.")
    path.parent.mkdir(parents=True, exist_ok=True)
    unset = data_naming_no_file(cfg)
    save_config(cfg, path, {k: f"names no file: set it to {v}" for k, v in unset.items()})
    todo = "; ".join(f"set `{k}` there to {v}" for k, v in unset.items())
    return f"wrote `{path.relative_to(root)}`" + (f"; {todo}" if todo else "")


def run_plan(root: Path, model: str, gpu: str, num_gpus, seq_len):
    """The Plan button: the table, the figure, the verdict, the candidates to choose from and
    their configs (name -> Config, kept in the page's state)."""
    try:
        args = plan_args(
            model_name(root, model),
            (gpu or "").strip(),
            int(num_gpus or 1),
            int(seq_len) if seq_len else None,
        )
        planned = make_plan(args)
    except UserError as e:
        return [], None, f"**error:** {' '.join(str(e).split())}", gr.Dropdown(choices=[]), {}
    result = planned.result
    if planned.choice is not None:
        verdict = f"**recommended: {planned.choice.name}** — {planned.why}"
    else:
        verdict = f"**nothing fits:** {planned.why}"
        verdict += "".join(f"\n- {change.line()}" for change in planned.changes)
    head = (
        f"{len(planned.cands)} candidates for {result['model']} on {result['device']['name']}"
        f" x{result['device']['count']}, {result['seq_len']} tokens per sample "
        f"({result['seq_len_from']}), {result['precision']}; {result['calibration']}\n\n"
    )
    names = [c.name for c in planned.cands]
    chosen = planned.choice.name if planned.choice is not None else names[0] if names else None
    configs = {c.name: c.cfg for c in planned.cands if c.sim is not None}
    return (
        table_rows(planned.cands, result),
        memory_figure(result),
        head + verdict,
        gr.Dropdown(choices=list(configs), value=chosen if chosen in configs else None),
        configs,
    )


def use_in_train(root: Path, configs: dict, chosen: str | None, name: str) -> str:
    """The "Use this in Train" button."""
    if not chosen or chosen not in configs:
        return "**error:** plan first, then choose a candidate."
    try:
        return write_config(root, configs[chosen], name)
    except UserError as e:
        return f"**error:** {' '.join(str(e).split())}"


def chosen_row(event: gr.SelectData) -> str:
    """A click on a row of the table chooses its candidate."""
    return event.row_value[0]


def plan_tab(root: Path) -> None:
    """The tab's components and events, inside the page's `gr.Tab("Plan")`."""
    local = local_models(root)
    with gr.Row():
        model = gr.Dropdown(
            local + catalog_models(),
            value=local[0] if local else "Qwen/Qwen2.5-0.5B",
            allow_custom_value=True,
            label="model",
            info="a bundled model (snug plan --list-models) or a model folder under the root",
            elem_id="plan-model",
        )
        gpu = gr.Dropdown(
            [r["name"] for r in gpu_table()],
            value="24GiB",
            allow_custom_value=True,
            label="GPU",
            info="a card from the bundled table, or a size such as 16GiB",
            elem_id="plan-gpu",
        )
        num_gpus = gr.Number(1, precision=0, minimum=1, label="GPUs", elem_id="plan-gpus")
        seq_len = gr.Number(
            DataConfig().cutoff_len,
            precision=0,
            minimum=1,
            label="sequence length",
            info="tokens per sample (default: data.cutoff_len's)",
            elem_id="plan-seq-len",
        )
    plan = gr.Button("Plan", variant="primary", elem_id="plan-button")
    verdict = gr.Markdown(elem_id="plan-verdict")
    table = gr.Dataframe(
        headers=COLUMNS, interactive=False, wrap=True, label="candidates", elem_id="plan-table"
    )
    figure = gr.Plot(label="memory per device: the peak by part, then what is reserved beyond it")
    configs = gr.State({})
    with gr.Row():
        chosen = gr.Dropdown([], label="candidate", elem_id="plan-chosen")
        name = gr.Textbox("planned", label="config name (configs/NAME.yaml)", elem_id="plan-name")
        use = gr.Button("Use this in Train", elem_id="plan-use")
    written = gr.Markdown(elem_id="plan-written")
    plan.click(
        lambda *a: run_plan(root, *a),
        [model, gpu, num_gpus, seq_len],
        [table, figure, verdict, chosen, configs],
    )
    table.select(chosen_row, None, chosen)
    use.click(lambda *a: use_in_train(root, *a), [configs, chosen, name], written)
