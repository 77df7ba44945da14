"""Make the bundled preference data from the instruction task, deterministically:

- data/preference/{train,heldout}.jsonl: pairs (TRL's layout: prompt, chosen, rejected). The
  same answer in two styles: the preferred one ends with an exclamation mark ("the last word
  is rain!"), the rejected one is the quickstart's sentence as it is ("the last word is
  rain."). A model that answers like the quickstart starts at 0% preference accuracy (no pair
  preferred) and must learn to end its answers the preferred way.
- data/preference/kto_{train,heldout}.jsonl: the same, unpaired for KTO (prompt, completion,
  label): each prompt once, with the preferred answer (true) or the rejected one (false), in
  turn.

Held-out prompts are those of data/instruct/heldout.jsonl (their lists never appear in train).
Run: python scripts/make_pref_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def preferred(answer: str) -> str:
    """The answer in the preferred style: 'the last word is rain.' -> 'the last word is rain!'"""
    if not answer.endswith("."):
        raise ValueError(f"unexpected answer {answer!r}")
    return answer[:-1] + "!"


def main() -> None:
    out = ROOT / "data/preference"
    out.mkdir(exist_ok=True)
    for split in ("train", "heldout"):
        rows = [json.loads(x) for x in (ROOT / f"data/instruct/{split}.jsonl").open()]
        pairs, labelled = [], []
        for i, r in enumerate(rows):
            prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
            pairs.append(
                {"prompt": prompt, "chosen": preferred(r["output"]), "rejected": r["output"]}
            )
            good = i % 2 == 0
            answer = preferred(r["output"]) if good else r["output"]
            labelled.append({"prompt": prompt, "completion": answer, "label": good})
        for name, data in ((split, pairs), (f"kto_{split}", labelled)):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))


if __name__ == "__main__":
    main()
