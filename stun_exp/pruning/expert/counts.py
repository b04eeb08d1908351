"""Expert counts from an expert-sparsity fraction. Torch-free: config validation imports it, and a
bad value must be reported before the heavy imports (the CLI's one-line error is under 5 s)."""
from __future__ import annotations

import math


def n_removed(expert_sparsity: float, n: int) -> int:
    """round-half-up(s·n): the experts removed from n (see selection.py's module doc)."""
    return int(math.floor(expert_sparsity * n + 0.5 + 1e-9))


def n_kept(expert_sparsity: float, n: int) -> int:
    return n - n_removed(expert_sparsity, n)
