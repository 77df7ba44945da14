"""`snug chat`: driven through a pseudo-terminal as a person types, and its parts in-process."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import io
import os
import re
import select
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from forked import Forked
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from snug.cli import main
from snug.config import load_config, save_config
from snug.data.templates import BUILTIN
from snug.deploy.chat import AnswerPrinter, Sampling, chat_loop, reply, start_chat
from snug.deploy.session import open_session
from snug.methods import apply_method
from snug.models.load import load_model
from snug.train.evaluate import answer_text, end_of_turn, stop_token_ids
from snug.train.finish import save_final

try:  # pseudo-terminals are POSIX: elsewhere only the tests that type into one are skipped
    import fcntl
    import termios
except ImportError:
    fcntl = termios = None
needs_pty = pytest.mark.skipif(termios is None, reason="needs a POSIX pseudo-terminal")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models/tiny"  # a real (tiny) chat model: it answers in words
QUESTION = "What is the last word in the list small king uma lamp rain?"
GREEDY = ["--temperature", "0", "--max-new-tokens", "16"]


def lora_run(tmp_path: Path, name: str, seed: int, nudge: float = 0.05) -> Path:
    """A run directory as `snug train` leaves it, with a LoRA moved off its initial (no-op)
    values by a seeded nudge: 0.05 changes the tiny model's answers without garbling them."""
    cfg = load_config(None, [f"model.name_or_path={TINY}", "method.name=lora", "method.r=4"])
    torch.manual_seed(seed)  # LoRA's A starts random
    model = apply_method(load_model(cfg, torch.device("cpu"), "fp32"), cfg.method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(nudge * torch.randn_like(p))
    run = tmp_path / name
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_final(model, AutoTokenizer.from_pretrained(TINY), cfg, run)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("chat-runs")
    return {
        "first": lora_run(tmp, "first", 1),
        "second": lora_run(tmp, "second", 2),
        # nudged further: its answers ramble on to --max-new-tokens ("the the the ...")
        "rambling": lora_run(tmp, "rambling", 1, nudge=0.1),
    }


def greedy_answer(model, tok, question: str) -> str:
    """What the model answers, computed without snug's chat: plain transformers generate."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(
        input_ids=ids,
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=stop_token_ids(model, tok, tok.chat_template),
    )
    return answer_text(tok, out[0, ids.shape[1] :].tolist(), end_of_turn(tok, tok.chat_template))


class Terminal:
    """`snug chat` on a pseudo-terminal of its own: what a person types, what their screen
    shows. The process is forked with snug imported (tests/forked.py), in a session whose
    controlling terminal is that one. Every wait has a deadline, so a hang fails the test
    instead of blocking it."""

    def __init__(self, *args: str) -> None:
        self.fd, child = os.openpty()
        # 200 columns: readline scrolls a line sideways when it is wider than the screen
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        with contextlib.chdir(ROOT):
            self.proc = Forked(["chat", *args], terminal=os.ttyname(child), TERM="dumb")
        # kept open until the end: the forked process opens the terminal by its name, later
        self.child = child
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.screen, self.seen = "", 0

    def _read(self, deadline: float) -> bool:
        """Add what the program wrote to the screen (waiting a moment, at most until
        `deadline`); False once it has exited and nothing more is to be read."""
        wait = min(0.1, max(0.0, deadline - time.monotonic()))
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return self.proc.poll() is None
        data = os.read(self.fd, 4096)
        text = self.decoder.decode(data).replace("\r\n", "\n").replace("\r", "")
        self.screen += re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|[=>])", "", text)
        return True

    def expect(self, text: str, timeout: float = 60) -> str:
        """Wait until `text` shows; what showed since the last call, up to and including it."""
        deadline = time.monotonic() + timeout
        while text not in self.screen[self.seen :]:
            if time.monotonic() > deadline or not self._read(deadline):
                raise AssertionError(f"no {text!r} within {timeout} s; the screen:\n{self.screen}")
        end = self.screen.index(text, self.seen) + len(text)
        shown, self.seen = self.screen[self.seen : end], end
        return shown

    def expect_more(self, timeout: float = 30) -> str:
        """Wait until anything shows beyond what the last expect returned; all of it."""
        deadline = time.monotonic() + timeout
        while len(self.screen) == self.seen:
            if time.monotonic() > deadline or not self._read(deadline):
                raise AssertionError(f"nothing more within {timeout} s; the screen:\n{self.screen}")
        shown, self.seen = self.screen[self.seen :], len(self.screen)
        return shown

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def ask(self, line: str, prompt: str) -> str:
        """Type a line and Enter; what the program answers before it shows `prompt` again."""
        self.type(line + "\r")
        shown = self.expect(prompt)
        assert shown.startswith(line + "\n"), shown  # the echo of what was typed
        return shown[len(line) + 1 : -len(prompt)]

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline) and time.monotonic() < deadline:
            pass
        self.proc.communicate(max(0.1, deadline - time.monotonic()))
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.communicate()
        os.close(self.fd)
        os.close(self.child)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


@needs_pty
@pytest.mark.slow  # a real `snug chat` process in a pseudo-terminal
def test_chat_in_a_terminal_streams_each_adapters_answer_and_switches_by_name(runs, terminal):
    # it loads while the expected answers are computed here (2 cores)
    chat = terminal(
        *GREEDY, "--adapter", f"first={runs['first']}", "--adapter", str(runs["second"])
    )
    base = AutoModelForCausalLM.from_pretrained(TINY)
    tok = AutoTokenizer.from_pretrained(TINY)
    want = {"base": greedy_answer(base, tok, QUESTION)}
    for name in ("first", "second"):
        with_adapter = PeftModel.from_pretrained(base, f"{runs[name]}/adapter", adapter_name=name)
        want[name] = greedy_answer(with_adapter, tok, QUESTION)
        base = with_adapter.unload()  # the bare base again, for the next adapter
    assert len({a.strip() for a in want.values()}) == 3, want  # the comparison means something

    chat.expect("adapters: first, second; answering with first.")
    chat.expect("[first] you> ")
    assert chat.ask(QUESTION, "[first] you> ").strip() == want["first"].strip()

    shown = chat.ask("/use second", "[second] you> ")
    assert "now answering with second" in shown
    chat.ask("/reset", "[second] you> ")  # the same question, asked afresh
    assert chat.ask(QUESTION, "[second] you> ").strip() == want["second"].strip()

    chat.ask("/use base", "[base] you> ")
    chat.ask("/reset", "[base] you> ")
    assert chat.ask(QUESTION, "[base] you> ").strip() == want["base"].strip()

    assert chat.ask("/use nope", "[base] you> ").strip() == (
        "no adapter named 'nope'; loaded: base, first, second."
    )
    listed = chat.ask("/adapters", "[base] you> ").splitlines()
    assert listed[0].split() == [
        "*",
        "base",
        "the",
        "model",
        "without",
        "an",
        "adapter:",
        str(TINY),
    ]
    assert listed[1].split()[0] == "first" and listed[2].split()[0] == "second"
    unknown = chat.ask("/what", "[base] you> ").strip()
    assert unknown.count("\n") == 0 and unknown.startswith("unknown command /what; commands:")
    assert "/use NAME" in unknown and "/exit" in unknown
    chat.type("/exit\r")
    assert chat.exit_code() == 0


@needs_pty
@pytest.mark.slow  # a real `snug chat` process in a pseudo-terminal
def test_ctrl_c_stops_an_answer_and_ctrl_c_or_ctrl_d_at_the_prompt_leave(runs, terminal):
    rambling = terminal(
        "--temperature", "0", "--max-new-tokens", "480", "--adapter", str(runs["rambling"])
    )
    idle = terminal(*GREEDY, "--model", str(TINY))  # both load at once
    rambling.expect("[rambling] you> ")
    rambling.type("Tell me a story.\r")
    rambling.expect("Tell me a story.\n")
    rambling.expect_more()  # the answer has begun to stream
    rambling.type("\x03")
    stopped = rambling.expect("[rambling] you> ", timeout=10)
    assert "[stopped; this question is not kept]" in stopped
    rambling.type("\x04")
    assert rambling.exit_code() == 0

    idle.expect("[base] you> ")
    idle.type("\x03")
    assert idle.exit_code() == 0
    for chat in (rambling, idle):
        assert "Traceback" not in chat.screen and "interrupted" not in chat.screen


class Recorder(io.StringIO):
    """A stream that remembers each write; `stop_at` raises Ctrl-C's KeyboardInterrupt on that
    non-empty write, as if the key were pressed while the answer streams."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.stop_at = stop_at

    def write(self, text: str) -> int:
        self.writes.append(text)
        if self.stop_at is not None and len([w for w in self.writes if w.strip()]) == self.stop_at:
            raise KeyboardInterrupt
        return super().write(text)


@pytest.fixture(scope="module")
def session():
    return open_session(model=str(TINY), device="cpu")


def test_answer_streams_in_pieces_and_the_history_is_kept(session):
    chat = start_chat(session, Sampling(0.0, 1.0, 16))
    out = Recorder()
    answer = reply(chat, QUESTION, out)
    pieces = [w for w in out.writes if w.strip()]
    assert len(pieces) > 2  # written word by word as generated, not once at the end
    assert "".join(out.writes).strip() == answer
    assert chat.history == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": answer},
    ]
    # the next question is asked after the first exchange: it is in the prompt
    second = session.prompt_ids(chat.messages([*chat.history, {"role": "user", "content": "hi"}]))
    assert len(second) > len(session.prompt_ids([{"role": "user", "content": "hi"}])) + 10


def test_ctrl_c_while_answering_stops_that_answer_and_forgets_the_question(session):
    chat = start_chat(session, Sampling(0.0, 1.0, 16))
    out = Recorder(stop_at=2)
    assert reply(chat, QUESTION, out) is None
    assert "[stopped; this question is not kept]" in out.getvalue()
    assert chat.history == []
    assert reply(chat, QUESTION, Recorder())  # the chat goes on


def test_oldest_exchanges_are_dropped_to_fit_the_context_and_too_long_a_message_is_refused(
    session,
):
    context = session.model.config.max_position_embeddings
    one = len(session.prompt_ids([{"role": "user", "content": QUESTION}]))
    # room for the question once, not for it twice with an answer in between
    chat = start_chat(session, Sampling(0.0, 1.0, context - one - 12))
    out = Recorder()
    assert reply(chat, QUESTION, out) and len(chat.history) == 2
    assert reply(chat, QUESTION, out) and len(chat.history) == 2
    assert f"(forgot the oldest 1 exchange to stay within the model's {context}-token" in (
        out.getvalue()
    )
    assert reply(chat, QUESTION + " and" * 40, out) is None
    assert "Shorten it" in out.getvalue().splitlines()[-1]
    assert len(chat.history) == 2  # the refused message is not kept


def test_commands_and_end_of_input_without_a_terminal(session):
    chat = start_chat(session, Sampling(0.0, 1.0, 16))
    lines = ["/system Answer briefly.", "/help", "/use", "  ", "/reset"]
    systems = []

    def read(prompt: str) -> str:  # input() as a script feeds it: EOFError at the end
        assert prompt == "[base] you> "
        systems.append(chat.system)
        if not lines:
            raise EOFError
        return lines.pop(0)

    out = Recorder()
    assert chat_loop(chat, read, out) == 0
    assert systems == [None, *["Answer briefly."] * 5]  # /reset keeps the system prompt
    shown = out.getvalue()
    assert "system prompt set; conversation cleared" in shown
    assert "/use NAME, NAME one of: base" in shown and "/reset         clear" in shown
    assert "conversation cleared" in shown.splitlines()[-2]


def test_plain_text_end_of_turn_marker_is_never_shown(session):
    """A built-in template whose end marker is no token of the tokenizer (phi3's <|end|> on
    a ChatML tokenizer): generation stops at the text, and the text is held back while it may
    be the start of the marker."""
    phi3 = dataclasses.replace(session, template=BUILTIN["phi3"])
    chat = start_chat(phi3, Sampling(0.0, 1.0, 8))
    assert chat.stop_text == "<|end|>"
    out = Recorder()
    printer = AnswerPrinter(chat, out)
    for piece in ["the last ", "word is <", "|e", "nd|>\nmore"]:
        printer.add(piece)
    printer.add("", stream_end=True)
    assert out.getvalue() == "the last word is \n"
    assert reply(chat, QUESTION, Recorder()) is not None  # generate takes the stop string


def test_user_errors_are_one_line_and_exit_2(runs, tmp_path, capsys):
    shutil.copytree(runs["first"], tmp_path / "v1.5")
    pickled = shutil.copytree(runs["second"], tmp_path / "pickled") / "adapter"
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    for argv, message in [
        (["--adapter", str(tmp_path / "missing")], "no such directory"),
        (["--model", str(TINY), "--temperature", "-1"], "--temperature -1.0: use 0"),
        (["--model", str(TINY), "--template", "nope"], "--template nope: use auto or one of"),
        (["--model", str(TINY), "--max-new-tokens", "512"], "leaves no room for a prompt"),
        (["--adapter", "base=x"], "the name 'base' means the model without one"),
        # a LoRA run names no model of its own
        (
            ["--model", str(runs["first"])],
            f"a lora run, which trained an adapter, not a model; pass it as --adapter {runs['first']}",
        ),
        # peft cannot name a module "v1.5"; the dir's name is the default name
        ([f"--adapter={tmp_path / 'v1.5'}"], "adapter names cannot contain '.'"),
        # snug loads safetensors only, the second adapter's too (a .bin is a pickle)
        (["--adapter", str(runs["first"]), "--adapter", str(pickled)], "no adapter_model.safe"),
    ]:
        capsys.readouterr()
        assert main(["chat", *argv]) == 2, argv
        err = capsys.readouterr().err.replace("loading ...\n", "").strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and message in err, err
