"""STUN ``scope: layer``: the same number of experts in every MoE layer (our extension of STUN).

The authors search one global threshold τ, so layers keep different counts (``scope: global``).
Serving stacks build every MoE layer from one expert count, so ``scope: layer`` asks each layer for
exactly t_l = n_l − round-half-up(s·n_l) clusters (``counts.n_kept``, the rounding of every expert
pruner) while keeping the authors' clustering unchanged: the same distance matrix, the same greedy
star-linkage at a threshold (``clustering.greedy_merges``), the same representative and
reconstruction rules. Only τ becomes per layer:

1. Warm start: the authors' global search for the total Σ t_l (``stun.cluster_layers``) gives τ_g.
2. Per layer, the authors' expanding-then-halving search (``search.search_threshold``) for that
   layer's cluster count, started at τ_g. A layer that already has t_l clusters at τ_g keeps the
   clustering the greedy gives there, so ``scope=layer`` equals ``scope=global`` whenever the global
   search hits its total at a τ where every layer has its target.
3. No τ gives t_l exactly: the ``trim`` rule of the global search, within the layer — take the τ
   tried whose count is closest below t_l and undo its largest-distance merges until t_l remain (a
   prefix of that τ's merge sequence). If no τ tried went below t_l, the greedy merges run at τ = ∞
   and stop at t_l (``stop_at_target``: at τ = ∞ the star check accepts every pair, so this is exact).

Why a τ per layer rather than the other natural rule, one shared τ with each layer's greedy stopped at
t_l: the search would then only ever move τ up (a stopped greedy never goes below t_l) and settle on
a coarse, large τ whose loose star check accepts merges the method refuses at the τ that gives t_l.
A per-layer τ keeps what τ means in the method.

Layers of a group-limited router (DeepSeek ``n_group`` > 1) are searched per routing group (t_l/n_group
clusters each; the layer's removed count must divide evenly), which keeps the groups balanced as
surgery needs. Merge caps: a layer never goes below top_k clusters (as in the global search); a
routing group never below max(2 for DeepSeek-V3's top-2-sum group score else 1, ceil(top_k/n_group)).
Every layer's τ, rule and trial count go to ``plan.meta['search']['per_layer']``.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from stun_exp.pruning.expert import clustering as C
from stun_exp.pruning.expert.counts import group_floor
from stun_exp.pruning.expert.search import closest_below, search_threshold

RULE = ("per-layer tau search (the authors' expanding-then-halving search on the layer's cluster count), "
        "started at the global tau; no exact tau: trim the largest-distance merges of the closest tau "
        "below; per routing group for group-limited routers")


def cell_clusters(d: torch.Tensor, target: int, floor: int, init: float, step: float,
                  max_iters: int) -> tuple[list[list[int]], dict]:
    """Exactly `target` clusters of one distance matrix (a layer, or one routing group)."""
    n = d.shape[0]
    if not min(floor, n) <= target <= n:
        raise ValueError(f"cannot keep {target} of {n} experts with at least {floor} kept")
    pairs = C.SortedPairs.from_matrix(d)
    cap = max(0, n - floor)

    def count(tau: float) -> int:
        return len(C.greedy_clusters(pairs, tau, cap))

    res = search_threshold(count, target, init, step, max_iters)
    meta = {"target": target, "trials": len(res.trace)}
    if res.hit:
        return C.greedy_clusters(pairs, res.threshold, cap), {**meta, "threshold": res.threshold, "rule": "hit"}
    below = closest_below(res.trace, target)
    if below is not None:
        log = C.greedy_merges(pairs, below[0], cap)
        kept = C.trim_merges({0: log}, n - target)[0]
        return C.clusters_from_merges(n, kept), {**meta, "threshold": below[0], "rule": "trim",
                                                 "merges_undone": len(log) - len(kept)}
    log = C.greedy_merges(pairs, math.inf, n - target)
    return C.clusters_from_merges(n, log), {**meta, "threshold": "inf", "rule": "stop_at_target"}


def layer_clusters(d: torch.Tensor, target: int, n_group: int, top_k: int, group_rule: str | None,
                   init: float, step: float, max_iters: int) -> tuple[list[list[int]], dict]:
    """Clusters of one layer with exactly `target` members-groups (per routing group when n_group > 1)."""
    n = d.shape[0]
    per, t = n // n_group, target // n_group
    floor = group_floor(n_group, top_k, group_rule)
    out: list[list[int]] = []
    metas = []
    for g in range(n_group):
        lo = g * per
        cl, m = cell_clusters(d[lo:lo + per, lo:lo + per], t, floor, init, step, max_iters)
        out += [[lo + e for e in c] for c in cl]
        metas.append(m)
    meta = metas[0] if n_group == 1 else {"target": target, "groups": metas}
    return sorted(out, key=lambda c: c[0]), meta


def cluster_per_layer(dists: Mapping[int, torch.Tensor], targets: Mapping[int, int], groups: Mapping[int, int],
                      top_k: int, group_rule: str | None, tau_g: float, step: float,
                      max_iters: int) -> tuple[dict[int, list[list[int]]], dict]:
    """Clusters of every layer, each with its own target; meta per layer (see module doc)."""
    clusters, per_layer = {}, {}
    for l, d in dists.items():
        clusters[l], per_layer[str(l)] = layer_clusters(d, targets[l], groups[l], top_k, group_rule,
                                                        tau_g, step, max_iters)
    return clusters, per_layer
