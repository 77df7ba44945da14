"""snug/runtime/hub.py: a hub that does not answer is found out once, quickly, and said once; snug then
works offline instead of waiting on the hub (for ever, behind a proxy that never answers)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from snug.runtime import hub

from conftest import ROOT


@pytest.fixture
def silent_server():
    """A TCP port that takes connections (the kernel's backlog) and never answers, as a proxy
    or firewall that swallows requests."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


@pytest.fixture
def unasked(monkeypatch):
    """This process as a user's: HF_HUB_OFFLINE not set, the hub not asked yet."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_offline", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


def test_a_hub_that_never_answers_is_unreachable_within_the_timeout(silent_server):
    assert not hub.answers(silent_server, 0.2)


def test_offline_is_found_once_and_said_once_and_the_plan_goes_on(
    silent_server, unasked, monkeypatch, capsys
):
    from test_plan_search import replay_stand_in

    import snug.plan.search as search_module
    from snug.cli import main

    monkeypatch.setattr(unasked, "ENDPOINT", silent_server)
    monkeypatch.setattr(hub, "PROBE_S", 0.2)
    asked = []
    answers = hub.answers
    monkeypatch.setattr(hub, "answers", lambda *a: asked.append(a) or answers(*a))
    monkeypatch.setattr(search_module, "simulate", replay_stand_in)
    args = ["plan", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--method", "lora"]
    for _ in range(2):
        assert main([*args, "--seq-len", "32", "--json"]) == 0
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if "snug works offline" in line]
    assert len(asked) == 1 and len(said) == 1, err
    assert said[0].startswith(f"{silent_server} did not answer within 0.2 s")
    assert unasked.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert json.loads(out[: out.index("}\n{") + 1])["best"] == 0  # and it planned


def test_offline_set_by_the_user_is_obeyed_without_asking(unasked, monkeypatch):
    monkeypatch.setattr(hub, "answers", lambda *a: pytest.fail("asked the hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline(lambda line: pytest.fail(line))
    monkeypatch.setattr(hub, "_offline", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline(lambda line: pytest.fail(line))


def test_a_plan_behind_a_proxy_that_never_answers_does_not_wait_for_ever(silent_server):
    """A new `snug` process (its imports ask the hub, through bitsandbytes, on CPUs with
    AVX512-BF16) behind a proxy that takes connections and never answers: it used to wait
    there for ever."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "NO_PROXY")}
    env.update(HTTPS_PROXY=silent_server, HTTP_PROXY=silent_server, PYTHONPATH=str(ROOT))
    args = ["plan", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--method", "lora"]
    done = subprocess.run(
        [sys.executable, "-m", "snug.cli", *args, "--seq-len", "32", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["best"] == 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert sum("snug works offline" in line for line in lines) == 1, done.stderr
    assert not [line for line in lines if "WARNING" in line or "Retry" in line], done.stderr


def test_train_merge_and_the_session_commands_ask_once_too(unasked, monkeypatch, capsys, tmp_path):
    """`snug train` (after its config and paths are checked, before the imports that ask the
    hub), `snug merge` and the commands that open a session (chat, generate, eval) ask the hub
    once as plan does; each stops at its heavy work here (stood in), after the question."""
    import snug.deploy.args as session_args
    from snug.cli import main

    SESSION_KEYS = ("model", "adapter", "device", "dtype", "template", "trust_remote_code")

    asked = []
    monkeypatch.setattr(hub, "answers", lambda *a: asked.append(a) or False)

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    import snug.train.training

    monkeypatch.setattr(snug.train.training, "run_training", reached)
    config = str(ROOT / "examples/quickstart.yaml")
    with pytest.raises(Reached):
        main(["--debug", "train", config, f"output.dir={tmp_path / 'run'}"])
    assert len(asked) == 1

    def unasked_again() -> None:  # the answer is kept for the process, and its children
        monkeypatch.setattr(hub, "_offline", None)
        monkeypatch.delenv("HF_HUB_OFFLINE")

    unasked_again()
    monkeypatch.setattr("snug.deploy.merge.find_source", reached)
    with pytest.raises(Reached):
        main(["--debug", "merge", "--adapter", "runs/none", "--out", "none"])
    assert len(asked) == 2
    unasked_again()
    monkeypatch.setattr("snug.deploy.session.open_session", reached)
    with pytest.raises(Reached):
        session_args.open_from_args(
            argparse.Namespace(**dict.fromkeys((*SESSION_KEYS, "allow_other_base", "use")))
        )
    assert len(asked) == 3
    said = [line for line in capsys.readouterr().err.splitlines() if "works offline" in line]
    assert len(said) == 3


def test_a_name_lookup_that_never_answers_is_unreachable_within_the_timeout(monkeypatch):
    """huggingface_hub's client timeout does not cover the name lookup: a resolver that does not
    answer held the question 5 s a try; it is waited for the timeout at most."""
    import socket
    import time

    def slow_lookup(*args, **kwargs):
        time.sleep(3)
        raise socket.gaierror("no answer")

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    started = time.monotonic()
    assert not hub.answers("https://hub.invalid", 0.2)
    assert time.monotonic() - started < 2


def test_offline_is_read_as_huggingface_hub_reads_it(monkeypatch):
    """The first of HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE that is set decides, as in
    huggingface_hub.constants."""
    for hub_value, transformers_value, expected in [
        ("0", "1", False),
        (None, "1", True),
        ("yes", None, True),
        (None, None, None),
        ("", "1", True),
    ]:
        for key, value in (
            ("HF_HUB_OFFLINE", hub_value),
            ("TRANSFORMERS_OFFLINE", transformers_value),
        ):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        assert hub._set_by_user() is expected, (hub_value, transformers_value)
