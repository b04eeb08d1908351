"""Weights & Biases: a run a user can watch while it runs.

``RunLogger.start`` opens the W&B run when the run starts (resolved config, tags, group = the Hydra
sweep folder, so a sweep's jobs sit together); every finished stage logs its time, every pruned layer
its result as it is produced (``progress``); ``finish`` puts the metrics and the sparsity ledger in
the run summary and attaches the per-layer table and the run files. Offline mode
(``logger.mode=offline``) writes under ``<run>/wandb/``: ``wandb sync <run>/wandb/offline-run-*``
uploads it later. Any W&B failure (no network, a bad key) warns once and the run goes on: the run
folder is always written first and is the source of truth.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)
INIT_TIMEOUT_S = 30     # an unreachable server in online mode costs at most this, then the run goes on


class RunLogger:
    """A W&B run, or a no-op when ``logger=none`` or W&B failed."""

    def __init__(self, run: Any = None) -> None:
        self.run = run
        self.step = 0

    @classmethod
    def start(cls, logger_cfg: Any, run_dir: Optional[Path], config: dict) -> "RunLogger":
        if logger_cfg is None or logger_cfg.name != "wandb":
            return cls()
        try:
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            where = Path(run_dir) if run_dir else Path.cwd()
            run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
                             group=logger_cfg.group or sweep_group(where), tags=list(logger_cfg.tags or []),
                             config=config, dir=str(where), name=where.name, reinit="finish_previous",
                             job_type="prune", settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S))
            return cls(run)
        except Exception as e:  # noqa: BLE001 — tracking must never stop a run
            log.warning("W&B start failed (%s: %s); the run goes on, results are written locally", type(e).__name__, e)
            return cls()

    def _safe(self, what: str, fn: Any) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log.warning("W&B %s failed (%s: %s); logging stops, the run goes on", what, type(e).__name__, e)
            self.run = None

    def stage(self, name: str, seconds: float) -> None:
        self.step += 1
        self._safe("log", lambda: self.run.log({f"time/{name}": seconds, "stage": name}, step=self.step))

    def progress(self, stage: str, row: dict) -> None:
        """One result as it is produced, e.g. ``("unstructured", {"layer": 3, "achieved": 0.5, ...})``."""
        self.step += 1
        flat = _flat(row, stage)
        self._safe("log", lambda: self.run.log(flat, step=self.step))

    def finish(self, results: dict, layer_table: list[dict], files: list[Path]) -> None:
        def do() -> None:
            import pandas as pd
            import wandb
            summary = _flat(results.get("metrics", {}), "metrics") | _flat(results.get("sparsity", {}), "sparsity") \
                | _flat(results.get("dense_metrics", {}), "dense") | _flat(results.get("timings", {}), "time")
            self.run.summary.update(summary)
            if layer_table:
                self.run.log({"per_layer": wandb.Table(dataframe=pd.DataFrame(layer_table))}, step=self.step + 1)
            for f in files:
                if Path(f).is_file():
                    self.run.save(str(f), base_path=str(Path(f).parent), policy="now")
            self.run.finish()
        self._safe("finish", do)
        self.run = None

    def fail(self, err: BaseException) -> None:
        """Mark the W&B run failed (the local error record is written by the caller)."""
        def do() -> None:
            self.run.summary["error"] = f"{type(err).__name__}: {err}"[:500]
            self.run.finish(exit_code=1)
        self._safe("finish", do)
        self.run = None


def sweep_group(run_dir: Path) -> Optional[str]:
    """The Hydra sweep a job belongs to (``<out_root>/multirun/<date>/<time>/<job>``), else None."""
    parts = run_dir.resolve().parts
    if "multirun" in parts:
        i = parts.index("multirun")
        return "/".join(parts[i + 1:-1]) or None
    return None


def log_sweep(logger_cfg: Any, sweep_dir: Path, rows: list[dict], plot: Optional[Path]) -> None:
    """A summary run in the sweep's group: one table row per job, and the sweep plot."""
    if logger_cfg is None or logger_cfg.get("name") != "wandb" or not rows:
        return
    try:
        import pandas as pd
        import wandb
        run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
                         group=logger_cfg.get("group") or sweep_group(sweep_dir / "summary"),
                         job_type="sweep_summary", name=f"{sweep_dir.name}-summary", dir=str(sweep_dir),
                         reinit="finish_previous", settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S))
        run.log({"sweep": wandb.Table(dataframe=pd.DataFrame(rows))})
        if plot is not None and plot.is_file():
            run.log({"sweep_plot": wandb.Image(str(plot))})
        run.finish()
    except Exception as e:  # noqa: BLE001
        log.warning("W&B sweep summary failed (%s: %s)", type(e).__name__, e)


def _flat(d: dict, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out |= _flat(v, key)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out
