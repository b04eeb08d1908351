"""The self-describing run folder: resolved config, results.json, expert_plan.json, checkpoint.

``results.json`` carries ``complete: true`` only once everything else is written, and
``config_hash`` (a hash of the resolved config minus keys that do not change results), so that a
rerun can recognise finished work and skip it.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stun_exp.tracking.files import atomic_write_json, read_json

# Keys that never change a run's numbers: excluded from the config hash.
HASH_EXCLUDE = {"out_root", "resume", "logger", "name", "hydra", "save_checkpoint", "sweep"}
PACKAGES = ["torch", "transformers", "lm_eval", "hydra-core", "omegaconf", "datasets", "wandb", "numpy",
            "stun-exp"]


def resolved_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def config_hash(cfg: DictConfig | dict) -> str:
    d = resolved_dict(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    d = {k: v for k, v in d.items() if k not in HASH_EXCLUDE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=5)
        if r.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def is_complete(run_dir: str | Path) -> bool:
    """True when the folder holds a whole, finished results.json."""
    p = Path(run_dir) / "results.json"
    if not p.is_file():
        return False
    try:
        return bool(read_json(p).get("complete"))
    except (json.JSONDecodeError, OSError):
        return False


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    p = Path(run_dir) / "results.json"
    atomic_write_json(p, results)
    return p


def environment() -> dict[str, Any]:
    return {"versions": package_versions(), "git_commit": git_commit(), "argv": sys.argv,
            "platform": platform.platform()}
