"""Kurtosis of weights: STUN's proxy for robustness to later unstructured pruning.

Definitions (libraries differ, so both are always reported)::

    mu = mean(w), m2 = mean((w - mu)^2), m4 = mean((w - mu)^4)
    plain (Pearson) kurtosis  k    = m4 / m2^2     (normal = 3, uniform = 1.8, Laplace = 6)
    excess (Fisher) kurtosis  k_ex = k - 3         (= scipy.stats.kurtosis(fisher=True, bias=True))

Moments are computed in float64 with two passes over fixed-size chunks (mean first, then the
central sums), so a 100M-entry expert matrix never needs a float64 copy of itself.

Granularity (STUN's released code has no kurtosis computation and the paper's convention was not
recoverable, see reference/methods.md §H; this is our stated default):
  * per matrix: each expert's gate/up/down, each attention projection, the router;
  * per layer: unweighted mean over that layer's expert matrices, and the *pooled* kurtosis of all
    expert entries of the layer together (pooling matrices of different variance inflates it);
  * model-wide: unweighted mean over matrices and parameter-count-weighted mean, both for expert
    matrices only and for every targeted matrix; the mean over layers of the per-layer pooled value;
    and the pooled kurtosis of all expert entries / all targeted entries of the model as one sample
    (the paper's reported values, ~1.4e4, are only plausible for a pooled figure of that kind).
Measure dense weights (before unstructured pruning): the spike of zeros left by masks distorts the
value. ``nonzero_only=True`` uses only the non-zero entries, for pruned models; the report says so.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

CHUNK = 1 << 22  # entries per float64 chunk (32 MiB)
CONVENTION = "plain = m4/m2^2 (normal = 3); excess = plain - 3; fp64 two-pass moments"


def _chunks(t: torch.Tensor, nonzero_only: bool, chunk: int) -> Iterable[torch.Tensor]:
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), chunk):
        c = flat[i:i + chunk].to(torch.float64)
        yield c[c != 0] if nonzero_only else c


def central_moments(tensors: Sequence[torch.Tensor], nonzero_only: bool = False,
                    chunk: int = CHUNK) -> tuple[int, float, float]:
    """(n, m2, m4) of all entries of ``tensors`` pooled together, in float64 (two passes)."""
    n, total = 0, 0.0
    for t in tensors:
        for c in _chunks(t, nonzero_only, chunk):
            n += c.numel()
            total += float(c.sum())
    if n == 0:
        return 0, math.nan, math.nan
    mu = total / n
    s2 = s4 = 0.0
    for t in tensors:
        for c in _chunks(t, nonzero_only, chunk):
            d2 = (c - mu).square_()
            s2 += float(d2.sum())
            s4 += float(d2.square_().sum())
    return n, s2 / n, s4 / n


def pooled_kurtosis(tensors: Sequence[torch.Tensor], excess: bool = False,
                    nonzero_only: bool = False, chunk: int = CHUNK) -> float:
    """Kurtosis of all entries of ``tensors`` taken as one sample (NaN when undefined)."""
    n, m2, m4 = central_moments(tensors, nonzero_only, chunk)
    if n < 2 or not m2 > 0:
        return math.nan
    k = m4 / (m2 * m2)
    return k - 3.0 if excess else k


def kurtosis(t: torch.Tensor, excess: bool = False, nonzero_only: bool = False,
             chunk: int = CHUNK) -> float:
    """Kurtosis of one tensor (all entries, or only the non-zero ones)."""
    return pooled_kurtosis([t], excess, nonzero_only, chunk)


def _mean(vals: Sequence[float], weights: Sequence[float] | None = None) -> float:
    pairs = [(v, 1.0 if weights is None else w) for v, w in
             zip(vals, weights if weights is not None else vals) if not math.isnan(v)]
    tot = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / tot if tot > 0 else math.nan


def summarize(rows: Sequence[dict], pooled: dict[int, float],
              model_pooled: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-layer and model-wide aggregates from per-matrix rows (keys layer, kind, n, kurtosis)."""
    per_layer: dict[str, dict[str, float]] = {}
    for layer in sorted({r["layer"] for r in rows}):
        lr = [r for r in rows if r["layer"] == layer]
        ex = [r["kurtosis"] for r in lr if r["kind"] == "expert"]
        per_layer[str(layer)] = {"expert_mean": _mean(ex), "expert_pooled": pooled.get(layer, math.nan),
                                 "all_mean": _mean([r["kurtosis"] for r in lr])}
    model: dict[str, float] = {}
    for scope, sel in (("expert", [r for r in rows if r["kind"] == "expert"]), ("all", list(rows))):
        vals, ns = [r["kurtosis"] for r in sel], [float(r["n"]) for r in sel]
        model[f"{scope}_mean"] = _mean(vals)
        model[f"{scope}_weighted"] = _mean(vals, ns)
    model["expert_pooled_layer_mean"] = _mean([per_layer[k]["expert_pooled"] for k in per_layer])
    model.update(model_pooled or {})
    for k in list(model):
        model[f"{k}_excess"] = model[k] - 3.0
    return {"per_layer": per_layer, "model": model}


def kurtosis_report(adapter: Any, nonzero_only: bool = False, chunk: int = CHUNK) -> dict[str, Any]:
    """Kurtosis of every prunable matrix of the model behind ``adapter`` (see module docstring).

    Returns ``{"nonzero_only", "convention", "per_matrix": [...], "per_layer": {layer: {...}},
    "model": {...}}``; per-layer and model values are plain kurtosis (``*_excess`` = minus 3).
    """
    rows: list[dict[str, Any]] = []
    pooled: dict[int, float] = {}
    everything = []
    for layer in range(len(adapter.layers)):
        targets = adapter.linear_targets(layer)
        everything.extend(targets)
        for t in targets:
            n = int((t.weight != 0).sum()) if nonzero_only else t.weight.numel()
            k = kurtosis(t.weight, nonzero_only=nonzero_only, chunk=chunk)
            rows.append({"layer": layer, "name": t.name, "kind": t.kind, "expert": t.expert,
                         "matrix": t.matrix, "n": n, "kurtosis": k, "excess_kurtosis": k - 3.0})
        experts = [t.weight for t in targets if t.kind == "expert"]
        if experts:
            pooled[layer] = pooled_kurtosis(experts, nonzero_only=nonzero_only, chunk=chunk)
    out = {"nonzero_only": nonzero_only,
           "label": "non-zero entries only" if nonzero_only else "all entries",
           "convention": CONVENTION, "per_matrix": rows}
    model_pooled = {"expert_pooled": pooled_kurtosis([t.weight for t in everything if t.kind == "expert"],
                                                     nonzero_only=nonzero_only, chunk=chunk),
                    "all_pooled": pooled_kurtosis([t.weight for t in everything], nonzero_only=nonzero_only,
                                                  chunk=chunk)}
    out.update(summarize(rows, pooled, model_pooled))
    return out
