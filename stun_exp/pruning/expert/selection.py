"""Shared rules for score-based expert pruners: how many to remove, and which.

Rounding rule (all pruners): experts removed = round-half-up(expert_sparsity × n), i.e.
``floor(s·n + 0.5)`` (with a 1e-9 guard against binary fractions such as 0.3·10 = 2.999…). Per layer
for ``scope=layer``; over the total expert count for ``scope=global`` and for STUN's target. A layer
never keeps fewer than ``top_k`` experts: validation rejects such a sparsity, and the global ranking
skips experts whose removal would break it.

Ranking rule: lower score = removed first; equal scores → the lower expert id (then the lower layer
index, for ``global``) is removed first. This is a stable ascending sort on (score, layer, id).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch


def n_removed(expert_sparsity: float, n: int) -> int:
    """round-half-up(s·n), see module doc."""
    return int(math.floor(expert_sparsity * n + 0.5 + 1e-9))


def n_kept(expert_sparsity: float, n: int) -> int:
    return n - n_removed(expert_sparsity, n)


def keep_layerwise(scores: Sequence[float] | torch.Tensor, expert_sparsity: float,
                   top_k: int) -> list[int]:
    """Kept ids (ascending) of one layer: drop the round-half-up(s·n) lowest-scored experts."""
    s = [float(x) for x in scores]
    drop = n_removed(expert_sparsity, len(s))
    if len(s) - drop < top_k:
        raise ValueError(f"expert_sparsity={expert_sparsity} keeps {len(s) - drop} of {len(s)} "
                         f"experts, fewer than top_k={top_k}")
    order = sorted(range(len(s)), key=lambda e: (s[e], e))
    return sorted(order[drop:])


def keep_global(scores: Mapping[int, Sequence[float] | torch.Tensor], expert_sparsity: float,
                top_k: int) -> dict[int, list[int]]:
    """One ranking over all (layer, expert): remove round-half-up(s·total) lowest, ≥ top_k per layer."""
    flat = [(float(x), l, e) for l, row in scores.items() for e, x in enumerate(row)]
    left = {l: len(row) for l, row in scores.items()}
    drop = n_removed(expert_sparsity, len(flat))
    removed: set[tuple[int, int]] = set()
    for _, l, e in sorted(flat):
        if len(removed) == drop:
            break
        if left[l] > top_k:
            removed.add((l, e))
            left[l] -= 1
    if len(removed) < drop:
        raise ValueError(f"expert_sparsity={expert_sparsity} removes {drop} experts but only "
                         f"{len(removed)} can go while keeping top_k={top_k} per layer")
    return {l: [e for e in range(len(row)) if (l, e) not in removed] for l, row in scores.items()}


def select(scores: Mapping[int, Sequence[float] | torch.Tensor], expert_sparsity: float,
           top_k: int, scope: str) -> dict[int, list[int]]:
    """Kept ids per layer for ``scope`` in {layer, global}."""
    if scope == "layer":
        return {l: keep_layerwise(s, expert_sparsity, top_k) for l, s in scores.items()}
    if scope == "global":
        return keep_global(scores, expert_sparsity, top_k)
    raise ValueError(f"unknown scope {scope!r}; known: layer, global")
