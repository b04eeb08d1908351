"""The dense model's weight analysis (census + kurtosis), cached per checkpoint.

Every run of a sweep over one checkpoint starts from the same dense weights, so their census and
kurtosis are the same numbers each time; a run that finds them cached skips one read of every
weight (about 0.1 s per 65 M float32 weights on two CPU cores, a minute or more for a 47 B model,
a full layer-by-layer read of the checkpoint under ``runtime=streaming``).

The key is everything the numbers depend on: the checkpoint's files (name, size, inode, mtime_ns
and ctime_ns of each: a rewritten or replaced file changes its ctime, which tools cannot set back),
the resolved ``model`` config node, the dtype and device type the weights were read in, the
runtime, the source of the analysis and model-adapter code, and whether the analysis' C scan is
built. A model with no local files to fingerprint is never cached. On a filesystem with coarse
timestamps, a checkpoint rewritten within the same tick at the same size would not be noticed:
``analysis_cache=false`` turns the cache off.
Entries are written atomically but not fsynced (an unreadable entry is recomputed and replaced).
``results.json`` records ``dense_analysis: {"cache": "hit" | "miss" | "off" | "no key", "key": ...}``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

SUBDIR = "dense_analysis"


def checkpoint_files(source: str) -> Optional[list[list]]:
    """[name, size, inode, mtime_ns, ctime_ns] of every file of a local checkpoint folder (a Hub id
    resolves to its cached snapshot; links are followed to the files they name); None without one."""
    path = Path(source).expanduser()
    if not path.is_dir():
        from stun_exp.models.loading import cached_snapshot
        snap = cached_snapshot(source)
        if snap is None:
            return None
        path = Path(snap)
    out = []
    for p in sorted(path.iterdir()):
        if p.is_file():
            st = p.stat()
            out.append([p.name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    return out or None


def code_digest() -> str:
    """sha256 of the analysis and model-adapter sources (a change there may change the numbers) and
    of whether the analysis' C scan is built (its sums round differently from the torch engine's)."""
    from stun_exp.analysis import weight_report
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in ("analysis", "models"):
        for p in sorted(q for pattern in ("*.py", "*.c") for q in (root / sub).glob(pattern)):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(b"native scan" if weight_report.native is not None else b"torch scan")
    return h.hexdigest()


def cache_key(source: str, model_cfg: dict, dtype: str, device: str, runtime: str) -> Optional[str]:
    files = checkpoint_files(source)
    if files is None:
        return None
    blob = json.dumps({"files": files, "model": model_cfg, "dtype": dtype, "device": device,
                       "runtime": runtime, "code": code_digest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_report(cache_dir: Optional[Path], key: Optional[str],
                  compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the dense report {"census", "kurtosis"}, {"cache": state, "key": key}); ``compute`` runs on a
    miss and its result is written atomically (an unreadable entry is recomputed and replaced)."""
    if cache_dir is None:
        return compute(), {"cache": "off", "key": None}
    if key is None:
        return compute(), {"cache": "no key", "key": None}
    path = cache_dir / SUBDIR / f"{key}.json"
    if path.is_file():
        try:
            rep = json.loads(path.read_text())
            if set(rep) == {"census", "kurtosis"}:
                return rep, {"cache": "hit", "key": key}
        except (OSError, ValueError):
            pass
    rep = compute()
    from stun_exp.tracking.files import atomic_write_json
    try:
        atomic_write_json(path, {"census": rep["census"], "kurtosis": rep["kurtosis"]}, durable=False)
    except OSError:        # a read-only cache: the run goes on, it just is not cached
        return rep, {"cache": "miss (not written)", "key": key}
    return rep, {"cache": "miss", "key": key}


def default_cache_dir() -> Path:
    """``$STUN_EXP_CACHE`` (default ``~/.cache/stun_exp``), the toy models' cache root too."""
    return Path(os.path.expanduser(os.environ.get("STUN_EXP_CACHE", "~/.cache/stun_exp"))).resolve()
