"""`snug generate`: an answer for every row of a file of prompts, written in the same order.

Rows are `{"prompt": "..."}`, OpenAI-style `{"messages": [...]}`, sharegpt
`{"conversations": [...]}` or alpaca `{"instruction", "input"?, "system"?, "history"?}`, checked
by the same converters that read training data. A conversation that ends with an assistant turn
(the expected answer) is answered from the turn before it.

torch and transformers are imported inside the functions that use them: `snug --help` builds
its parser from this module and should not wait seconds for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from snug.deploy.args import add_session_arguments, at_least_1, open_from_args

if TYPE_CHECKING:
    from snug.deploy.session import Session

# (field, format, role key, text key) of the conversation formats a prompt row may use
CONVERSATIONS = (
    ("messages", "messages", "role", "content"),
    ("conversations", "sharegpt", "from", "value"),
)


def prompt_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation a row asks to continue, checked as training checks its records: a
    placeholder answer is appended where the row has none, and left out again after."""
    from snug.data.formats import SHAREGPT_ROLES, DataError, to_canonical

    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field 'prompt' must be a non-empty string.")
        return [{"role": "user", "content": prompt}]
    if "instruction" in record:  # alpaca; its "output", if any, is the expected answer
        return to_canonical({**record, "output": "-"}, "alpaca", where)["messages"][:-1]
    for key, fmt, role, text in CONVERSATIONS:
        if key not in record:
            continue
        turns = record[key]
        if isinstance(turns, list):
            last = turns[-1] if turns and isinstance(turns[-1], dict) else {}
            if SHAREGPT_ROLES.get(str(last.get(role)).lower()) != "assistant":
                record = {**record, key: [*turns, {role: "assistant", text: "-"}]}
        return to_canonical(record, fmt, where)["messages"][:-1]
    raise DataError(
        f"{where}: cannot tell the prompt from the keys {sorted(record)}; write "
        '{"prompt": ...}, {"messages": [...]}, {"conversations": [...]} or '
        '{"instruction": ..., "input": ...}.'
    )


class Prompt(NamedTuple):
    line: int  # where the row is in its file (1 = first)
    row: dict[str, Any]  # as written
    messages: list[dict[str, str]]  # the conversation to answer


def read_prompts(path: Path, system: str | None = None) -> list[Prompt]:
    """Each record of a JSON Lines file (or a file holding one JSON array); the first bad line
    stops it, named. `system` goes first in conversations that bring no system message of their
    own."""
    from snug.data.formats import DataError
    from snug.data.locate import check_json_file, read_json

    refuse_special("--input", path)
    if not path.is_file():
        raise DataError(f"--input {path}: no such file.")
    check_json_file(path)  # before it is read whole: a line over the limit is named
    lines, records, bad = read_json(path)
    if bad:
        line, why = bad[0]
        raise DataError(f"{path} line {line}: {why}; fix that line.")
    if not records:
        raise DataError(f"{path}: holds no rows.")
    rows = []
    for line, record in zip(lines, records, strict=True):
        messages = prompt_messages(record, f"{path} line {line}")
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        rows.append(Prompt(line, record, messages))
    return rows


def refuse_special(flag: str, path: Path) -> None:
    """A named pipe, socket or device given as data (or, for a folder, inside it), refused
    before anything opens it: opening a pipe waits for a writer."""
    from snug.config.paths import NOT_A_FILE_BECAUSE, special_data_file
    from snug.data.formats import DataError

    if special := special_data_file(path):
        found, what = special
        where = "is" if found == path else f"holds {found},"
        raise DataError(f"{flag} {path} {where} {what}, {NOT_A_FILE_BECAUSE}.")


def refuse_too_long(
    session: Session, rows: list[Prompt], prompts: list[list[int]], path: Path, max_new: int
) -> None:
    """A prompt that leaves no room for --max-new-tokens in the model's context would be
    answered with garbage: the first such row stops it, named."""
    from snug.deploy.session import SessionError

    context = session.context()
    if context is None:
        return
    for row, ids in zip(rows, prompts, strict=True):
        if len(ids) + max_new > context:
            raise SessionError(
                f"{path} line {row.line}: a {len(ids)}-token prompt and --max-new-tokens "
                f"{max_new} overflow the model's {context}-token context; shorten the prompt or "
                "lower --max-new-tokens."
            )


def batch_seed(seed: int, first: int) -> int:
    """The seed of the batch whose first row is `first`: each batch draws from a stream of its
    own, so a run resumed at a batch draws what the whole run would have."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{first}".encode()).digest()[:8], "little")


def generate(
    session: Session,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    start: int = 0,
    each: Callable[[int, list[str]], None] | None = None,
) -> list[str]:
    """Answers of the session's active model to prompts[start:], in order, a batch of
    consecutive prompts at a time (rows start, start + batch_size, ...: each batch can be
    written as it comes; generate_answers pads each batch to its longest prompt), sampled with
    batch_seed; `each(first, answers)` hears each batch's answers as they come."""
    import torch

    from snug.train.evaluate import generate_answers

    answers: list[str] = []
    with session.scope():
        for first in range(start, len(prompts), batch_size):
            torch.manual_seed(batch_seed(seed, first))
            got = generate_answers(
                session.model,
                session.tok,
                session.template,
                prompts[first : first + batch_size],
                max_new_tokens,
                session.device,
                batch_size=batch_size,
                temperature=temperature,
                top_p=top_p,
            )
            answers += got
            if each is not None:
                each(first, got)
    session.model.eval()  # generate_answers leaves the model in train mode
    return answers


def output_row(row: dict[str, Any], answer: str, model: str) -> dict[str, Any]:
    """The row as written plus the answer as "output" and the model (the adapter's name, or
    the base's label) as "adapter"; an "output" and "adapter" the row already had (alpaca's
    expected answer, or an earlier generate's row) are kept as "expected" and
    "expected_adapter"."""
    kept = {k: v for k, v in row.items() if k not in ("output", "adapter")}
    if "output" in row:
        kept.setdefault("expected", row["output"])
    if "adapter" in row:
        kept.setdefault("expected_adapter", row["adapter"])
    return {**kept, "output": answer, "adapter": model}


def refuse_existing(path: Path, flag: str) -> None:
    """snug never overwrites a results file: an existing one is refused, before any work."""
    from snug.deploy.session import SessionError

    if path.exists():
        raise SessionError(f"{flag} {path} already exists; remove it or name another file.")
    if not path.parent.is_dir():
        raise SessionError(f"{flag} {path}: the directory {path.parent} does not exist.")


def write_atomically(path: Path, text: str, flag: str) -> None:
    """Write a temporary file beside `path` and link it into place, so that a crash never
    leaves a half-written file under the name. os.link fails, atomically, when `path` exists
    (made by someone else while this one worked): then the temporary file, which holds all the
    work, is kept and named."""
    from snug.deploy.session import SessionError

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise SessionError(
            f"{flag} {path} appeared while this ran and is left as it is; the results are in {tmp}."
        ) from None
    except OSError as e:  # e.g. a filesystem without hard links
        raise SessionError(
            f"{flag} {path}: cannot link the results into place ({e.strerror or e}); they are in "
            f"{tmp}."
        ) from None
    tmp.unlink()


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 (greedy) or more")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate",
        help="answer every prompt of a JSON Lines file with a base and its adapters",
        description="Reads prompts ({'prompt'}, {'messages'}, {'conversations'} or alpaca "
        "{'instruction', 'input'} rows), answers each with the chosen adapter (or the base), "
        "and writes one row per input row, in the same order: the row as given plus 'output' "
        "and 'adapter' (an 'output' and 'adapter' already there are kept as 'expected' and "
        "'expected_adapter'). Answers are written to OUTPUT.partial as they come (a batch at "
        "a time, synced); run the same command again after a crash or a full disk and it "
        "goes on from there. OUTPUT appears, whole, when every row is answered; an existing "
        "--output is never overwritten.",
    )
    add_session_arguments(parser)
    parser.add_argument("--input", required=True, help="JSON Lines file of prompts")
    parser.add_argument(
        "--output",
        required=True,
        help="JSON Lines file to write (must be new; OUTPUT.partial and OUTPUT.partial.job "
        "hold the work until it is whole)",
    )
    parser.add_argument(
        "--batch-size",
        type=at_least_1,
        default=8,
        help="prompts per generate call (default 8): consecutive rows, in the input's order "
        "(not grouped by length), so that each batch is written as it comes and a stopped "
        "command goes on exactly where it stopped; rows of very different lengths pad more",
    )
    parser.add_argument(
        "--max-new-tokens", type=at_least_1, default=128, help="longest answer (default 128)"
    )
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default=0.0,
        help="0 (default): greedy; above 0: sample at this temperature",
    )
    parser.add_argument(
        "--top-p", type=_top_p, default=1.0, help="nucleus sampling mass (default 1.0: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument(
        "--system", metavar="TEXT", help="system message for rows that bring none of their own"
    )
    parser.set_defaults(func=cmd_generate)


def job_of(args: argparse.Namespace, session: Session, rows: list[Prompt], prompts) -> dict:
    """What this command's partial output belongs to (snug/deploy/partial.py)."""
    from snug.deploy.partial import job_record, weight_files
    from snug.models.fingerprint import local_dir

    base = session.cfg.model
    model = {
        "base": base.name_or_path,
        "use": session.label,
        "base_files": weight_files(local_dir(base.name_or_path, base.revision)),
        "adapter_files": weight_files(session.adapters.get(session.active)),
    }
    dtype = next((p.dtype for p in session.model.parameters() if p.is_floating_point()), None)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": session.device.type,
    }
    return job_record([row.row for row in rows], prompts, model, settings)


def cmd_generate(args: argparse.Namespace) -> int:
    from snug.deploy.partial import writing

    out = Path(args.output)
    refuse_existing(out, "--output")
    with writing(out, "--output"):  # one command writes OUT at a time
        refuse_existing(out, "--output")  # again: another may have finished it meanwhile
        return _generate(args, out)


def _generate(args: argparse.Namespace, out: Path) -> int:
    from rich.console import Console

    from snug.deploy.partial import check_before_loading, open_partial
    from snug.runtime.progress import Phase

    check_before_loading(out, "--output")
    source = Path(args.input)
    rows = read_prompts(source, args.system)  # bad input stops before the model loads
    console = Console(soft_wrap=True)  # progress (stderr keeps to errors)
    session = open_from_args(args, console, "generate: loading")
    prompts = [session.prompt_ids(row.messages) for row in rows]
    refuse_too_long(session, rows, prompts, source, args.max_new_tokens)
    job = job_of(args, session, rows, prompts)
    partial = open_partial(out, job, [row.row for row in rows], output_row, "--output")
    if partial.done:
        print(f"going on with {partial.path}: {partial.done} of {len(rows)} answers there")
    left = len(rows) - partial.done
    with Phase(console, f"generate {session.label}", left, "rows") as p:

        def write(first: int, answers: list[str]) -> None:
            text = "".join(
                json.dumps(output_row(rows[first + i].row, a, session.label), ensure_ascii=False)
                + "\n"
                for i, a in enumerate(answers)
            )
            partial.append(text, len(rows))
            p.advance(len(answers))

        generate(
            session,
            prompts,
            args.batch_size,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            start=partial.done,
            each=write,
        )
    partial.finish(len(rows))
    print(f"wrote {len(rows)} answers of {session.label} to {out}")
    return 0
