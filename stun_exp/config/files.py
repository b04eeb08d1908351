"""Torch-free file checks, run before any model loads: model folders, safetensors headers, text files,
the output root. Each failure is one line naming the key and the path (a corrupt file is named)."""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Optional

from stun_exp.errors import ConfigError, DataError

_SAFETENSORS_HEADER_MAX = 100 * 2**20


# ---- output ---------------------------------------------------------------------------------------
def check_out_root(out_root: str) -> None:
    """The nearest existing ancestor of out_root must let us create folders and files."""
    p = Path(os.path.expanduser(str(out_root))).resolve()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError("out_root", str(out_root), "a directory path", hint=f"{probe} is a file")
    if p.exists():
        try:
            tempfile.TemporaryFile(dir=p).close()
            return
        except OSError as e:
            raise ConfigError("out_root", str(out_root), "a writable directory", hint=e.strerror or str(e)) from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("out_root", str(out_root), "a writable directory", hint=f"cannot create it under {probe}")


# ---- model files -----------------------------------------------------------------------------------
def check_model_dir(key: str, name_or_path: str) -> None:
    """config.json present and the weight files readable (a hub id is resolved to its cache snapshot)."""
    d = _local_dir(name_or_path)
    if d is None:
        return
    if not (d / "config.json").is_file():
        raise ConfigError(key, str(name_or_path), "a model directory holding config.json",
                          hint=f"no config.json in {d}")
    try:
        json.loads((d / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{key}={name_or_path}: config.json is not readable JSON ({e})") from None
    index = d / "model.safetensors.index.json"
    files = sorted(d.glob("*.safetensors"))
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise DataError(f"{key}={name_or_path}: {index.name} is not a safetensors index ({e})") from None
        absent = [s for s in shards if not (d / s).is_file()]
        if absent:
            raise DataError(f"{key}={name_or_path}: shard(s) named in {index.name} are missing: {absent[:4]}")
        files = [d / s for s in shards]
    if not files and not any(d.glob("*.bin")) and not any(d.glob("*.pt")):
        raise DataError(f"{key}={name_or_path}: no weights (*.safetensors or *.bin) in {d}")
    for f in files:
        check_safetensors(key, f)


def _local_dir(name_or_path: str) -> Optional[Path]:
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_dir():
        return p
    from stun_exp.models.loading import cached_snapshot
    snap = cached_snapshot(str(name_or_path))
    return Path(snap) if snap else None


def check_safetensors(key: str, path: Path) -> None:
    """Parse the header and check that every tensor's data lies inside the file (no torch needed)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, _SAFETENSORS_HEADER_MAX):
                raise ValueError(f"header length {n} does not fit in the file ({size} bytes)")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: {path} is not a readable safetensors file ({e})") from None
    if 8 + n + end > size:
        raise DataError(f"{key}: {path} is truncated ({size} bytes; its header needs {8 + n + end})")


def check_text(path: str, text_field: str) -> None:
    """UTF-8 text with at least one document; JSON lines must each be an object with the text field."""
    p = Path(os.path.expanduser(path))
    key = "calib.path"
    raw = p.read_bytes()
    if b"\x00" in raw[:1 << 20]:
        raise DataError(f"{key}={path}: a binary file, expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{key}={path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{key}={path}: the file is empty")
    if p.suffix not in (".jsonl", ".json"):
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{key}={path}: line {i} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise DataError(f"{key}={path}: line {i} has no string field calib.text_field={text_field!r}")
