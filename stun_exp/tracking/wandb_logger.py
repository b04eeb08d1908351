"""Weights & Biases logging. Runs after the local files are written; any W&B failure warns and
the run continues (the run folder is the source of truth)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
INIT_TIMEOUT_S = 30     # an unreachable server in online mode costs at most this, then the run goes on


def log_run(logger_cfg: Any, run_dir: str | Path, config: dict, results: dict,
            layer_table: list[dict] | None = None, files: list[Path] | None = None) -> str | None:
    """Log config, flat metrics, a per-layer table and files. Returns the W&B run dir or None."""
    if logger_cfg is None or logger_cfg.name != "wandb":
        return None
    try:
        import pandas as pd
        import wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
                         group=logger_cfg.group, tags=list(logger_cfg.tags or []), config=config,
                         dir=str(run_dir), name=Path(run_dir).name, reinit="finish_previous",
                         settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S))
        run.log(_flat(results.get("metrics", {}), "metrics") | _flat(results.get("sparsity", {}), "sparsity")
                | _flat(results.get("timings", {}), "time"))
        if layer_table:
            run.log({"per_layer": wandb.Table(dataframe=pd.DataFrame(layer_table))})
        for f in files or []:
            if Path(f).is_file():
                run.save(str(f), base_path=str(run_dir), policy="now")
        out = run.dir
        run.finish()
        return out
    except Exception as e:  # noqa: BLE001 — tracking must never lose a finished run
        log.warning("W&B logging failed (%s: %s); results are safe in %s", type(e).__name__, e, run_dir)
        return None


def _flat(d: dict, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out |= _flat(v, key)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out
