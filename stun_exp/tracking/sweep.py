"""Resumable runs and sweeps: skip finished work, redo incomplete work, summarise a multirun.

- A run folder that already holds a complete ``results.json`` is refused unless ``resume=true``;
  with ``resume=true`` an identical config (same ``config_hash``) completed anywhere under
  ``out_root`` is skipped and ``skipped.json`` points at it. Incomplete folders are redone.
- A failing job in a multirun writes ``error.json`` and the sweep goes on; ``SweepSummary`` (a Hydra
  callback) writes ``sweep_summary.json`` listing done / skipped / failed with reasons.
"""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from stun_exp.errors import ConfigError
from stun_exp.tracking.files import atomic_write_json, read_json
from stun_exp.tracking.run_record import is_complete

log = logging.getLogger(__name__)


def find_complete(out_root: str | Path, chash: str) -> Optional[Path]:
    """A run folder under out_root whose complete results.json has this config hash."""
    for p in sorted(Path(out_root).glob("**/results.json")):
        try:
            r = read_json(p)
        except (OSError, ValueError):
            continue
        if r.get("complete") and r.get("config_hash") == chash:
            return p.parent
    return None


def check_run_dir(cfg: DictConfig, run_dir: Path, chash: str) -> Optional[dict[str, Any]]:
    """None to go ahead; the earlier results (marked skipped) when this work is already done."""
    if is_complete(run_dir):
        if not cfg.resume:
            raise ConfigError("hydra.run.dir", str(run_dir),
                              "a folder without a finished run (pass resume=true to skip finished work)")
        prev = read_json(run_dir / "results.json")
        if prev.get("config_hash") != chash:
            raise ConfigError("hydra.run.dir", str(run_dir), f"a folder whose finished run has the same "
                              f"config (it holds config_hash {prev.get('config_hash')}, this run is {chash})")
        return _skipped(run_dir, run_dir, prev)
    if cfg.resume:
        done = find_complete(cfg.out_root, chash)
        if done is not None:
            return _skipped(run_dir, done, read_json(done / "results.json"))
    for stale in ("error.json", "skipped.json"):
        (run_dir / stale).unlink(missing_ok=True)
    return None


def _skipped(run_dir: Path, done: Path, prev: dict[str, Any]) -> dict[str, Any]:
    log.info("skipped: identical config already complete in %s", done)
    atomic_write_json(run_dir / "skipped.json", {"complete_run": str(done), "config_hash": prev["config_hash"]})
    prev = dict(prev)
    prev["skipped"] = True
    prev.setdefault("summary", "")
    return prev


def record_failure(run_dir: Optional[str], err: BaseException) -> None:
    if not run_dir:
        return
    atomic_write_json(Path(run_dir) / "error.json", {
        "error": f"{type(err).__name__}: {err}",
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-4000:]})


def summarise(sweep_dir: str | Path) -> dict[str, list]:
    out: dict[str, list] = {"done": [], "skipped": [], "failed": [], "incomplete": []}
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (job / "skipped.json").is_file():
            out["skipped"].append({"job": job.name, **read_json(job / "skipped.json")})
        elif is_complete(job):
            out["done"].append({"job": job.name})
        elif (job / "error.json").is_file():
            out["failed"].append({"job": job.name, "reason": read_json(job / "error.json")["error"]})
        else:
            out["incomplete"].append({"job": job.name})
    return out


class SweepSummary(Callback):
    """Writes <sweep dir>/sweep_summary.json and prints counts when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        s = summarise(sweep_dir)
        atomic_write_json(sweep_dir / "sweep_summary.json", s)
        print(f"sweep {sweep_dir}: " + ", ".join(f"{len(v)} {k}" for k, v in s.items()), flush=True)
        for f in s["failed"]:
            print(f"  failed job {f['job']}: {f['reason']}", flush=True)
