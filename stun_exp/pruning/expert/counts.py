"""Expert counts from an expert-sparsity fraction. Torch-free: config validation imports it, and a
bad value must be reported before the heavy imports (the CLI's one-line error is under 5 s)."""
from __future__ import annotations

import math


def n_removed(expert_sparsity: float, n: int) -> int:
    """round-half-up(s·n): the experts removed from n (see selection.py's module doc)."""
    return int(math.floor(expert_sparsity * n + 0.5 + 1e-9))


def n_kept(expert_sparsity: float, n: int) -> int:
    return n - n_removed(expert_sparsity, n)


def group_floor(n_group: int, top_k: int, group_rule: str | None) -> int:
    """Fewest experts one routing group may keep (n_group <= 1: the whole layer, top_k).

    DeepSeek-V3's group score sums a group's top-2 scores (``top2sum``: >= 2 members); every group
    keeps at least its share of top_k so the layer never drops below top_k.
    """
    if n_group <= 1:
        return top_k
    return max(2 if group_rule == "top2sum" else 1, math.ceil(top_k / n_group))
