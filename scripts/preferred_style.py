"""How many of `snug generate`'s answers to the held-out preference prompts take the preferred
style of the bundled data (ending with '!', scripts/make_pref_data.py) and how many equal the
chosen answer. Run: snug generate --adapter runs/dpo --input data/preference/heldout.jsonl
--output answers.jsonl, then python scripts/preferred_style.py answers.jsonl"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    styled = sum(r["output"].strip().endswith("!") for r in rows)
    chosen = sum(r["output"].strip() == r["chosen"].strip() for r in rows)
    print(f"{len(rows)} answers: {styled} end with '!', {chosen} equal the chosen answer")


if __name__ == "__main__":
    main(sys.argv[1])
