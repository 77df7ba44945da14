"""A base model's fingerprint: which weights an adapter was trained on, cheap to take on 70B.

An adapter loads onto any base of the right shape and answers garbage on the wrong one; the
path or hub id alone does not say which weights were there (a directory re-saved, a revision
moved). The fingerprint hashes config.json and, from every safetensors file, each tensor's name,
dtype and shape and its bytes: all of them while the weights total at most FULL_HASH_BYTES,
above that 16 evenly spaced 64-byte samples of every tensor (a few MB read from a 140 GB 70B
model). Headers alone would be the same for every model of one shape. Pure Python and the
safetensors header format (8-byte length, JSON): no torch, no weights loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECORD = "snug_base.json"  # written into a run's adapter/ beside adapter_config.json
FULL_HASH_BYTES = 2 << 30  # hash every byte of bases up to 2 GiB of weights
SAMPLES, SAMPLE_BYTES = 16, 64


class FingerprintError(ValueError):
    """A weights file could not be read to take the fingerprint."""


def _header(f) -> tuple[dict, int]:
    n = int.from_bytes(f.read(8), "little")
    if not 0 < n < 100 << 20:
        raise FingerprintError(f"{f.name}: not a safetensors file")
    try:
        return json.loads(f.read(n)), 8 + n
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FingerprintError(f"{f.name}: not a safetensors file (bad header)") from None


def _hash_file(path: Path, h, full: bool) -> None:
    with open(path, "rb") as f:
        header, start = _header(f)
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            begin, end = info["data_offsets"]
            h.update(json.dumps([name, info["dtype"], info["shape"], end - begin]).encode())
            if full or end - begin <= SAMPLES * SAMPLE_BYTES:
                f.seek(start + begin)
                h.update(f.read(end - begin))
                continue
            step = (end - begin - SAMPLE_BYTES) // (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(start + begin + i * step)
                h.update(f.read(SAMPLE_BYTES))


def fingerprint(model_dir: str | Path) -> str:
    """'sha256:<hex>' of a local model directory (config.json plus its safetensors weights)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    h = hashlib.sha256()
    config = model_dir / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    full = sum(p.stat().st_size for p in files) <= FULL_HASH_BYTES
    for path in files:
        h.update(path.name.encode())
        _hash_file(path, h, full)
    return "sha256:" + h.hexdigest()[:32]


def local_dir(name_or_path: str, revision: str | None) -> Path | None:
    """The directory holding the base's files: itself, or a hub model's cached snapshot (None
    when it is not in the cache)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name_or_path,
            revision=revision,
            local_files_only=True,
            allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"],
        )
    except Exception:  # not cached, or not a hub id: nothing to fingerprint
        return None
    return Path(folder)


def base_record(mcfg, given: str | None = None) -> dict:
    """What a run records of its base (`mcfg`: the model section; `given`: what the user wrote,
    when the path was made absolute): where, which revision, the fingerprint, and whether its
    own code was trusted to run."""
    folder = local_dir(mcfg.name_or_path, mcfg.revision)
    return {
        "name_or_path": mcfg.name_or_path,
        "given": given,
        "revision": mcfg.revision,
        "snapshot": None if folder is None or Path(mcfg.name_or_path).is_dir() else folder.name,
        "fingerprint": fingerprint(folder) if folder is not None else None,
        "trust_remote_code": mcfg.trust_remote_code,
    }


def write_base_record(adapter_dir: Path, record: dict) -> None:
    (Path(adapter_dir) / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_base_record(adapter_dir: Path) -> dict | None:
    """The record a snug run left beside its adapter, or None (an adapter from elsewhere, or a
    damaged record: then there is nothing to check against)."""
    path = Path(adapter_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return record if isinstance(record, dict) and record.get("fingerprint") else None
