"""Make the bundled preference data from the instruction task, deterministically:

- data/preference/{train,heldout}.jsonl: pairs (TRL's layout: prompt, chosen, rejected). The
  same answer in two styles: the preferred one says only the answer ("rain."), the rejected
  one is the quickstart's sentence ("the last word is rain."). DPO, ORPO and SimPO learn to
  prefer the short style; a model that answers in sentences starts near 0% preference accuracy.
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
PREFIXES = ("the words are ", "the first word is ", "the last word is ")


def short(answer: str) -> str:
    """The answer without its sentence: 'the last word is rain.' -> 'rain.'"""
    for prefix in PREFIXES:
        if answer.startswith(prefix):
            return answer[len(prefix) :]
    raise ValueError(f"unexpected answer {answer!r}")


def main() -> None:
    out = ROOT / "data/preference"
    out.mkdir(exist_ok=True)
    for split in ("train", "heldout"):
        rows = [json.loads(x) for x in (ROOT / f"data/instruct/{split}.jsonl").open()]
        pairs, labelled = [], []
        for i, r in enumerate(rows):
            prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
            pairs.append({"prompt": prompt, "chosen": short(r["output"]), "rejected": r["output"]})
            good = i % 2 == 0
            answer = short(r["output"]) if good else r["output"]
            labelled.append({"prompt": prompt, "completion": answer, "label": good})
        for name, data in ((split, pairs), (f"kto_{split}", labelled)):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))


if __name__ == "__main__":
    main()
