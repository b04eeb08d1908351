"""Run folders -> one flat record per finished run -> a pandas frame.

Only ``results.json`` files with ``"complete": true`` count. Records are flattened with ``.``
(``config.expert_pruner.name``, ``metrics.toy_arith/exact_match``, ``sparsity.decoder_linear``,
``timings.expert_pruning``, ``kurtosis.after_expert.model.expert_mean``); lists (per-matrix
kurtosis, per-layer tables) are left out. The same config hash found in several folders (a rerun,
a copied folder) counts once: the first folder in sorted path order.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

KEEP = ("config", "metrics", "sparsity", "timings", "counters", "kurtosis", "memory", "unstructured_pruning",
        "expert_pruning", "dense_metrics")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            if all(isinstance(x, (str, int, float, bool)) or x is None for x in v) and len(v) <= 64:
                out[key] = json.dumps(list(v))   # short scalar lists (task names) stay matchable
        else:
            out[key] = v
    return out


def run_record(results: Mapping[str, Any], run_dir: str) -> dict[str, Any]:
    rec = flatten({k: results[k] for k in KEEP if isinstance(results.get(k), Mapping)})
    rec.update({"config_hash": results.get("config_hash"), "seed": results.get("seed"), "run_dir": run_dir})
    return rec


def find_results(roots: Iterable[str | Path]) -> list[Path]:
    files: set[Path] = set()
    for r in roots:
        files.update(Path(r).glob("**/results.json"))
    return sorted(files)


def collect_runs(roots: Iterable[str | Path] | str | Path) -> pd.DataFrame:
    """One row per complete run (deduplicated by config hash) under the given folders."""
    if isinstance(roots, (str, Path)):
        roots = [roots]
    rows, seen = [], set()
    for p in find_results(roots):
        try:
            res = json.loads(p.read_text())
        except (OSError, ValueError):
            continue        # a half-written or corrupt file is not a finished run
        if not res.get("complete") or res.get("skipped"):
            continue
        h = res.get("config_hash")
        if h is not None and h in seen:
            continue
        seen.add(h)
        rows.append(run_record(res, str(p.parent)))
    return pd.DataFrame(rows)


def same(a: Any, b: Any) -> bool:
    """Loose equality for matching YAML values against run values (0.4 == 0.40, None == 'null')."""
    if isinstance(b, (list, tuple)):
        return any(same(a, x) for x in b)
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        norm = lambda v: None if v is None or v == "null" or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
        return norm(a) == norm(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(a) == str(b)


def matches(rec: Mapping[str, Any], conditions: Mapping[str, Any]) -> bool:
    return all(same(rec.get(k), v) for k, v in conditions.items())
