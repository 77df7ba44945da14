"""README.md against the code and the repo: the result it quotes, the statuses and exit codes it
lists, the files its commands name, the counts it gives and the way it writes the command are
the ones the code and the files give.

Each check is a function of the README's text that returns the problems it finds (empty: none),
so it can also be run on another version of the README, e.g. one from `git show`."""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Where the README's measured numbers are recorded, each with the command that printed it.
MEASUREMENTS = ROOT / "docs/measurements.md"

# Files the examples name as the reader's own (each shown next to a bundled example).
PLACEHOLDERS = {"my.yaml", "cfg.yaml", "my_data.jsonl"}
# Folders the README's commands write (snug train, snug merge).
WRITTEN = {"runs", "merged"}
# Flags whose value is a path the command itself writes.
OUTPUT_FLAGS = {"--out", "--output", "--write-config"}
FILE_SUFFIXES = {".yaml", ".yml", ".json", ".jsonl", ".csv", ".parquet", ".py", ".md"}


def readme() -> str:
    return (ROOT / "README.md").read_text()


def fenced(text: str, lang: str | None = None) -> list[str]:
    return [body for tag, body in FENCE.findall(text) if lang is None or tag == lang]


def prose(text: str) -> str:
    """The README without its fenced blocks."""
    return FENCE.sub("", text)


def paragraph(text: str, marker: str) -> str:
    """The blank-line-separated paragraph (or list item) of the prose that holds `marker`."""
    for block in re.split(r"\n\s*\n|\n(?=- )", prose(text)):
        if marker in block:
            return " ".join(block.split())
    return ""


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from snug.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def check_quickstart_result(text: str) -> list[str]:
    """The result line shown under `make quickstart` is what the loop prints (`eval_line`) for
    the values of the Measured table of docs/measurements.md's quickstart section, and every
    other place (the README, docs/) that quotes the quickstart's held-out result agrees with
    that table."""
    from snug.train.finish import eval_line

    recorded = MEASUREMENTS.read_text().split("\n## The quickstart\n", 1)[-1]
    section = recorded.split("### Measured", 1)[-1].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", section, re.M))
    row = {k: v for k, v in rows.items() if k.startswith("held-out")}
    base = next(v for k, v in row.items() if k.startswith("held-out exact match, base"))
    after = next(v for k, v in row.items() if k.startswith("held-out exact match after"))
    loss = next(v for k, v in row.items() if k.startswith("held-out loss"))
    before_pct, after_pct = (float(re.match(r"([\d.]+)%", v)[1]) for v in (base, after))
    loss_before, loss_after = (float(x) for x in re.findall(r"[\d.]+", loss))
    expected = eval_line(
        {
            "metric": "exact_match",
            "before": before_pct / 100,
            "after": after_pct / 100,
            "loss_before": loss_before,
            "loss_after": loss_after,
        }
    )
    problems = []
    shown = re.search(r"^held-out exact match: .*$", text, re.M)
    if shown is None or shown[0] != expected:
        problems.append(
            f"quickstart line {shown and shown[0]!r}; the Measured table gives {expected!r}"
        )
    quoting = text + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for loss_q, pct_q in re.findall(
        r"on the quickstart, loss ([\d.]+) and exact match ([\d.]+)%", quoting
    ):
        if (float(loss_q), float(pct_q)) != (loss_after, after_pct):
            problems.append(
                f"eval section quotes loss {loss_q}, {pct_q}%; the table {loss_after}, {after_pct}%"
            )
    return problems


def check_statuses(text: str) -> list[str]:
    """The statuses the README lists for summary.json are those snug/train/training.py writes."""
    source = (ROOT / "snug/train/training.py").read_text()
    written = set(re.findall(r'summary\["status"\] = "(\w+)"', source))
    written |= set(re.findall(r'summary: dict = \{"status": "(\w+)"', source))
    sentence = re.search(r"with `status` (.*?)\.(?: |$)", " ".join(prose(text).split()))
    if sentence is None:
        return ["no sentence lists summary.json's statuses ('with `status` ...')"]
    listed = set(re.findall(r"`(\w+)`", re.sub(r"\([^()]*\)", "", sentence[1])))
    if listed != written:
        return [f"README lists statuses {sorted(listed)}; the loop writes {sorted(written)}"]
    return []


def check_exit_codes(text: str) -> list[str]:
    """The stop bullet gives the codes the code returns: EXIT_STOPPED when a step was finished
    and saved, and the KeyboardInterrupt code of `snug.cli.main` when Ctrl-C comes while there
    is no step to finish (preprocessing): the README once said 75 for every Ctrl-C."""
    stopped = int(
        re.search(r"EXIT_STOPPED = (\d+)", (ROOT / "snug/train/resume.py").read_text())[1]
    )
    cli = (ROOT / "snug/cli.py").read_text()
    aborted = int(re.search(r"except KeyboardInterrupt:\n(?:.*\n)*?\s+return (\d+)", cli)[1])
    bullet = paragraph(text, "**SIGTERM or Ctrl-C**")
    said = {int(n) for n in re.findall(r"(?:status|exits(?: with status)?) \**(\d+)", bullet)}
    problems = []
    if said != {stopped, aborted}:
        problems.append(
            f"stop bullet gives exit codes {sorted(said)}; the code {[stopped, aborted]}"
        )
    if not re.search(rf"preprocessing[^.]*\b{aborted}\b|\b{aborted}\b[^.]*preprocessing", bullet):
        problems.append(
            f"stop bullet does not say that Ctrl-C during preprocessing exits {aborted}"
        )
    return problems


def _is_repo_path(token: str, top: set[str]) -> bool:
    path = Path(token.split("::")[0])
    return (len(path.parts) > 1 and path.parts[0] in top) or path.suffix in FILE_SUFFIXES


def _headings(markdown: str) -> set[str]:
    """The anchors GitHub makes of a page's headings."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", prose(markdown), re.M)
    }


def _missing(token: str, written: set[str] = frozenset()) -> str | None:
    """Why a path named by the README is not in the repo, or None when it is (or is one the
    README's commands write: runs/, merged/, an output they name, a placeholder for the
    reader's own file). A link into a page of the repo (`docs/x.md#part`) must find the part."""
    name, _, test = token.partition("::")
    name, _, anchor = name.partition("#")
    name = name.rstrip("/")
    if Path(name).parts[0] in WRITTEN or name in PLACEHOLDERS or name in written:
        return None
    if not (ROOT / name).exists():
        return f"{token}: no such file in the repo"
    if test and not re.search(rf"^def {re.escape(test)}\(", (ROOT / name).read_text(), re.M):
        return f"{token}: no such test"
    if anchor and anchor not in _headings((ROOT / name).read_text()):
        return f"{token}: no such heading in {name}"
    return None


def check_paths(text: str) -> list[str]:
    """Every repo file a README command, code span or link names exists: in bash blocks the
    arguments, `key=value` values and flag values (not the outputs of --out/--output), in
    prose the code spans and link targets; in-page links point at a heading."""
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    top -= {p.name for p in ROOT.glob("*.egg-info")}
    top |= WRITTEN
    named, written = [], set()
    for block in fenced(text, "yaml"):  # a file the reader writes: `# my.yaml` on its first line
        if m := re.match(r"# (\S+\.ya?ml)\b", block):
            written.add(m[1])
    for block in fenced(text, "bash"):
        for line in block.splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            for before, token in itertools.pairwise([None, *tokens]):
                if before in OUTPUT_FLAGS:
                    written.add(token)
                if before in OUTPUT_FLAGS or token.startswith("-"):
                    continue
                value = token.split("=", 1)[1] if "=" in token else token
                if _is_repo_path(value, top):
                    named.append(value)
    for span in re.findall(r"`([^`]+)`", prose(text)):
        named += [t for t in span.split() if "/" in t and t.split("/")[0] in top]
    links = re.findall(r"\]\(([^)\s]+)\)", prose(text))
    named += [link for link in links if not link.startswith(("#", "http"))]
    problems = [why for token in dict.fromkeys(named) if (why := _missing(token, written))]
    headings = _headings(text)
    problems += [
        f"{link}: no such heading"
        for link in links
        if link.startswith("#") and link[1:] not in headings
    ]
    return problems


def check_catalog(text: str) -> list[str]:
    """'N configs from A, B, ...' matches snug/models/catalog/models: the count of files, and
    every family named has a file and every file is of a family named."""
    files = [p.stem.lower() for p in (ROOT / "snug/models/catalog/models").glob("*.json")]
    problems = []
    for count, families in re.findall(r"(\d+) configs from ([^)]*)\)", " ".join(text.split())):
        if int(count) != len(files):
            problems.append(f"README says {count} configs; the catalog holds {len(files)}")
        names = [f.strip().lower() for f in re.split(r",|\band\b", families) if f.strip()]
        problems += [f"no catalog config of {n}" for n in names if not any(n in f for f in files)]
        problems += [f"{f} is of no family named" for f in files if not any(n in f for n in names)]
    return problems if problems or "configs from" in text else ["no 'N configs from ...' line"]


def check_one_command_form(text: str) -> list[str]:
    """Commands are written as bare `snug`; one sentence in the prose says that in the repo's
    venv it is `.venv/bin/snug`."""
    problems = [
        f"code block runs {line.strip()!r}"
        for b in fenced(text)
        for line in b.splitlines()
        if ".venv/bin/snug" in line
    ]
    if prose(text).count(".venv/bin/snug") != 1:
        problems.append(
            "the prose should say once that in the repo's venv `snug` is .venv/bin/snug"
        )
    return problems


# Phrases that described, in the future tense, features that have since shipped: `snug plan`
# ("coming next"), resuming ("comes with the reliability work") and the planner's use of the
# tensor tracker ("will use on fake tensors"). A guard against their return, not a grammar check.
STALE_PHRASES = ("coming next", "comes with the reliability work", "will use on fake tensors")


def check_no_future_tense_for_what_exists(text: str) -> list[str]:
    """No existing sub-command is announced as coming, and none of STALE_PHRASES is left."""
    flat = " ".join(text.split())
    problems = [
        f"`snug {name}` exists but is announced: {m[0]!r}"
        for name in subcommands()
        for m in re.finditer(rf"`snug {name}`[^.]{{0,40}}\b(coming|will come|not yet)\b", flat)
    ]
    return problems + [f"stale phrase {p!r}" for p in STALE_PHRASES if p in flat]


def check_output_dir_paragraph(text: str) -> list[str]:
    """The paragraph on re-running into output.dir says what `snug train` does (resume, or
    --fresh, a flag it has) and does not claim that nothing is overwritten: a new run deletes
    the earlier run's outputs (snug/train/outputs.py `commit`)."""
    block = paragraph(text, "`.snug-run`")
    flags = {f for a in subcommands()["train"]._actions for f in a.option_strings}
    problems = []
    if "resume" not in block or "`--fresh`" not in block or "--fresh" not in flags:
        problems.append(
            "the output.dir paragraph should say a re-run resumes, or starts over with `--fresh`"
        )
    if "no file of yours is overwritten" in block:
        problems.append(
            "the output.dir paragraph says no file is overwritten; a re-run replaces outputs"
        )
    return problems


def check_network(text: str) -> list[str]:
    """`make quickstart` sets up .venv with pip (Makefile), so the README may not say it needs
    no network."""
    makefile = (ROOT / "Makefile").read_text()
    if "pip install" not in makefile:
        return []
    flat = " ".join(prose(text).split())
    return [
        f"says {s.strip()!r}, but make quickstart runs pip"
        for s in re.split(r"(?<=\.) ", flat)
        if "`make quickstart`" in s and "no network" in s
    ]


def check_no_session_notes(text: str) -> list[str]:
    """Notes about the session that wrote a line ('no GPU was lent to this task') are not
    documentation."""
    return [f"session note: {m[0]!r}" for m in re.finditer(r"[^.]*\blent\b[^.]*\.", text)]


# The README is a guide read from the top: what snug is, how to install it, the quickstart,
# your data, the plan, training, using the result, then reference and development. The train
# section keeps a place for what a run does when stopped and what it refuses.
OUTLINE = [
    "# snug",
    "## Install",
    "## Quickstart",
    "## Your data",
    "## Plan: will it fit?",
    "## Train",
    "### Stopping, crashing and resuming",
    "### What snug refuses",
    "### Several GPUs",
    "## Use the result",
    "## Reference",
    "### Configuration reference",
    "## Development",
]


def check_outline(text: str) -> list[str]:
    """The headings of OUTLINE are there, in that order (others may come between)."""
    headings = re.findall(r"^#+ .*$", prose(text), re.M)
    found = [h for h in headings if h in OUTLINE]
    return [] if found == OUTLINE else [f"headings {found}; the outline is {OUTLINE}"]


def check_outputs_are_recorded(text: str) -> list[str]:
    """Each output the README shows (a ```text block) is recorded, as it is (lines wrapped or
    not: a terminal's width wraps them), in docs/measurements.md, which says which command
    printed it, where and when: the README's numbers are what a run printed, not numbers
    written by hand."""
    recorded = " ".join(MEASUREMENTS.read_text().split())
    return [
        f"output not in docs/measurements.md: {block.splitlines()[0]!r}"
        for block in fenced(text, "text")
        if " ".join(block.split()) not in recorded
    ]


CHECKS = [
    check_outline,
    check_outputs_are_recorded,
    check_quickstart_result,
    check_statuses,
    check_exit_codes,
    check_paths,
    check_catalog,
    check_one_command_form,
    check_no_future_tense_for_what_exists,
    check_output_dir_paragraph,
    check_network,
    check_no_session_notes,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_readme(check):
    assert check(readme()) == []
