"""Shared fixtures: tiny models of several families, built from configs, and small data."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

# Under pytest-xdist each worker gets one core's worth of threads (its snug subprocesses too):
# two workers with two threads each would fight over this machine's two cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # and a search plans its methods in this process: the workers already use every core, and
    # worker processes of its own would each warm the fake-tensor cache again
    os.environ.setdefault("SNUG_PLAN_WORKERS", "1")
# The suite runs offline: snug's question to the hub (snug/runtime/hub.py) is answered by the environment,
# as a user's HF_HUB_OFFLINE answers it (tests/test_hub.py asks the question itself).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A user's `snug calibrate` entries must not change what the tests' plans predict: they plan
# with the typical values unless a test names its own calibration file.
os.environ["SNUG_CALIBRATION"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"snug-tests-no-calibration-{os.getpid()}.json"
)

import pytest  # noqa: E402

# torch and transformers are imported where used: pytest-xdist's controlling process loads this
# file too, and runs no test (3 s of imports at the suite's start, and their teardown at its end)
if "PYTEST_XDIST_WORKER" in os.environ:
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TINY_BASE = ROOT / "models/tiny"

FAMILY_KWARGS = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": None},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 8},
}


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_BASE)


def make_tiny_model(
    family: str, path: Path, tokenizer, seed: int = 0, initializer_range: float = 0.2
) -> Path:
    """A randomly initialised 2-layer model of `family`, saved with the bundled tokenizer.
    Weights 10x transformers' default spread (0.2) so that small tests learn in few steps."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **FAMILY_KWARGS[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), tokenizer)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_sft(tmp_path) -> Path:
    """A learnable toy: every answer is the first word of the input."""
    words = "red blue green cat dog sun moon tree".split()
    rows = [
        {"instruction": "Give the first word.", "input": f"{a} {b}", "output": a}
        for a in words
        for b in words
    ]
    return write_jsonl(tmp_path / "toy.jsonl", rows)


def cpu_opts(**changes):
    """Step options for fp32 CPU tests; defaults: no clipping, plain loss, no offload."""
    from snug.train.step import StepOptions

    base = {
        "device_type": "cpu",
        "autocast_dtype": None,
        "max_grad_norm": 0.0,
        "chunked_loss": False,
        "offload_activations": False,
    }
    return StepOptions(**{**base, **changes})


def method_keys(name: str, /, **keys):
    """The keys among `keys` that method `name` declares (snug/methods/: each method has its
    own), for tests that give one set of settings to every method."""
    from snug.core.registry import methods

    settings = methods()[name].settings
    declared = {f.name for f in dataclasses.fields(settings)} if settings else set()
    return {k: v for k, v in keys.items() if k in declared}


# The longest files first (measured: `pytest --durations=0`, summed per file). `make test` runs
# pytest-xdist with --dist loadfile, which gives each file whole to one worker (so module
# fixtures are made once) in this order as workers free up: longest first keeps the two
# workers' loads even. Order within a file is kept.
LONGEST_FIRST = (  # summed seconds a file took in `make test` (2-core Xeon with AVX-512, 2026-12-08: 9 min 2 s)
    "test_plan.py",  # 126
    "test_dist.py",  # 108
    "test_train.py",  # 90
    "test_ui.py",  # new: ~70 alone, the search of the browser test
    "test_reliability.py",  # 68
    "test_gpu_kit.py",  # 129 then; its dry run's calibrate without the wide steps: 103 -> 45 alone
    "test_readme_commands.py",  # 50
    "test_preference.py",  # 50
    "test_calibrate.py",  # 46
    "test_plan_search.py",  # 41
    "test_plan_cheapest.py",  # 57 then; two searches of three: 58 -> 33 alone
    "test_dist_plan.py",  # 32
    "test_template_bombs.py",  # 29
    "test_dist_signals.py",  # 28
    "test_serve.py",  # new: ~20 alone
    "test_hostile.py",  # 23
    "test_streaming.py",  # 21
    "test_methods.py",  # 19
    "test_plan_benchmark.py",  # 15
    "test_data_fuzz.py",  # 13
    "test_hub.py",  # 10
    "test_step.py",  # 10
    "test_extending.py",  # 9
    "test_generate.py",  # 9
    "test_keep_best.py",  # 8
    "test_output_dir.py",  # 7
    "test_llamafactory.py",  # 5
    "test_memory.py",  # 5
)


# The tests a full run timed at 0.5 s or more (scripts/slow_tests.py writes the list): marked
# slow, so that `make test-fast` leaves them out.
SLOW = {
    line.strip()
    for line in (Path(__file__).parent / "slow.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
