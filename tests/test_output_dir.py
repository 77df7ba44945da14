"""Nothing lost in output.dir (issue 33): the earlier run's outputs wait in `previous/` until a
new run completes; a take-over cut short by a kill is undone; two runs never share a folder (an
OS lock, taken before anything loads); a full disk is one line naming the folder and the bytes
needed, with no temporaries left; a read-only folder is refused before anything loads.
(Links inside a run folder and a finished run of another config: tests/test_hostile.py.)"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_bombs import deadline

from snug.cli import main
from snug.train import run as loop_run

from conftest import ROOT

RUN_OUTPUTS = ("adapter", "loss.png", "summary.json", "config.yaml", "checkpoints", "metrics.jsonl")


def config(out: Path, model: Path, data: Path, tmp_path: Path, **sections) -> Path:
    raw = {
        "model": {"name_or_path": str(model)},
        "method": {"name": "lora", "r": 2},
        "data": {"train": str(data), "cutoff_len": 32, "max_samples": 16},
        "train": {
            "max_steps": 2,
            "micro_batch": 4,
            "grad_accum": 1,
            "eval_generate": 0,
            "log_every": 1,
        },
        "memory": {"grad_checkpointing": False},
        "output": {"dir": str(out), "save_every": 1},
    }
    for section, values in sections.items():
        raw[section].update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def snapshot(root: Path, names=RUN_OUTPUTS) -> dict[str, str]:
    """sha256 of every file under `root`'s entries `names`."""
    files = [p for name in names for p in [root / name, *(root / name).rglob("*")]]
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(files)
        if p.is_file()
    }


def temporaries(root: Path) -> list[str]:
    """Hidden files and folders snug writes aside (`.X.tmp-PID`, `.tmp-step-N`, ...)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob(".*")
        if ".tmp" in p.name or ".old" in p.name or "incomplete" in p.name
    )


def run_snug(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    os.environ["COLUMNS"] = "400"  # rich wraps long lines of a non-terminal at 80 columns
    try:
        code = main([str(a) for a in argv])
    finally:
        del os.environ["COLUMNS"]
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "unexpected" not in lines[0], lines[0]
    return " ".join(lines[0].split())


# -- 1: the earlier run's outputs survive until the new run's are in place ------------------------
@pytest.fixture
def break_step(monkeypatch):
    """break_step(at, how): the at-th call of the step from now raises (how='fail'), sends
    this process SIGTERM (how='stop': the run saves after that step and stops, as on a kill)
    or is interrupted as by a second Ctrl-C (how='interrupt': the run stops, saving nothing)."""
    real = loop_run.train_step

    def arm(at: int, how: str) -> None:
        calls = []

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == at and how == "fail":
                raise RuntimeError("the step broke")
            if len(calls) == at and how == "stop":
                os.kill(os.getpid(), signal.SIGTERM)
            if len(calls) == at and how == "interrupt":  # a second Ctrl-C: no checkpoint
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(loop_run, "train_step", step)

    yield arm
    monkeypatch.setattr(loop_run, "train_step", real)


def test_the_earlier_run_waits_in_previous_until_a_new_run_completes(
    tmp_path, tiny_llama, toy_sft, break_step, capsys
):
    """A finished run; a new --fresh run stopped after its step 2 (SIGTERM), then resumed and
    broken in its step 4: the finished run's outputs stay byte-identical in previous/, and each
    attempt says where they are. A run that completes deletes previous/."""
    out = tmp_path / "run"
    cfg = config(out, tiny_llama, toy_sft, tmp_path)
    assert run_snug(["train", cfg], capsys)[0] == 0
    earlier = snapshot(out)
    assert {"adapter/adapter_model.safetensors", "checkpoints/step-2/COMPLETE"} <= set(earlier)
    where = f"the earlier run's outputs are in {out}/previous until a run here completes"

    break_step(2, "stop")
    code, said, err = run_snug(["train", cfg, "train.max_steps=3", "--fresh"], capsys)
    assert code == 75, err
    assert where in " ".join(said.split())
    assert snapshot(out / "previous") == earlier
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["previous"] == str(out / "previous")

    break_step(2, "fail")  # the resumed run breaks in its second step (step 4)
    code, said, err = run_snug(["train", cfg, "train.max_steps=4"], capsys)
    assert code == 1 and "the step broke" in err
    assert "resuming from" in said and where in " ".join(said.split())
    assert snapshot(out / "previous") == earlier  # the completed run's, not the stopped one's

    break_step(0, "none")
    code, said, err = run_snug(["train", cfg, "train.max_steps=4"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert not (out / "previous").exists()
    assert temporaries(out) == []


def test_a_finished_run_waiting_in_previous_is_not_replaced_by_another_config(
    tmp_path, tiny_llama, toy_sft, break_step, capsys
):
    """A completed (no checkpoint); B, its continuation, takes the folder over (A's outputs go
    to previous/) and is interrupted after its first step (Ctrl-C: summary `interrupted`; or
    killed: no summary at all); C, of another config, is refused naming the finished run in
    previous/ (it used to train, and A was deleted once C completed). The same config as A
    trains, completes and replaces it, as on a finished run in place."""
    out = tmp_path / "run"
    cfg = config(out, tiny_llama, toy_sft, tmp_path, output={"save_every": None})
    assert run_snug(["train", cfg], capsys)[0] == 0
    earlier = snapshot(out)
    break_step(2, "interrupt")
    assert run_snug(["train", cfg, "train.max_steps=3"], capsys)[0] == 130
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert snapshot(out / "previous") == earlier
    break_step(0, "none")
    for killed in (False, True):
        if killed:  # a kill -9 writes no summary
            (out / "summary.json").unlink()
        before = snapshot(out, (*RUN_OUTPUTS, "previous"))
        code, said, err = run_snug(["train", cfg, "train.seed=7"], capsys)
        assert code == 2 and said == "", (said, err)
        assert one_line(err) == (
            f"error: {out} holds a finished sft run of {tiny_llama} (in {out}/previous, until a "
            "run here completes) that differs from this one (train.seed: 42 -> 7); use another "
            "output.dir, or --fresh to replace it."
        )
        assert snapshot(out, (*RUN_OUTPUTS, "previous")) == before
    code, said, err = run_snug(["train", cfg], capsys)
    assert code == 0, err
    assert not (out / "previous").exists()


def _fake_finished_run(out: Path, tag: str) -> None:
    (out / "adapter").mkdir(parents=True)
    (out / "adapter/adapter_model.safetensors").write_text(tag)
    (out / "summary.json").write_text(json.dumps({"status": "completed", "tag": tag}))
    (out / "loss.png").write_text(tag)
    (out / "config.yaml").write_text(f"# {tag}\n")
    (out / ".snug-run").touch()


def test_a_take_over_cut_short_is_undone_and_a_completed_runs_leftover_previous_goes(tmp_path):
    """A kill between the renames that move the earlier outputs aside: the next run puts them
    back before it reads the folder. A kill after a run completed but before it deleted
    previous/: that previous/ is older than the completed run, which is what moves aside."""
    from snug.config import config_from_dict
    from snug.train.outputs import commit, restore_cut_take_over

    out = tmp_path / "run"
    _fake_finished_run(out, "A")
    before = snapshot(out)
    staging = out / ".previous-incomplete"  # what commit fills, then renames to previous/
    staging.mkdir()
    for name in ("summary.json", "adapter"):
        os.replace(out / name, staging / name)
    restore_cut_take_over(out)
    assert snapshot(out) == before and not staging.exists()

    (out / "previous").mkdir()
    (out / "previous/summary.json").write_text("older than A")
    cfg = config_from_dict({"output": {"dir": str(out)}})
    commit(cfg, resuming=False)
    assert snapshot(out / "previous") == before
    assert {p.name for p in out.iterdir()} == {".snug-run", "config.yaml", "previous"}


def test_a_peer_that_dies_at_the_take_over_leaves_rank_0_writing_its_summary(tmp_path, monkeypatch):
    """Rank 0 has taken the folder over (the earlier outputs moved to previous/, config.yaml
    written) when the barrier after it fails (another rank died): the run counts as taken
    over, so summary.json is written (before, nothing said why the folder had changed)."""
    from types import SimpleNamespace

    from snug.config import config_from_dict
    from snug.train import dist, training

    out = tmp_path / "run"
    _fake_finished_run(out, "A")
    cfg = config_from_dict({"output": {"dir": str(out)}})
    run = SimpleNamespace(cfg=cfg, pos=SimpleNamespace(step=0))

    def peer_died() -> None:
        raise RuntimeError("a peer rank died")

    monkeypatch.setattr(dist, "barrier", peer_died)
    take_over = training.TakeOver(run, dist.Dist(), out, None, None, {})
    with pytest.raises(RuntimeError):
        take_over()
    assert take_over.done and (out / "previous/summary.json").is_file()


# -- 2: one run per folder ----------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from snug.train.lock import lock_output_dir
with lock_output_dir(Path(sys.argv[1]), "snug train first.yaml"):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path, capsys):
    """Another process holds output.dir's lock: `snug train` into it (one process, or the
    torchrun launcher of dist.nproc=2) is refused in one line naming that process, before
    anything loads, and writes nothing. Killed with SIGKILL, the holder leaves no lock."""
    from snug.config import load_config
    from snug.train.lock import LOCK_FILE, lock_output_dir
    from snug.train.outputs import check_output_dir

    out = tmp_path / "race"
    cfg = config(out, ROOT / "models/tiny", ROOT / "data/instruct/train.jsonl", tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["dist.strategy=ddp", "dist.nproc=2"]):
            code, said, err = run_snug(["train", cfg, *extra], capsys)
            assert code == 2 and said == "", (said, err)
            line = one_line(err)
            assert re.search(
                rf"output\.dir={re.escape(str(out))} is in use by another snug run \(pid "
                rf"{holder.pid} on {re.escape(socket.gethostname())}: snug train first\.yaml, "
                r"since [\d:T-]+\); wait for it to end, or choose another output\.dir\.$",
                line,
            ), line
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    # no stale lock after a crash, and a folder holding only the lock file is no foreign folder
    check_output_dir(load_config(cfg))
    with lock_output_dir(out, "snug train again.yaml"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_the_launcher_of_several_ranks_holds_the_lock_for_them(tmp_path, monkeypatch, capsys):
    """`snug train` with dist.nproc=2 takes output.dir's lock before it starts torchrun and
    holds it until torchrun has ended (it used to check only that the lock was free, so a
    second run could take the folder before rank 0 did); torchrun gets the locked descriptor
    (the lock outlives a killed launcher), and rank 0 only checks that its launcher holds it."""
    import threading

    from snug.train import dist
    from snug.train.lock import LOCK_FILE, OutputDirError, lock_output_dir

    out = tmp_path / "run"
    cfg = config(out, ROOT / "models/tiny", ROOT / "data/instruct/train.jsonl", tmp_path)
    seen = {}

    class Torchrun:  # what the launcher starts, as the ranks would find the folder
        pid = os.getpid()

        def __init__(self, cmd, env, pass_fds=(), **kwargs):
            seen["env"], seen["fds"] = env, pass_fds

        def wait(self):
            lock = out / LOCK_FILE
            assert lock.is_file()  # (before: only checked, not taken)
            from snug.runtime import lockfile
            from snug.train.lock import HANDED_ON

            with pytest.raises(lockfile.Busy) as busy:  # a second run: refused
                lockfile.take(lock)
            seen["holder"] = busy.value.holder
            (fd,) = seen["fds"]  # torchrun inherits the locked file itself
            seen["same"] = os.fstat(fd).st_ino == lock.stat().st_ino
            rank0 = []

            def rank(launcher: str, torchrun: bool) -> None:  # a thread: no lock of its own
                os.environ[HANDED_ON] = launcher
                if torchrun:
                    os.environ["LOCAL_RANK"] = "0"
                try:
                    with lock_output_dir(out):
                        rank0.append("checked")
                except OutputDirError as e:
                    rank0.append(str(e))
                finally:
                    del os.environ[HANDED_ON]
                    os.environ.pop("LOCAL_RANK", None)

            # the launcher's rank 0; one of another launcher; a process outside torchrun that
            # inherited the variable (from a rank): not a rank, so it takes the lock itself
            for launcher, torchrun in ((seen["env"][HANDED_ON], True), ("1", True), ("1", False)):
                worker = threading.Thread(target=rank, args=(launcher, torchrun))
                worker.start()
                worker.join()
            seen["rank0"] = rank0
            return 0

    monkeypatch.setattr(dist.subprocess, "Popen", Torchrun)
    code, said, err = run_snug(["train", cfg, "dist.strategy=ddp", "dist.nproc=2"], capsys)
    assert code == 0, err
    from snug.train.lock import HANDED_ON

    assert seen["env"][HANDED_ON] == str(os.getpid()) and seen["same"]
    assert seen["holder"].startswith(f"pid {os.getpid()} on {socket.gethostname()}: snug train")
    assert seen["rank0"][0] == "checked"
    assert seen["rank0"][1] == (
        f"output.dir={out}: the snug train that started this process (pid 1, {HANDED_ON}) "
        f"should hold its lock, but pid {os.getpid()} holds it; start the run with snug train."
    )
    assert "is in use by another snug run" in seen["rank0"][2]
    assert not out.exists()  # made for the lock, and nothing else put in it


def test_a_run_that_fails_before_taking_over_leaves_only_its_status(tmp_path, monkeypatch, capsys):
    """A run that stops before it took the folder over (here: a data file that is not JSON,
    found while tokenizing) leaves in the output.dir made for the lock only its status.json,
    saying failed with the line stderr says (train/status.py)."""
    import snug.train.training as training
    from snug.train.lock import LOCK_FILE

    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    out = tmp_path / "new" / "run"
    cfg = config(out, ROOT / "models/tiny", data, tmp_path)
    real, locked = training.build_run, []

    def build_run(*args, **kwargs):
        locked.append((out / LOCK_FILE).is_file())
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "build_run", build_run)
    code, said, err = run_snug(["train", cfg], capsys)
    assert code == 2 and "bad.jsonl line 2: not valid JSON" in one_line(err)
    assert locked == [True]
    assert sorted(p.name for p in out.iterdir()) == ["status.json"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["taken_over"] is False
    assert one_line(err) == f"error: {status['error'].split(': ', 1)[1]}"


def test_a_link_to_a_missing_folder_as_output_dir_is_one_line_at_once(tmp_path, capsys):
    """output.dir a link to a folder that does not exist, or below such a link: one line naming
    the link and its target, nothing made at its other end (it used to loop for ever at full
    CPU: mkdir met the link, the lock file's open met no folder, and round again)."""
    cfg = config(
        tmp_path / "dang", ROOT / "models/tiny", ROOT / "data/instruct/train.jsonl", tmp_path
    )
    (tmp_path / "dang").symlink_to(tmp_path / "x/nowhere/deeper")
    for out, where in ((tmp_path / "dang", "is"), (tmp_path / "dang/run", f": {tmp_path}/dang is")):
        with deadline(20):
            code, said, err = run_snug(["train", cfg, f"output.dir={out}"], capsys)
        assert code == 2 and said == "", (said, err)
        assert one_line(err) == (
            f"error: output.dir={out}{' ' if where == 'is' else ''}{where} a link to a missing "
            f"folder {tmp_path}/x/nowhere/deeper; make that folder, or choose another output.dir."
        )
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "dang"]


def test_every_retry_of_the_lock_is_bounded(tmp_path, monkeypatch):
    """The lock is retried when its folder went (another run's failed start removed it) or its
    file was replaced (its holder let go): a bounded number of times, then one line."""
    from snug.train import lock

    monkeypatch.setattr(lock, "_make", lambda out: [])  # the folder never comes back
    with deadline(20), pytest.raises(lock.OutputDirError, match="cannot take its lock"):
        with lock.lock_output_dir(tmp_path / "gone"):
            pass
    monkeypatch.undo()
    from snug.runtime import lockfile

    monkeypatch.setattr(lockfile, "_same_file", lambda fd, path: False, raising=False)
    with deadline(20), pytest.raises(lock.OutputDirError, match="cannot take its lock"):
        with lock.lock_output_dir(tmp_path / "replaced"):
            pass


# -- 4: a full disk ---------------------------------------------------------------------------
def _free_space(monkeypatch, free: int) -> None:
    """The file system reports `free` bytes available (os.statvfs, which shutil.disk_usage
    reads)."""
    real = os.statvfs

    def statvfs(path):
        s = real(path)
        fields = list(s)
        fields[4] = fields[3] = free // s.f_frsize  # f_bavail, f_bfree
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", statvfs)


def test_out_of_space_for_the_adapter_is_one_line_and_keeps_the_earlier_run(
    tmp_path, tiny_llama, toy_sft, monkeypatch, capsys
):
    out = tmp_path / "run"
    cfg = config(out, tiny_llama, toy_sft, tmp_path, output={"save_every": None})
    assert run_snug(["train", cfg], capsys)[0] == 0
    earlier = snapshot(out)
    _free_space(monkeypatch, 4096)
    code, said, err = run_snug(["train", cfg, "method.r=8", "--fresh"], capsys)
    monkeypatch.undo()
    assert code == 1
    line = one_line(err)
    needed = json.loads((out / "summary.json").read_text())["trainable_params"] * 4  # fp32
    assert re.search(
        rf"out of space: {re.escape(str(out))} needs {needed:,} bytes for adapter/ but its disk "
        r"has 4,096 free",
        line,
    ), line
    assert snapshot(out / "previous") == earlier
    assert temporaries(out) == []


def _safetensors_disk_full(*args, **kwargs):
    """What safetensors (Rust) raises when the disk fills: not an OSError."""
    from safetensors import SafetensorError

    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


def _os_disk_full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["checkpoint", "adapter"])
def test_a_write_that_runs_out_of_space_removes_its_temporaries(
    where, tmp_path, tiny_llama, toy_sft, monkeypatch, capsys
):
    """The space looked sufficient, then the write itself failed (another process filled the
    disk): one line naming the folder and the bytes needed, nothing half-written left."""
    import peft.peft_model

    import snug.train.checkpoint as ckpt

    out = tmp_path / "run"
    cfg = config(out, tiny_llama, toy_sft, tmp_path)
    assert run_snug(["train", cfg], capsys)[0] == 0
    earlier = snapshot(out)
    if where == "checkpoint":
        monkeypatch.setattr(ckpt, "save_file", _safetensors_disk_full)
        folder = rf"{re.escape(str(out))}/checkpoints needs [\d,]+ bytes for step-1"
    else:  # and summary.json cannot be written either: the adapter's error is the one said
        import snug.train.finish as finish

        monkeypatch.setattr(peft.peft_model, "safe_save_file", _safetensors_disk_full)
        monkeypatch.setattr(finish, "write_text_atomic", _os_disk_full)
        folder = rf"{re.escape(str(out))} needs [\d,]+ bytes for adapter/"
    code, said, err = run_snug(["train", cfg, "--fresh"], capsys)
    assert code == 1
    line = one_line(err)
    assert re.search(rf"out of space: {folder}.*No space left on device", line), line
    if where == "adapter":
        assert f"could not write {out}/summary.json (No space left on device)" in said, said
    assert snapshot(out / "previous") == earlier
    assert temporaries(out) == []


def test_any_other_write_that_runs_out_of_space_is_one_line_naming_the_file(monkeypatch, capsys):
    """A full disk in a write no check of snug's own covers: one line, the file and why (an
    OSError names its file; safetensors' error does not)."""
    import snug.train.command as command

    for error, said in (
        (OSError(errno.ENOSPC, "No space left on device", "/d/notes"), "/d/notes (No space left"),
        (RuntimeError("Error: IoError(No space left on device (os error 28))"), "a file (Error:"),
    ):

        def full(args, error=error):
            raise error

        monkeypatch.setattr(command, "cmd_train", full)
        code, _, err = run_snug(["train", "cfg.yaml"], capsys)
        assert code == 1
        line = one_line(err)
        assert line.startswith(f"error: out of space: could not write {said}"), line
        assert line.endswith("; free some space on that disk and run again."), line


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """A real tmpfs of `size` mounted at `path` (needs root), unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({done.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_for_real_on_a_tiny_tmpfs(tmp_path, tiny_llama, toy_sft, monkeypatch, capsys):
    """The issue's case on a real 256 KiB tmpfs: a run fits, then --fresh with a larger r does
    not: refused before the write (the adapter's bytes are known); with that check off, the
    file system's own ENOSPC from safetensors' writer is the same one line; the same for a
    checkpoint. Each time the earlier adapter stays (in previous/) and no temporary is left."""
    with tmpfs(tmp_path / "t", "256k") as disk:
        out = disk / "run"
        cfg = config(out, tiny_llama, toy_sft, tmp_path, output={"save_every": None})
        assert run_snug(["train", cfg], capsys)[0] == 0
        adapter = snapshot(out, ("adapter",))
        for check_first, extra in (
            (True, []),
            (False, []),
            (False, ["output.save_every=1"]),
        ):
            if not check_first:  # as if the disk filled between the check and the write
                _free_space(monkeypatch, 1 << 40)
            code, said, err = run_snug(["train", cfg, "method.r=64", "--fresh", *extra], capsys)
            assert code == 1, err
            line = one_line(err)
            assert re.search(rf"out of space: {re.escape(str(out))}\S* needs [\d,]+ bytes", line)
            assert check_first or "No space left on device" in line, line
            assert snapshot(out / "previous", ("adapter",)) == adapter
            assert temporaries(out) == []


# -- 9: a read-only output.dir ------------------------------------------------------------------
@contextlib.contextmanager
def read_only(path: Path):
    """`path` a folder nobody may write into: a read-only tmpfs for root (whom permissions do
    not stop), else mode 0555."""
    if os.geteuid() == 0:
        with tmpfs(path, "64k", "ro"):
            yield path
        return
    path.mkdir()
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def test_a_read_only_output_dir_is_refused_before_anything_loads(tmp_path, capsys):
    with read_only(tmp_path / "ro") as ro:
        for out in (ro, ro / "run"):
            cfg = config(out, ROOT / "models/tiny", ROOT / "data/instruct/train.jsonl", tmp_path)
            code, said, err = run_snug(["train", cfg], capsys)
            assert code == 2 and said == "", (said, err)
            line = one_line(err)
            assert re.search(
                rf"output\.dir={re.escape(str(out))}: cannot write into {re.escape(str(ro))} "
                r"\((Read-only file system|Permission denied)\); choose a folder you can write",
                line,
            ), line
