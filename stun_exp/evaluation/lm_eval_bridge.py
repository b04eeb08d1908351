"""Run lm-evaluation-harness on the in-memory (pruned) model: no save-and-reload.

The model is wrapped in ``HFLM(pretrained=model, tokenizer=tok)``. lm-eval applies one
``num_fewshot`` to all tasks of a call, so tasks are grouped by their few-shot count and
evaluated one call per group with the same wrapper. A task whose own YAML pins
``num_fewshot: 0`` keeps 0 whatever is asked (lm-eval's rule): the *effective* count that lm-eval
reports is what we record. ``bootstrap_iters=0`` (stderr bootstrap is slow and unused).

Pruned models may have a different expert count per layer, so ``config.num_local_experts`` no
longer describes every layer: router logits are switched off for the duration (the only code path
that reads that count at forward time is the auxiliary load-balancing loss).
"""
from __future__ import annotations

import difflib
import logging
from collections import defaultdict
from typing import Any, Mapping, Optional, Sequence

import torch

from stun_exp.errors import ConfigError
from stun_exp.evaluation.model_mode import eval_mode


def metric_key(task: str, lm_eval_key: str) -> Optional[str]:
    """'acc,none' -> 'task/acc'; 'exact_match,strict-match' -> 'task/exact_match_strict-match'.

    Returns None for stderr entries and non-metric fields (alias, samples).
    """
    if "," not in lm_eval_key or "_stderr" in lm_eval_key:
        return None
    metric, filt = lm_eval_key.split(",", 1)
    return f"{task}/{metric}" if filt == "none" else f"{task}/{metric}_{filt}"


def flatten_results(results: Mapping[str, Mapping[str, Any]], tasks: Sequence[str],
                    metrics: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Pick the requested tasks' metrics out of lm-eval's ``results`` block."""
    out: dict[str, float] = {}
    for task in tasks:
        if task not in results:
            raise KeyError(f"lm-eval returned no results for task '{task}' (got {sorted(results)})")
        wanted = metrics.get(task)
        found = {}
        for k, v in results[task].items():
            name = metric_key(task, k)
            if name is not None and isinstance(v, (int, float)):
                short = k[: -len(",none")] if k.endswith(",none") else k   # the config's metric name
                found[short] = (name, float(v))
        if wanted:
            missing = [m for m in wanted if m not in found]
            if missing:
                raise ConfigError(f"eval.metrics.{task}", missing, sorted(found))
            found = {m: found[m] for m in wanted}
        out.update(dict(found.values()))
    return out


def task_manager(include_path: Optional[str], include_defaults: bool) -> Any:
    """lm-eval TaskManager; indexing the ~15k built-in tasks costs ~6 s, so skip it when unneeded."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _limit(limit: Optional[float]) -> Optional[float | int]:
    if limit is None:
        return None
    return int(limit) if limit >= 1 else float(limit)


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], *,
                num_fewshot: Mapping[str, int] | None = None,
                metrics: Mapping[str, Sequence[str]] | None = None,
                include_path: Optional[str] = None, include_defaults: bool = True,
                limit: Optional[float] = None, batch_size: int = 8, max_length: Optional[int] = None,
                seeds: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Evaluate the in-memory model on lm-eval tasks.

    Returns ``{"<task>/<metric>": float, ..., "settings": {...}}`` where settings records the
    tasks, the requested and effective few-shot counts, limit, batch size, max length, the four
    lm-eval seeds and the lm-eval version.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    num_fewshot, metrics, seeds = dict(num_fewshot or {}), dict(metrics or {}), dict(seeds or {})
    groups: dict[int, list[str]] = defaultdict(list)
    for t in tasks:
        groups[int(num_fewshot.get(t, 0))].append(t)
    tm = task_manager(include_path, include_defaults)
    for t in tasks:
        if t not in tm.all_tasks:
            where = f"the task files in {include_path}" if include_path else "lm-eval's task registry"
            close = difflib.get_close_matches(t, list(tm.all_tasks), n=1)
            hint = f"not found in {where}" + (f"; did you mean '{close[0]}'?" if close else "")
            raise ConfigError("eval.tasks", t, list(tm.all_tasks)[:50], hint=hint)
    out: dict[str, Any] = {}
    n_shot: dict[str, int] = {}
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with eval_mode(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        for shots, group in sorted(groups.items()):
            res = lm_eval.simple_evaluate(
                model=lm, tasks=list(group), task_manager=tm, num_fewshot=shots,
                limit=_limit(limit), bootstrap_iters=0, log_samples=False, **seeds)
            out.update(flatten_results(res["results"], group, metrics))
            n_shot.update({t: int(res.get("n-shot", {}).get(t, shots)) for t in group})
    out["settings"] = {
        "tasks": list(tasks), "num_fewshot_requested": {t: int(num_fewshot.get(t, 0)) for t in tasks},
        "num_fewshot": n_shot, "metrics": {t: list(metrics.get(t, [])) for t in tasks},
        "limit": limit, "batch_size": batch_size, "max_length": lm.max_length,
        "bootstrap_iters": 0, "seeds": seeds, "lm_eval_version": lm_eval.__version__,
        "include_path": include_path}
    return out
