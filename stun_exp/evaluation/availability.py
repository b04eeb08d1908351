"""Fail before pruning starts when an evaluation dataset cannot be had.

Pruning a large model takes hours; finding out afterwards that HellaSwag is not cached wastes
them. ``check_available`` looks for each hub dataset in the local Hugging Face caches (the
datasets cache ``<namespace>___<name>`` and the hub cache ``datasets--<namespace>--<name>``)
without touching the network. A dataset found in neither is missing when offline, or when
huggingface.co cannot be reached within a short socket timeout (instead of datasets' ~24 s
retry loop). All missing datasets are named in one error. The check is per dataset repository:
a partially cached MMLU (some subjects only) passes here and fails clearly in lm-eval later.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Iterable

from stun_exp.errors import ConfigError, DataError
from stun_exp.evaluation.configs import PAPER_TASKS, PPL_DATASETS, ToyEval, build_eval_config

HUB_HOST = ("huggingface.co", 443)


def cache_dirs() -> tuple[Path, Path]:
    """(datasets cache, hub cache) as the installed libraries resolve them from the environment."""
    import datasets
    from huggingface_hub import constants
    return Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)


def is_cached(repo_id: str, roots: tuple[Path, Path] | None = None) -> bool:
    """True when ``repo_id`` has an entry in the datasets cache or the hub cache."""
    ds_root, hub_root = roots or cache_dirs()
    candidates = [ds_root / repo_id.replace("/", "___"), hub_root / ("datasets--" + repo_id.replace("/", "--"))]
    return any(c.is_dir() and any(c.iterdir()) for c in candidates)


def offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def required_datasets(eval_cfg: Any) -> dict[str, tuple[str, ...]]:
    """{what needs it: hub ids that would satisfy it (aliases)} for an eval config."""
    cfg = build_eval_config(eval_cfg)
    if cfg.name == "paper":
        return {t: (PAPER_TASKS[t].dataset_path,) for t in cfg.tasks if PAPER_TASKS[t].dataset_path}
    if cfg.name == "ppl":
        return {d: PPL_DATASETS[d] for d in cfg.datasets}
    return {}


def missing_datasets(needs: dict[str, tuple[str, ...]], roots: tuple[Path, Path] | None = None) -> dict[str, str]:
    return {what: ids[0] for what, ids in needs.items() if not any(is_cached(i, roots) for i in ids)}


def check_toy_tasks(cfg: ToyEval, model_cfg: Any = None) -> None:
    """eval=toy needs the toy's task folder: an explicit eval.task_dir, or model=toy."""
    if cfg.task_dir:
        d = Path(cfg.task_dir)
        need = [d / "heldout.txt"] if cfg.ppl else []
        if not d.is_dir() or any(not p.is_file() for p in need):
            raise ConfigError("eval.task_dir", cfg.task_dir, "a folder of lm-eval task YAMLs"
                              + (" holding heldout.txt (or eval.ppl=false)" if cfg.ppl else ""))
    elif model_cfg is not None and model_cfg.get("kind", None) != "toy":
        raise ConfigError("eval", "toy", "eval=toy only with model=toy (or set eval.task_dir); "
                          "use eval=paper, eval=ppl or eval=none for other models")


def check_available(eval_cfg: Any, roots: tuple[Path, Path] | None = None, model_cfg: Any = None) -> None:
    """Raise (before any pruning) when the evaluation could not run: DataError naming every hub
    dataset that is neither cached nor downloadable now; ConfigError for a toy suite without task
    files. ``model_cfg`` (the run's ``cfg.model``, optional) lets eval=toy refuse a non-toy model."""
    cfg = build_eval_config(eval_cfg)
    if isinstance(cfg, ToyEval):
        check_toy_tasks(cfg, model_cfg)
    missing = missing_datasets(required_datasets(cfg), roots)
    if not missing:
        return
    if not offline() and hub_reachable():
        return  # datasets will download them
    roots = roots or cache_dirs()
    raise DataError(_message(missing, roots))


def _message(missing: dict[str, str], roots: Iterable[Path]) -> str:
    items = "; ".join(f"{what} needs '{repo}'" for what, repo in sorted(missing.items()))
    where = " or ".join(str(r) for r in roots)
    return (f"evaluation datasets not cached and the Hugging Face Hub is unreachable/offline: {items}. "
            f"Cache them on a machine with network (datasets.load_dataset(<id>)) and copy them into "
            f"{where}, or choose eval=toy / eval=none.")
