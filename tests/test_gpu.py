"""CUDA paths: bf16 storage of frozen weights, bf16-mixed autocast, 4-bit QLoRA, CUDA peak memory.
Skipped without a GPU."""

import pytest
import torch

from snug.config import config_from_dict
from snug.train.loop import run_training

from test_train import tiny_run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_cuda_training_with_auto_precision(quant, tmp_path, tiny_llama):
    raw = tiny_run(
        tmp_path,
        tiny_llama,
        model={"name_or_path": str(tiny_llama), "quant": quant},
        train={"max_steps": 3, "eval_generate": 0},
    )
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    assert summary["precision"] in ("bf16-mixed", "fp16-mixed")
    assert summary["peak_memory"]["measured_bytes"] > 0
    assert summary["peak_memory"]["reserved_bytes"] >= summary["peak_memory"]["measured_bytes"]
