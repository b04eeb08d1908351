"""Shared rules for score-based expert pruners: how many to remove, and which.

Rounding rule (all pruners): experts removed = round-half-up(expert_sparsity × n), i.e.
``floor(s·n + 0.5)`` (with a 1e-9 guard against binary fractions such as 0.3·10 = 2.999…). Per layer
for ``scope=layer``; over the total expert count for ``scope=global`` and for STUN's target. A layer
never keeps fewer than ``top_k`` experts: validation rejects such a sparsity, and the global ranking
skips experts whose removal would break it.

Group-limited routers (DeepSeek ``n_group`` > 1 with group routing on): experts belong to routing
groups by position, and surgery needs the same number of survivors in every group. ``scope=layer``
then removes round-half-up(s·n)/n_group experts inside each group (the removed count must divide
evenly); ``scope=global`` is refused.

Ranking rule: lower score = removed first; equal scores → the lower expert id (then the lower layer
index, for ``global``) is removed first. This is a stable ascending sort on (score, layer, id).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from stun_exp.errors import ConfigError

KEY = "expert_pruner.expert_sparsity"


from stun_exp.pruning.expert.counts import n_kept, n_removed  # noqa: E402,F401 (re-exported)


def keep_layerwise(scores: Sequence[float] | torch.Tensor, expert_sparsity: float,
                   top_k: int) -> list[int]:
    """Kept ids (ascending) of one layer: drop the round-half-up(s·n) lowest-scored experts."""
    s = [float(x) for x in scores]
    drop = n_removed(expert_sparsity, len(s))
    if len(s) - drop < top_k:
        raise ConfigError(KEY, expert_sparsity, f"a fraction keeping >= top_k={top_k} of {len(s)} experts "
                          f"(this keeps {len(s) - drop})")
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
        raise ConfigError(KEY, expert_sparsity, f"a fraction removing at most {len(removed)} experts "
                          f"(top_k={top_k} kept per layer; asked {drop})")
    return {l: [e for e in range(len(row)) if (l, e) not in removed] for l, row in scores.items()}


def keep_grouped(scores: Sequence[float] | torch.Tensor, expert_sparsity: float, top_k: int,
                 n_group: int) -> list[int]:
    """Kept ids of one group-routed layer: the same number removed inside each routing group."""
    s = [float(x) for x in scores]
    n, drop = len(s), n_removed(expert_sparsity, len(s))
    if n % n_group or drop % n_group:
        raise ConfigError(KEY, expert_sparsity, f"a fraction whose removed count is divisible by "
                          f"n_group={n_group} (removes {drop} of {n}; group routing needs equal survivors "
                          f"per group)")
    if n - drop < top_k:
        raise ConfigError(KEY, expert_sparsity, f"a fraction keeping >= top_k={top_k} of {n} experts")
    per = n // n_group
    kept: list[int] = []
    for g in range(n_group):
        ids = list(range(g * per, (g + 1) * per))
        kept += [ids[i] for i in keep_layerwise([s[e] for e in ids], drop / n_group / per, 1)]
    return sorted(kept)


def select(scores: Mapping[int, Sequence[float] | torch.Tensor], expert_sparsity: float,
           top_k: int, scope: str, n_group: Mapping[int, int] | None = None) -> dict[int, list[int]]:
    """Kept ids per layer for ``scope`` in {layer, global}; ``n_group[l]`` > 1 = group-routed layer."""
    groups = {l: (n_group or {}).get(l, 1) for l in scores}
    if scope == "layer":
        return {l: keep_grouped(s, expert_sparsity, top_k, groups[l]) if groups[l] > 1
                else keep_layerwise(s, expert_sparsity, top_k) for l, s in scores.items()}
    if scope == "global":
        if any(g > 1 for g in groups.values()):
            raise ConfigError("expert_pruner.scope", scope, "layer",
                              "global ranking cannot keep routing groups balanced (n_group > 1)")
        return keep_global(scores, expert_sparsity, top_k)
    raise ValueError(f"unknown scope {scope!r}; known: layer, global")
