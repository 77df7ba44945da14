"""Records of a dataset named in data.dataset_dir's dataset_info.json (snug/config/dataset_info.py
reads the entries), rewritten into the layout snug's readers know, each source with its own
formatting, columns and role tags:

- alpaca: the entry's prompt, query, response (LLaMA-Factory's defaults: instruction, input,
  output), and system and history only where `columns` maps them, as LLaMA-Factory reads them;
  for a stage of plain text (pt) the prompt and query are the text, as LLaMA-Factory's
  pre-training reads alpaca;
- sharegpt: the `messages` column (default: conversations), each turn's role and content read
  by `tags` and written as `{"from": human | gpt | system | function_call | observation,
  "value"}`; a role that matches no tag is kept, for the format's reader to name;
- ranking (`chosen`, `rejected`) and kto (`kto_tag`, written as a boolean `label`) columns go
  to the layouts the preference stages read (snug/data/preference.py), `tools`, `images`,
  `videos` and `audios` under those names, for the readers that handle or refuse them.

Columns no mapping names are left out, as LLaMA-Factory's `align_dataset` leaves them. Each
record stays on its row, so problems still name the file's line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import datasets
import numpy as np

from snug.config.dataset_info import DatasetEntry, registered
from snug.data.formats import DataError
from snug.data.locate import Locator
from snug.data.sources import RawSource, load_raw
from snug.data.tokenize import RAW_JSON, records_of
from snug.errors import first_line

DataConfig = Any  # snug.config.DataConfig (snug.data sits below the config's registrations)
PASSED_ON = ("tools", "images", "videos", "audios")  # columns kept under LLaMA-Factory's names


def open_source(
    spec: str, cfg: DataConfig, stage: Any, seed: int | None = 0
) -> tuple[RawSource, DataConfig]:
    """One entry of data.train / data.eval -> its raw records and the data settings that read
    them: a name of data.dataset_dir's registry with its own format, else the path or hub id
    as snug/data/sources.py reads it, with `cfg` as it is. A classifier's (`stage.classifier`)
    records keep their columns: its settings name the text and the label, not the entry's.
    `seed` draws the entry's num_samples (None: every record, undrawn)."""
    entry = registered(spec, cfg.dataset_dir)
    if entry is None:
        return load_raw(spec, cfg.split, cfg.on_error), cfg
    text = stage.formats == ("text",)
    if entry.ranking and (stage.formats or stage.classifier):  # a stage not of preferences
        raise DataError(
            f"{spec}: is a ranking dataset (ranking: true in {entry.info_file}), preference "
            f"pairs that train.stage={stage.name} would not compare; use train.stage=dpo, orpo "
            "or simpo, or name a dataset without ranking."
        )
    src = _load(entry, cfg.on_error)
    raw = src.records
    drawn = entry.num_samples is not None and seed is not None
    if drawn:
        raw = raw.select(_sample(len(raw), entry.num_samples, seed))
    where = _Picked(src.where, raw["__row__"]) if drawn else src.where
    if stage.classifier:  # its own columns name the text and label (cls.text_column, ...)
        return RawSource(raw.remove_columns("__row__"), where, src.unreadable), cfg
    rewrite = _alpaca if entry.formatting == "alpaca" else _sharegpt

    def rewritten(batch: dict[str, list]) -> dict[str, list]:
        return {RAW_JSON: [json.dumps(rewrite(r, entry, text)) for r in records_of(batch)]}

    # keyed by the records read and the entry: datasets' cache of the tokens after it holds
    key = repr((raw._fingerprint, dataclasses.astuple(entry), text))
    out = raw.map(
        rewritten,
        batched=True,
        remove_columns=raw.column_names,
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
        desc=f"reading {spec}",
    )
    fmt = "text" if text else entry.formatting
    return RawSource(out, where, src.unreadable), dataclasses.replace(cfg, format=fmt)


def _load(entry: DatasetEntry, on_error: str) -> RawSource:
    """The entry's records as read (a file or folder of the data folder, or a hub dataset),
    with each row's index kept in `__row__`, to name its line once sampled."""
    if entry.path is not None:
        src = load_raw(str(entry.path), entry.split, on_error)
    else:
        try:
            ds = datasets.load_dataset(
                entry.hf_hub_url, name=entry.subset, data_dir=entry.folder, split=entry.split
            )
        except Exception as e:  # datasets raises many types; all mean "cannot be read"
            raise DataError(
                f"{entry.where}: cannot load hub dataset {entry.hf_hub_url} ({first_line(e)})."
            ) from None
        src = RawSource(ds, Locator(entry.hf_hub_url))
    rows = src.records.add_column("__row__", list(range(len(src.records))))
    return RawSource(rows, src.where, src.unreadable)


def _sample(count: int, wanted: int, seed: int) -> list[int]:
    """LLaMA-Factory's num_samples: that many records drawn at random (train.seed) without
    repeats; beyond the count, all of them and the rest drawn again at random."""
    rng = np.random.default_rng(seed)
    picked = rng.permutation(count)[:wanted].tolist()
    if wanted > count:
        picked += rng.choice(count, wanted - count).tolist()
    return picked


@dataclasses.dataclass
class _Picked:
    """Names a sampled row by the line of the record it was drawn from."""

    where: Locator
    rows: list[int]

    def __call__(self, index: int) -> str:
        return self.where(self.rows[index])

    @property
    def known(self) -> tuple:
        """What names its rows, for the tokenizing cache's key (dataset.py): the source's lines
        as known, and the rows drawn from them."""
        return self.where.known, tuple(self.rows)


def _column(record: dict[str, Any], entry: DatasetEntry, part: str) -> Any:
    column = entry.columns.get(part)
    return None if column is None else record.get(column)


def _extras(record: dict[str, Any], entry: DatasetEntry, out: dict[str, Any]) -> dict[str, Any]:
    """The columns kept by name (tools, media) and the kto tag, as a boolean `label`."""
    for part in PASSED_ON:
        if (value := _column(record, entry, part)) not in (None, "", []):
            out[part] = value
    if entry.columns.get("kto_tag") is not None:
        out["label"] = _column(record, entry, "kto_tag")
    return out


def _alpaca(record: dict[str, Any], entry: DatasetEntry, text: bool) -> dict[str, Any]:
    prompt, query = _column(record, entry, "prompt"), _column(record, entry, "query")
    if text:  # pre-training reads the prompt (and query) as its text
        return {"text": "\n".join(p for p in (prompt, query) if isinstance(p, str) and p)}
    out = {"instruction": prompt, "input": query, "output": _column(record, entry, "response")}
    for part in ("system", "history", "chosen", "rejected"):
        if (value := _column(record, entry, part)) is not None:
            out[part] = value
    if "chosen" in out:
        del out["output"]  # a pair's answers are its chosen and rejected ones
    return _extras(record, entry, out)


def _turn(turn: Any, entry: DatasetEntry) -> Any:
    """One turn by the entry's tags -> {"from", "value"} with snug's sharegpt role names."""
    if not isinstance(turn, dict):
        return turn  # named by the format's reader
    tags = entry.tags
    roles = {
        tags["user_tag"]: "human",
        tags["assistant_tag"]: "gpt",
        tags["system_tag"]: "system",
        tags["function_tag"]: "function_call",
        tags["observation_tag"]: "observation",
    }
    role = turn.get(tags["role_tag"])
    return {"from": roles.get(role, role), "value": turn.get(tags["content_tag"])}


def _sharegpt(record: dict[str, Any], entry: DatasetEntry, text: bool) -> dict[str, Any]:
    turns = _column(record, entry, "messages")
    messages = [_turn(t, entry) for t in turns] if isinstance(turns, list) else turns
    if text:  # pre-training: the conversation's first turn, as LLaMA-Factory reads it
        first = messages[0]["value"] if messages and isinstance(messages[0], dict) else None
        return {"text": first}
    out: dict[str, Any] = {"conversations": messages}
    if (system := _column(record, entry, "system")) is not None:
        out["system"] = system
    for part in ("chosen", "rejected"):
        if (value := _column(record, entry, part)) is not None:
            out[part] = _turn(value, entry)
    return _extras(record, entry, out)
