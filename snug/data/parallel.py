"""Run a tokenizing map in several processes (data.num_proc), telling the progress as it goes,
and keep its result on disk for the next run also when the records were read into memory.

`datasets.Dataset.map(num_proc=n)` shards the records and maps each shard in a worker process
(multiprocess, which pickles with dill: the tokenizer, the chat template and the record
locator go along). It shows its own progress only as a tqdm bar: the workers tell the records
they tokenized to a queue here, which a thread passes on to the Phase on screen.

A source that `datasets` read from files has cache files, next to which map() keeps its
result; one read into memory (sources.py reads JSON arrays and JSON it cannot read itself) has
none, so map() would keep the result in memory only and tokenize again next run. Such a result
is written under datasets' cache directory instead (`in_memory_cache`), named by the
fingerprint map_cached gives: the records' content, the lines they came from and everything
that changes the tokens.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import multiprocess
from datasets import Dataset

MAX_AUTO_PROCS = 8  # data.num_proc unset: at most this many processes
RECORDS_PER_PROC = 1_000  # data.num_proc unset: fewer records a process than this run in this one
CACHE_DIR = "snug-tokenized"  # under datasets' cache: results of sources read into memory


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def processes(num_proc: int | None, records: int) -> int:
    """How many processes tokenize `records` records: data.num_proc (1: this process), or
    unset, up to MAX_AUTO_PROCS while each gets RECORDS_PER_PROC records; never more than the
    usable cores (more would only share them) nor than the records."""
    if num_proc is None:
        num_proc = min(MAX_AUTO_PROCS, records // RECORDS_PER_PROC)
    return max(1, min(num_proc, usable_cores(), records))


def in_memory_cache(raw: Dataset, fingerprint: str) -> str | None:
    """Where map() keeps the result of `raw` when `raw` is held in memory (no cache files), in
    datasets' cache directory (HF_DATASETS_CACHE); None when datasets' caching is off or `raw`
    has cache files of its own (map() keeps its result beside them)."""
    if raw.cache_files or not datasets.is_caching_enabled():
        return None
    folder = Path(datasets.config.HF_DATASETS_CACHE) / CACHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{fingerprint}.arrow")


def told(fn: Callable, progress: Callable[[int], None]) -> Callable:
    """`fn`, a batched map function, telling `progress` how many records each batch held."""

    def counted(records: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = fn(records, indices)
        progress(len(indices))
        return out

    return counted


def run_map(
    raw: Dataset,
    fn: Callable,
    num_proc: int,
    progress: Callable[[int], None] | None,
    **kwargs: Any,
) -> Dataset:
    """`raw.map(fn, **kwargs)` in `num_proc` processes (1: this one), `progress` hearing the
    records of each batch tokenized, in this process whichever process tokenized them."""
    if num_proc == 1:
        return raw.map(fn if progress is None else told(fn, progress), **kwargs)
    if progress is None:
        return raw.map(fn, num_proc=num_proc, **kwargs)
    with multiprocess.Manager() as manager:  # its queue proxy pickles into the workers
        queue = manager.Queue()
        thread = threading.Thread(target=_pass_on, args=(queue, progress), daemon=True)
        thread.start()
        try:
            return raw.map(told(fn, queue.put), num_proc=num_proc, **kwargs)
        finally:
            queue.put(None)
            thread.join()


def _pass_on(queue: Any, progress: Callable[[int], None]) -> None:
    """Tell `progress` each count the workers put in `queue`, until None."""
    while (n := queue.get()) is not None:
        progress(n)
