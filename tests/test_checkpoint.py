import numpy as np
import torch
from torch import nn

from snug.train.checkpoint import COMPLETE, complete_checkpoints, save_checkpoint
from snug.train.statefile import load_state


def tiny_state():
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_only_complete_checkpoints_count_and_prune_keeps_newest(tmp_path):
    model, opt, sched = tiny_state()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep_last=2)
    (tmp_path / "step-9").mkdir()  # half-written by a crash: no marker
    (tmp_path / ".tmp-step-4").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-2", "step-3"]
    save_checkpoint(tmp_path, 4, model, opt, sched, {"step": 4}, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-3", "step-4"]
    assert not (tmp_path / ".tmp-step-4").exists()
    assert all(
        (p / COMPLETE).exists() and (p / "trainable.safetensors").exists()
        for p in complete_checkpoints(tmp_path)
    )


def test_saving_the_same_step_again_replaces_it_whole(tmp_path):
    model, opt, sched = tiny_state()
    save_checkpoint(tmp_path, 5, model, opt, sched, {"step": 5}, keep_last=2)
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(tmp_path, 5, model, opt, sched, {"step": 5}, keep_last=2)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "step-5/trainable.safetensors")
    assert torch.equal(saved["weight"], model.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]
    state = load_state(tmp_path / "step-5/state")
    assert state["train_state"] == {"step": 5}
    name, keys, pos, _, _ = state["rng"]["numpy"]
    now = np.random.get_state()  # nothing drew from numpy since the save
    assert (
        name == now[0] and np.array_equal(keys.numpy().astype(np.uint32), now[1]) and pos == now[2]
    )


def test_recover_brings_back_a_checkpoint_moved_aside_and_cleans_the_rest(tmp_path):
    import os

    from snug.train.outputs import recover

    model, opt, sched = tiny_state()
    save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2}, keep_last=3)
    save_checkpoint(tmp_path, 3, model, opt, sched, {"step": 3}, keep_last=3)
    # a kill between "move step-3 aside" and "rename the new step-3 into place"
    os.replace(tmp_path / "step-3", tmp_path / ".old-step-3")
    (tmp_path / ".tmp-step-3").mkdir()
    (tmp_path / "step-4").mkdir()  # no marker
    assert recover(tmp_path) == tmp_path / "step-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
