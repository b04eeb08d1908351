"""Layer-wise sparsity allocation: uniform and OWL (Yin et al. 2024; luuyin/OWL ``prune_all.py``).

OWL, as in the reference code:

1. Layer outlier distribution: pool the Wanda scores of every pruned matrix of decoder layer l
   into one vector a; D_l = 100 * |{i : a_i > M * mean(a)}| / |a|.
2. D~_l = (D_l - min D) / (max D - min D) * 2*lambda;  s_l = S + (D~_l - mean D~) ... with the
   sign that gives MORE outliers LOWER sparsity: s_l = S - (D~_l - mean_l D~_l);  s_l <= 0 -> 0.01.
   The unweighted mean of s_l is S (before the clamp), spread 2*lambda.
3. Equal D_l (max == min) would divide by zero in the reference; here it falls back to uniform.

``owl_weighting="params"`` (our extension, not in OWL's code): after expert pruning
layers hold different numbers of weights, so the unweighted mean no longer equals the parameter
sparsity. We shift all s_l by one constant c so that sum_l n_l s_l = S sum_l n_l, clamping to
[0.01, 0.99] and re-solving c over the unclamped layers.

N:M (reference ``prune_wanda_outlier_structure``): normalise D to [0, lambda] (not 2*lambda),
subtract the mean, round to integers r_l; layer l prunes N - r_l of every M.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

CLAMP_LO, CLAMP_HI = 0.01, 0.99


def outlier_ratio(scores: Sequence[Tensor] | Callable[[], Iterable[Tensor]], m: float) -> float:
    """Percent of pooled scores above m * their mean (OWL's layer outlier ratio D_l).

    Two streaming passes (sum, then count) instead of one concatenated copy: at Arctic scale the
    pooled scores of a layer are ~55 GB. ``scores`` may be a callable returning a fresh iterable,
    so that each matrix's scores are computed, used and freed one at a time. The mean is summed
    in fp64 (the reference concatenates and takes an fp32 mean; the two agree to rounding).
    """
    make = scores if callable(scores) else (lambda: scores)
    total, n = 0.0, 0
    for s in make():
        total += float(s.detach().double().sum())
        n += s.numel()
    if n == 0:
        return 0.0
    if not math.isfinite(total):
        return math.nan            # an overflowing score: the caller stops naming the layer
    thr = m * total / n
    count = sum(int((s.detach().float() > thr).sum()) for s in make())
    return count * 100.0 / n


def _normalise(d: Tensor, span: float) -> Tensor:
    """Min-max to [0, span]; all-equal inputs map to zeros (-> uniform allocation)."""
    lo, hi = d.min(), d.max()
    if float(hi - lo) == 0.0:
        return torch.zeros_like(d)
    return (d - lo) / (hi - lo) * span


def owl_sparsities(ratios: Sequence[float], target: float, lam: float,
                   weights: Optional[Sequence[float]] = None) -> list[float]:
    """Per-layer sparsities from outlier ratios D_l (percent), target S and lambda.

    weights=None: the reference rule (unweighted mean S, s <= 0 -> 0.01).
    weights=n_l: shift so that the n_l-weighted mean is S (see module docstring).
    """
    d = torch.tensor(list(ratios), dtype=torch.float64)
    dn = _normalise(d, 2.0 * lam)
    base = target - (dn - dn.mean())
    if weights is None:
        return [CLAMP_LO if s <= 0 else float(s) for s in base.tolist()]
    n = torch.tensor(list(weights), dtype=torch.float64)
    return _weighted_shift(base, n, target)


def _weighted_shift(base: Tensor, n: Tensor, target: float, iters: int = 50) -> list[float]:
    """Find c with sum n (clamp(base + c)) = target * sum n (clamped layers held fixed)."""
    free = torch.ones_like(base, dtype=torch.bool)
    s = base.clone()
    for _ in range(iters):
        fixed_mass = (n * s)[~free].sum()
        c = (target * n.sum() - fixed_mass - (n * base)[free].sum()) / n[free].sum()
        s = torch.where(free, base + c, s)
        out = free & ((s < CLAMP_LO) | (s > CLAMP_HI))
        if not out.any():
            break
        s = torch.where(out, s.clamp(CLAMP_LO, CLAMP_HI), s)
        free &= ~out
        if not free.any():
            break
    return [float(v) for v in s.tolist()]


def owl_nm_offsets(ratios: Sequence[float], lam: float) -> list[int]:
    """Integer offsets r_l for OWL N:M: layer l prunes N - r_l of every M (reference rule)."""
    d = torch.tensor(list(ratios), dtype=torch.float64)
    dn = _normalise(d, lam)
    return [int(v) for v in torch.round(dn - dn.mean()).tolist()]


def uniform_sparsities(n_layers: int, target: float) -> list[float]:
    return [float(target)] * n_layers


ALLOCATIONS = ("uniform", "owl")
