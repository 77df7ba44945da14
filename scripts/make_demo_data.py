"""Make the bundled demo data, deterministically (seeded):

- data/corpus/corpus.jsonl: a small synthetic English corpus for pretraining the tiny base
  model (`train.stage: pt`). Besides plain sentences it states list facts in prose ("in the
  list red cat sun the first word is red") and holds a few small-talk chats in ChatML, so
  the base knows the words, the skills and the turn markers, but not the instruction task.
- data/classify/{train,heldout}.jsonl: text classification (train.stage=cls): is the first word
  of a list a name, a noun or an adjective?
- data/instruct/train.jsonl and data/instruct/heldout.jsonl: the instruction task (alpaca
  format): repeat a list of words, or give its first or last word. Held-out lists never
  appear in train.

Run: python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NOUNS = """cat dog bird fish horse cow sheep goat mouse rabbit tree house river road car boat
ship train apple pear lemon bread cake milk water stone hill lake sea sun moon star cloud rain
snow wind fire book pen cup box bag hat coat shoe door window table chair bed lamp clock key
ring coin ball kite drum bell flower leaf seed garden field forest city town village king queen
child friend farmer baker teacher doctor sailor bridge tower wall gate road song letter map
bottle basket candle mirror""".split()
ADJS = """red blue green yellow black white big small old young happy sad fast slow warm cold
tall short bright dark quiet loud soft hard sweet round heavy light clean wild""".split()
VERBS = """saw found took gave liked made held moved painted washed carried opened closed pushed
pulled watched helped followed counted dropped kept sold bought drew read wrote heard""".split()
NAMES = """anna ben carl dora emma finn gina hugo ida jack kate leo mia nina omar paul rosa sam
tina uma vera will zoe""".split()
WORDS = NOUNS + ADJS + NAMES

# Each task: (instruction phrasings with {ws} for the list, answer). The list sits inside the
# sentence so every word follows a space, as in the corpus (the byte-level BPE learned " cat",
# not "cat" at a line start), and answers are short sentences in the corpus's own words.
TASKS = {
    "repeat": (
        ["Repeat the list {ws}.", "Say the words {ws} again.", "Copy the list {ws}."],
        lambda ws: f"the words are {' '.join(ws)}.",
    ),
    "first": (
        [
            "What is the first word in the list {ws}?",
            "Give the first word of the list {ws}.",
            "Name the first word in {ws}.",
        ],
        lambda ws: f"the first word is {ws[0]}.",
    ),
    "last": (
        [
            "What is the last word in the list {ws}?",
            "Give the last word of the list {ws}.",
            "Name the last word in {ws}.",
        ],
        lambda ws: f"the last word is {ws[-1]}.",
    ),
}

CHATS = [
    ("hello", "hello! how are you today?"),
    ("how are you?", "i am well, thank you."),
    ("good morning", "good morning to you too."),
    ("thank you", "you are welcome."),
    ("what is your name?", "i am a small model."),
    ("good night", "good night, sleep well."),
    ("tell me a story", "once upon a time a cat found a red ball."),
    ("do you like books?", "yes, i like books a lot."),
]


def word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def sentence(rng: random.Random) -> str:
    # Half the sentences exercise lists (copy, first, last): enough repetition for the tiny
    # model to learn to copy (induction) within a short pretraining.
    kind = rng.choices(range(7), weights=[1, 1, 3, 2, 2, 1, 1])[0]
    a, n, v = rng.choice, NOUNS, VERBS
    ws = " ".join(word_list(rng))
    if kind == 0:
        return f"the {a(ADJS)} {a(n)} {a(v)} the {a(ADJS)} {a(n)}."
    if kind == 1:
        return f"{a(NAMES)} {a(v)} a {a(ADJS)} {a(n)} near the {a(n)}."
    if kind == 2:
        return f"the words are {ws}. again: {ws}."
    if kind == 3:
        return f"in the list {ws} the first word is {ws.split()[0]}."
    if kind == 4:
        return f"in the list {ws} the last word is {ws.split()[-1]}."
    if kind == 5:
        return f"{a(NAMES)} and {a(NAMES)} {a(v)} the {a(n)} by the {a(n)}."
    return f"the {a(n)} was {a(ADJS)} and the {a(n)} was {a(ADJS)}."


def chatml(user: str, assistant: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>\n"


def corpus(rng: random.Random, docs: int) -> list[dict]:
    out = []
    for _ in range(docs):
        if rng.random() < 0.1:
            out.append(
                {"text": "".join(chatml(*rng.choice(CHATS)) for _ in range(rng.randint(1, 2)))}
            )
        else:
            out.append({"text": " ".join(sentence(rng) for _ in range(rng.randint(4, 7)))})
    return out


def instruct(rng: random.Random, n: int, taken: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        ws = word_list(rng)
        key = " ".join(ws)
        if key in taken:
            continue
        taken.add(key)
        task = rng.choice(list(TASKS))
        phrasings, answer = TASKS[task]
        rows.append(
            {"instruction": rng.choice(phrasings).format(ws=key), "input": "", "output": answer(ws)}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {path.relative_to(ROOT)} ({len(rows)} rows)")


def main() -> None:
    rng = random.Random(1234)
    write_jsonl(ROOT / "data/corpus/corpus.jsonl", corpus(rng, 24000))
    taken: set[str] = set()
    heldout = instruct(rng, 200, taken)
    train = instruct(rng, 2000, taken)
    write_jsonl(ROOT / "data/instruct/heldout.jsonl", heldout)
    write_jsonl(ROOT / "data/instruct/train.jsonl", train)
    # Classification (train.stage=cls): which kind of word opens the list? Own RNG, so the
    # files above do not change when this is edited.
    crng = random.Random(99)
    kinds = {"name": NAMES, "noun": NOUNS, "adjective": ADJS}

    def classified(n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            label = crng.choice(list(kinds))
            first = crng.choice(kinds[label])
            rows.append(
                {"text": " ".join([first, *crng.sample(WORDS, crng.randint(2, 4))]), "label": label}
            )
        return rows

    write_jsonl(ROOT / "data/classify/train.jsonl", classified(1200))
    write_jsonl(ROOT / "data/classify/heldout.jsonl", classified(200))


if __name__ == "__main__":
    main()
