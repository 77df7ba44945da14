"""`snug chat`: talk to a base model and its adapters in the terminal, switching by name.

The answer streams as it is generated (transformers' TextStreamer, in this thread: Ctrl-C then
lands in `generate` itself and stops that answer without a second thread to stop). Generation
stops at eos or the chat template's end-of-turn marker, as `snug eval` does.

`snug --help` imports this module to build its parser, so torch and transformers are imported
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from snug.deploy.args import add_session_arguments, open_from_args

if TYPE_CHECKING:
    from transformers import TextStreamer

    from snug.deploy.session import Session

HELP = """\
/use NAME      answer with adapter NAME, or "base" for none (the conversation is kept)
/adapters      list what /use can pick; * marks the active one
/system TEXT   set the system prompt and clear the conversation (/system alone removes it)
/reset         clear the conversation
/help          this list
/exit          leave (also Ctrl-D, or Ctrl-C at the prompt; Ctrl-C during an answer stops it)"""

COMMANDS = "/use NAME, /adapters, /system TEXT, /reset, /help, /exit"


@dataclass
class Sampling:
    """How answers are drawn."""

    temperature: float  # 0: greedy (the same answer every time)
    top_p: float  # nucleus sampling: draw from the smallest set of tokens this probable
    max_new_tokens: int  # longest answer, in tokens


@dataclass
class Chat:
    """One conversation with a session: the system prompt, the turns so far, and where to stop."""

    session: Session
    sampling: Sampling
    system: str | None
    stops: list[int]  # token ids that end an answer (eos, end-of-turn)
    marker: str  # text the template puts after an answer, e.g. "<|im_end|>\n"
    stop_text: str | None  # the marker when it is plain text, not one token generation stops at
    context: int | None  # tokens the model attends over (prompt + answer); None: no known limit
    history: list[dict] = field(default_factory=list)  # user/assistant messages, oldest first

    def messages(self, turns: list[dict]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + turns


def start_chat(session: Session, sampling: Sampling, system: str | None = None) -> Chat:
    """A conversation with nothing said yet; refuses --max-new-tokens that leaves no prompt room."""
    from snug.deploy.session import SessionError
    from snug.train.evaluate import end_of_turn, stop_token_ids

    stops = stop_token_ids(session.model, session.tok, session.template)
    marker = end_of_turn(session.tok, session.template)
    first = session.tok(marker, add_special_tokens=False)["input_ids"][:1]
    plain = bool(marker.strip()) and not (first and first[0] in stops)
    context = session.context()
    if context is not None and sampling.max_new_tokens >= context:
        raise SessionError(
            f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in the "
            f"model's {context}-token context; pass a smaller one."
        )
    return Chat(
        session, sampling, system, stops, marker, marker.strip() if plain else None, context
    )


class AnswerPrinter:
    """Streams decoded text to `out` as transformers' TextStreamer produces it, holding back
    anything that may be the start of a plain-text end-of-turn marker, and cutting there."""

    def __init__(self, chat: Chat, out: TextIO) -> None:
        from transformers import TextStreamer

        self.stop_text, self.out = chat.stop_text, out
        self.text, self.shown = "", 0
        # The library's streamer decodes token by token and hands over text in whole words
        # through on_finalized_text, the one method it expects to be replaced (it prints).
        self.streamer: TextStreamer = TextStreamer(
            chat.session.tok, skip_prompt=True, skip_special_tokens=True
        )
        self.streamer.on_finalized_text = self.add

    def add(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        visible = self.text.split(self.stop_text, 1)[0] if self.stop_text else self.text
        if self.stop_text and not stream_end:  # "<|e" may be the start of "<|end|>": wait
            for n in range(min(len(self.stop_text) - 1, len(visible)), 0, -1):
                if visible.endswith(self.stop_text[:n]):
                    visible = visible[:-n]
                    break
        self.out.write(visible[self.shown :] + ("\n" if stream_end else ""))
        self.out.flush()
        self.shown = max(self.shown, len(visible))


def fit(chat: Chat, question: str, out: TextIO) -> list[int] | None:
    """Prompt ids for the history plus `question`, dropping the oldest exchanges while the
    prompt and the longest answer would overflow the model's context; None if the question alone
    does not fit (or the template refuses the conversation)."""
    from snug.data.render import TemplateRefused

    turns = [*chat.history, {"role": "user", "content": question}]
    room = None if chat.context is None else chat.context - chat.sampling.max_new_tokens
    dropped = 0
    while True:
        try:
            ids = chat.session.prompt_ids(chat.messages(turns))
        except TemplateRefused as e:
            print(e, file=out)
            return None
        if room is None or len(ids) <= room:
            break
        if len(turns) == 1:
            print(
                f"this message makes a {len(ids)}-token prompt; the model's {chat.context}-token "
                f"context, less --max-new-tokens {chat.sampling.max_new_tokens} for the answer, "
                f"holds {room}. Shorten it (or the /system prompt).",
                file=out,
            )
            return None
        turns, dropped = turns[2:], dropped + 1
    if dropped:
        chat.history = turns[:-1]
        print(
            f"(forgot the oldest {dropped} exchange{'s' * (dropped > 1)} to stay within the "
            f"model's {chat.context}-token context)",
            file=out,
        )
    return ids


def reply(chat: Chat, question: str, out: TextIO) -> str | None:
    """Stream the active model's answer to `question` and add both to the history; None when
    there is no answer (too long, or stopped with Ctrl-C: then the question is not kept)."""
    import torch

    from snug.train.evaluate import answer_text, prompt_learning

    prompt = fit(chat, question, out)
    if prompt is None:
        return None
    s, session = chat.sampling, chat.session
    options = {"max_new_tokens": s.max_new_tokens, "do_sample": s.temperature > 0}
    if s.temperature > 0:  # top_k=0: no top-k cut (transformers would add top_k=50)
        options |= {"temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
    if chat.stop_text:  # transformers stops at the text, whichever tokens spell it
        options |= {"stop_strings": [chat.stop_text], "tokenizer": session.tok}
    printer = AnswerPrinter(chat, out)
    try:
        with session.scope(), torch.inference_mode():
            ids = session.model.generate(
                input_ids=torch.tensor([prompt], device=session.device),  # (1, T)
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=session.device),
                eos_token_id=chat.stops,
                pad_token_id=session.tok.pad_token_id,
                streamer=printer.streamer,
                use_cache=not prompt_learning(session.model),  # as snug eval generates
                **options,
            )
    except KeyboardInterrupt:
        print(" [stopped; this question is not kept]", file=out, flush=True)
        return None
    answer = answer_text(session.tok, ids[0, len(prompt) :].tolist(), chat.marker).strip()
    chat.history += [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    return answer


def command(chat: Chat, line: str, out: TextIO) -> bool:
    """Carry out one /command; False when the chat should end."""
    from snug.deploy.session import BASE, SessionError

    name, _, rest = line.partition(" ")
    rest = rest.strip()
    session = chat.session
    if name == "/exit":
        return False
    if name == "/use" and rest:
        try:
            session.use(rest)
        except SessionError as e:
            print(e, file=out)
        else:
            print(
                f"now answering with {rest} (the conversation is kept; /reset clears it)", file=out
            )
    elif name == "/use":
        print(f"/use NAME, NAME one of: {', '.join([BASE, *session.adapters])}", file=out)
    elif name == "/adapters":
        width = max(len(n) for n in [BASE, *session.adapters])
        base = f"the model without an adapter: {session.cfg.model.name_or_path}"
        for n, where in [(BASE, base), *session.adapters.items()]:
            print(f"{'*' if n == session.active else ' '} {n:<{width}}  {where}", file=out)
    elif name == "/system":
        chat.system, chat.history = rest or None, []
        said = "set" if rest else "removed"
        print(f"system prompt {said}; conversation cleared", file=out)
    elif name == "/reset":
        chat.history = []
        print("conversation cleared", file=out)
    elif name == "/help":
        print(HELP, file=out)
    else:
        print(f"unknown command {name}; commands: {COMMANDS}", file=out)
    return True


def chat_loop(chat: Chat, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Read a line, answer it or carry out its /command, until /exit, end of input or Ctrl-C."""
    session = chat.session
    names = ", ".join(session.adapters) or "none"
    print(
        f"snug chat: {session.model.config.name_or_path}, adapters: {names}; answering with "
        f"{session.label}.\n/help lists the commands; /exit or Ctrl-D leaves.",
        file=out,
        flush=True,
    )
    while True:
        try:
            line = read(f"[{session.label}] you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        if line.startswith("/"):
            if not command(chat, line, out):
                return 0
        elif line:
            reply(chat, line, out)


def cmd_chat(args: argparse.Namespace) -> int:
    from snug.data.templates import BUILTIN
    from snug.deploy.session import SessionError

    if args.temperature < 0:
        raise SessionError(f"--temperature {args.temperature}: use 0 (greedy) or more.")
    if not 0 < args.top_p <= 1:
        raise SessionError(f"--top-p {args.top_p}: use a share above 0, at most 1.")
    if args.max_new_tokens < 1:
        raise SessionError(f"--max-new-tokens {args.max_new_tokens}: use 1 or more.")
    if args.template and args.template not in ("auto", *BUILTIN):
        raise SessionError(f"--template {args.template}: use auto or one of {', '.join(BUILTIN)}.")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SessionError(f"--device {args.device}, but no CUDA GPU is visible; use --device cpu.")
    print("loading ...", file=sys.stderr, flush=True)
    session = open_from_args(args)
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
    chat = start_chat(session, sampling, args.system)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    if sys.stdin.isatty():
        try:  # line editing and recall of earlier lines in input(); not on every platform
            import readline  # noqa: F401
        except ImportError:
            pass
    return chat_loop(chat)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `snug chat` on the `snug` parser's sub-commands."""
    chat = sub.add_parser(
        "chat",
        help="talk to a model and its adapters in the terminal; switch between them with /use",
        description="Load a base model with any number of adapters and chat with it: the answer "
        "streams as it is generated and the conversation is kept (the oldest turns are dropped "
        "when it outgrows the model's context). In the chat, /use NAME switches adapter "
        "('base' for none), /help lists the other commands, /exit or Ctrl-D leaves.",
    )
    add_session_arguments(chat)
    chat.add_argument("--system", metavar="TEXT", help="system prompt")
    chat.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature; 0: greedy (0.7)"
    )
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling share (0.9)")
    chat.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest answer in tokens (256)"
    )
    chat.add_argument("--seed", type=int, help="seed sampling, for answers you can reproduce")
    chat.set_defaults(func=cmd_chat)
