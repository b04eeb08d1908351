"""Resumable runs and sweeps: skip finished work, redo incomplete work, summarise a multirun.

- A run folder that already holds a complete ``results.json`` is refused unless ``resume=true``;
  with ``resume=true`` an identical config (same ``config_hash``) completed anywhere under
  ``out_root`` is skipped and ``skipped.json`` points at it. Incomplete folders are redone.
- A failing job in a multirun writes ``error.json`` and the sweep goes on; ``SweepSummary`` (a Hydra
  callback) writes ``sweep_summary.json`` listing done / skipped / failed with reasons.
"""
from __future__ import annotations

import logging
import shutil
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
    for partial in run_dir.glob(".*.tmp-*"):          # half-written checkpoints of a killed attempt
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
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
    """Writes <sweep dir>/sweep_summary.json, a table and a plot of the finished jobs, prints counts;
    with ``logger=wandb`` the table and plot go to a summary run in the sweep's W&B group."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        s = summarise(sweep_dir)
        atomic_write_json(sweep_dir / "sweep_summary.json", s)
        print(f"sweep {sweep_dir}: " + ", ".join(f"{len(v)} {k}" for k, v in s.items()), flush=True)
        for f in s["failed"]:
            print(f"  failed job {f['job']}: {f['reason']}", flush=True)
        try:
            rows = sweep_rows(sweep_dir)
            plot = sweep_plot(sweep_dir, rows)
        except Exception as e:  # noqa: BLE001 — a summary must never fail the sweep
            log.warning("sweep table/plot failed (%s: %s)", type(e).__name__, e)
            return
        from stun_exp.tracking.wandb_logger import log_sweep
        log_sweep(config.get("logger"), sweep_dir, rows, plot)


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per finished job: its overrides and its flat metrics / sparsities."""
    rows = []
    for res in sorted(sweep_dir.glob("*/results.json")):
        r = read_json(res)
        if not r.get("complete"):
            continue
        ov = res.parent / ".hydra" / "overrides.yaml"
        row: dict[str, Any] = {"job": res.parent.name}
        if ov.is_file():
            for o in ov.read_text().splitlines():
                o = o.lstrip("- ").strip().strip("'\"")
                if "=" in o:
                    row[o.split("=", 1)[0]] = o.split("=", 1)[1]
        row.update({f"metrics/{k}": v for k, v in (r.get("metrics") or {}).items() if isinstance(v, (int, float))})
        row["sparsity/decoder_linear"] = (r.get("sparsity") or {}).get("decoder_linear")
        rows.append(row)
    if rows:
        import pandas as pd
        pd.DataFrame(rows).to_csv(sweep_dir / "sweep_table.csv", index=False)
    return rows


def sweep_plot(sweep_dir: Path, rows: list[dict]) -> Optional[Path]:
    """Each metric against the first swept numeric key (None when nothing numeric was swept)."""
    if len(rows) < 2:
        return None
    swept = [k for k in rows[0] if "/" not in k and k != "job" and len({str(r.get(k)) for r in rows}) > 1]
    x = next((k for k in swept if all(_is_number(r.get(k)) for r in rows)), None)
    metrics = [k for k in rows[0] if k.startswith(("metrics/", "sparsity/"))]
    if x is None or not metrics:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        pts = sorted((float(r[x]), r[m]) for r in rows if r.get(m) is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel(x)
        ax.set_title(m, fontsize=8)
    fig.tight_layout()
    out = sweep_dir / "sweep_plot.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
