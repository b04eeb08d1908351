"""Simple expert-pruning baselines: routing frequency, routing score (3 variants), random.

Scores come from one calibration pass with the observer (model's own routing, including group-limited
or bias-corrected selection); lower score = removed first (``selection.py`` has the count rounding,
the tie rule and the ``scope=global`` ranking). Scores are per-token rates, so layers compare under
``global``.

* ``frequency``: f_e = #tokens whose top-k holds e, ÷ #tokens.
* ``routing_score``:
  - ``soft_topk_mean``: Σ_t g_{t,e} / N, g the combine weight (0 when e is not selected) — as
    zxgx/mode-pd ``expert_prune_by_routing_score``;
  - ``soft_full_mean``: mean over tokens of softmax(router logits)_e, no top-k mask;
  - ``conditional_mean``: Σ_t g_{t,e} / f_e, the mean weight when selected (0 for a never-selected
    expert, so it goes first).
* ``random``: per layer (ascending layer order, one ``numpy.random.default_rng(seed)``) the first
  round(s·n) ids of ``rng.permutation(n)`` are dropped; ``global`` ranks by the position in one
  permutation of all (layer, expert) pairs. Zero forward passes.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch

from stun_exp.pruning.expert.common import ConfiguredPruner, collect_stats, counters_delta, routing_groups, stat, timed
from stun_exp.pruning.expert.configs import FrequencyConfig, RandomConfig, RoutingScoreConfig
from stun_exp.models.plan import ExpertPlan
from stun_exp.pruning.expert.selection import n_removed, select


# ---- pure scores -------------------------------------------------------------------------------
def frequency_scores(count: torch.Tensor, tokens: int) -> torch.Tensor:
    return count.double() / max(int(tokens), 1)


def routing_scores(variant: str, *, gate_sum: torch.Tensor | None = None, count: torch.Tensor | None = None,
                   tokens: int = 0, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert score of one layer for ``variant`` (see module doc)."""
    if variant == "soft_topk_mean":
        return gate_sum.double() / max(int(tokens), 1)
    if variant == "conditional_mean":
        c = count.double()
        return torch.where(c > 0, gate_sum.double() / c.clamp_min(1), torch.zeros_like(c))
    if variant == "soft_full_mean":
        return torch.softmax(logits.double(), dim=-1).mean(dim=0)
    raise ValueError(f"unknown routing_score variant {variant!r}")


def random_scores(n_per_layer: Mapping[int, int], seed: int, scope: str,
                  expert_sparsity: float) -> dict[int, list[float]]:
    """Scores whose ascending order is the seeded random drop order (see module doc)."""
    rng = np.random.default_rng(seed)
    layers = sorted(n_per_layer)
    if scope == "layer":
        out = {}
        for l in layers:
            perm = rng.permutation(n_per_layer[l])
            drop = set(perm[:n_removed(expert_sparsity, n_per_layer[l])].tolist())
            # dropped ids get score 0 (in permutation order), kept ids score 1 + position
            pos = {int(e): i for i, e in enumerate(perm)}
            out[l] = [float(pos[e]) if e in drop else 1e9 + pos[e] for e in range(n_per_layer[l])]
        return out
    flat = [(l, e) for l in layers for e in range(n_per_layer[l])]
    perm = rng.permutation(len(flat))
    rank = {flat[int(p)]: float(i) for i, p in enumerate(perm)}
    return {l: [rank[(l, e)] for e in range(n_per_layer[l])] for l in layers}


# ---- pruners -------------------------------------------------------------------------------------
class _ObservedPruner(ConfiguredPruner):
    """One observer pass -> per-layer scores -> selection -> drop-only plan."""
    method = ""
    keep_logits = False

    def scores(self, stats: Mapping[int, Any], layers: list[int]) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def observer(self, adapter: Any, layers: list[int]) -> Any:
        from stun_exp.observe.observer import ExpertObserver
        return ExpertObserver(adapter, layers, keep_logits=self.keep_logits)

    def plan(self, ctx: Any) -> ExpertPlan:
        self.cfg.validate(ctx.adapter.model_info())
        before = ctx.counters.as_dict()
        t0 = time.perf_counter()
        stats = collect_stats(ctx, self, self.cfg.calib_batch_size)
        plan = self.plan_from_stats(stats, ctx.adapter, ctx)
        plan.meta["forward_passes"] = counters_delta(ctx, before)
        plan.meta["wall_time_s"] = round(time.perf_counter() - t0, 4)
        return plan

    def plan_from_stats(self, stats: Mapping[int, Any], a: Any, ctx: Any) -> ExpertPlan:
        cfg = self.cfg
        cfg.validate(a.model_info())
        layers = list(a.moe_layers)
        meta: dict[str, Any] = {"scope": cfg.scope}
        with timed(meta):
            scores = self.scores(stats, layers)
            keep = select(scores, cfg.expert_sparsity, a.top_k, cfg.scope, routing_groups(a))
        meta["scores"] = {str(l): [float(x) for x in s] for l, s in scores.items()}
        return ExpertPlan.from_keep(self.method, {l: a.num_experts(l) for l in layers}, keep,
                                    "slice_router", **meta)


class FrequencyPruner(_ObservedPruner):
    method = "frequency"

    def __init__(self, **fields: Any) -> None:
        self.cfg = FrequencyConfig(**fields)

    def scores(self, stats, layers):
        return {l: frequency_scores(stat(stats[l], "count"), stat(stats[l], "tokens")) for l in layers}


class RoutingScorePruner(_ObservedPruner):
    method = "routing_score"

    def __init__(self, **fields: Any) -> None:
        self.cfg = RoutingScoreConfig(**fields)
        self.keep_logits = self.cfg.variant == "soft_full_mean"

    def scores(self, stats, layers):
        v = self.cfg.variant
        out = {}
        for l in layers:
            s = stats[l]
            if v == "soft_full_mean":
                out[l] = routing_scores(v, logits=_logits(s))
            else:
                out[l] = routing_scores(v, gate_sum=stat(s, "gate_sum"), count=stat(s, "count"),
                                        tokens=stat(s, "tokens"))
        return out


def _logits(s: Any) -> torch.Tensor:
    """The raw router logits the observer kept (``keep_logits=True``), as one [N, E] tensor."""
    lg = stat(s, "logits")
    lg = lg() if callable(lg) else lg
    return torch.cat(list(lg)) if isinstance(lg, (list, tuple)) else lg


class RandomPruner(ConfiguredPruner):
    """Seeded random drop; needs no calibration pass (expert counts only)."""

    def __init__(self, **fields: Any) -> None:
        self.cfg = RandomConfig(**fields)

    def plan(self, ctx: Any) -> ExpertPlan:
        cfg, a = self.cfg, ctx.adapter
        cfg.validate(a.model_info())
        n = {l: a.num_experts(l) for l in a.moe_layers}
        meta: dict[str, Any] = {"scope": cfg.scope, "seed": cfg.seed}
        with timed(meta):
            keep = select(random_scores(n, cfg.seed, cfg.scope, cfg.expert_sparsity),
                          cfg.expert_sparsity, a.top_k, cfg.scope, routing_groups(a))
        meta["forward_passes"] = {"full_model_forwards": 0, "moe_block_forwards": 0}
        return ExpertPlan.from_keep("random", n, keep, "slice_router", **meta)
