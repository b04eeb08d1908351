"""``expert_pruner=stun``: STUN phase 1 (Lee et al. 2024), faithful to thnkinbtfly/STUN merge_weight.py.

Per MoE layer: an expert distance matrix (router rows: 0 forward passes; co-activation: one
calibration pass, or a precomputed ``coactivation_path``), the greedy star-linkage clustering at one
global threshold τ, then one surviving expert per cluster: the member closest to the cluster's mean
weights (kept unchanged, with its router row) or, under the reconstruction rule, the average expert
(surgery averages weights and router rows). Math lives in ``clustering.py`` and ``search.py``.

``scope: global`` (default) is the authors' method: one τ for all layers, so layers keep different
counts. ``scope: layer`` (our extension, ``stun_layer.py``) keeps n − round-half-up(s·n) experts in
every layer (the rounding of every expert pruner, ``counts.py``) with the same distance, clustering,
representative and reconstruction rules: the authors' τ search runs per layer, started at the global
τ (a layer whose count is already right there keeps the global clustering), with the ``trim`` rule
inside the layer when no τ hits; the rule and each layer's τ are in ``plan.meta['search']``.

Differences from the reference, all deliberate:
* Co-activation uses the observer's top-k pair counts, i.e. the model's own routing. For softmax
  top-2 routers (Mixtral, Arctic) this is exactly the reference's statistic (top-2 of softmax of the
  raw logits); the reference hard-codes 2 even for other k.
* ``coactivation_path`` keys are decoder-layer indices (int or str); the reference's are MoE-layer
  positions, which coincide for Mixtral and Arctic.
* When no τ gives the target total exactly, the search does not exit: by default (``search_fallback:
  trim``) the merges of the closest τ below the target are trimmed to hit it exactly; ``nearest``
  keeps the nearest total (``search.py``). The rule and achieved count are in ``plan.meta['search']``.
* A layer never keeps fewer than top_k clusters: the merge cap is clamped to n - top_k (surgery needs
  top_k distinct experts; the reference allowed down to 1 and routed to min(k, K)).
* ``max_merges_per_layer: null`` resolves to the reference's defaults: 1 for a single pass at
  ``threshold`` (merge_weight.py), no cap when searching a target (README Arctic, top_k = n-1).
* Group-limited routers (DeepSeek n_group > 1, an extension): experts are only clustered within
  their routing group, and a plan leaving unequal counts per group is refused (surgery needs them
  balanced).
* Weights and centroids in fp32 (the code uses bf16); the group order is by smallest member id (the
  code iterates a Python set).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from stun_exp.errors import ConfigError
from stun_exp.pruning.expert import clustering as C
from stun_exp.pruning.expert.common import (ConfiguredPruner, collect_stats, counters_delta, router_weights,
                                            routing_groups, stat, timed)
from stun_exp.pruning.expert.configs import StunConfig
from stun_exp.pruning.expert.counts import n_kept
from stun_exp.models.plan import ExpertPlan, LayerPlan
from stun_exp.pruning.expert.search import closest_below, search_threshold
from stun_exp.pruning.expert.stun_layer import RULE as LAYER_RULE
from stun_exp.pruning.expert.stun_layer import cluster_per_layer

log = logging.getLogger(__name__)


def layer_distance(cfg: StunConfig, router: Optional[torch.Tensor],
                   coact: Optional[torch.Tensor]) -> torch.Tensor:
    """The [E, E] distance matrix of one layer for ``cfg.distance``."""
    if cfg.distance == "router":
        return C.router_distance(router, cfg.normalize)
    if cfg.distance == "coactivation":
        return C.coactivation_distance(coact, cfg.coact_divide_mean)
    return C.mixed_distance(router, coact, float(cfg.mix_weight))


def cluster_layers(dists: Mapping[int, torch.Tensor], cfg: StunConfig, target: Optional[int],
                   top_k: int) -> tuple[dict[int, list[list[int]]], dict]:
    """Clusters of every layer at the searched (or fixed) global τ, plus the search facts."""
    pairs = {l: C.SortedPairs.from_matrix(d) for l, d in dists.items()}
    caps = {l: cfg.merge_cap(d.shape[0], top_k, target is not None) for l, d in dists.items()}

    def total_at(tau: float) -> int:
        return sum(len(C.greedy_clusters(p, tau, caps[l])) for l, p in pairs.items())

    if target is None:
        tau = float(cfg.threshold)
        meta = {"threshold": tau if math.isfinite(tau) else str(tau), "searched": False}   # JSON-safe
    else:
        res = search_threshold(total_at, target, cfg.search_init, cfg.search_step, cfg.search_max_iters)
        tau, meta = res.threshold, {"searched": True, **res.as_meta(target)}
        below = None if res.hit or cfg.search_fallback != "trim" else closest_below(res.trace, target)
        if below is not None:
            meta["max_merges_per_layer"] = {str(l): c for l, c in caps.items()}
            return _trimmed(pairs, caps, below, target, meta)
        if not res.hit:
            log.warning("STUN: no threshold keeps exactly %d experts; using tau=%g keeping %d (%s)",
                        target, res.threshold, res.total, res.stop_reason)
    meta["max_merges_per_layer"] = {str(l): c for l, c in caps.items()}
    return {l: C.greedy_clusters(p, tau, caps[l]) for l, p in pairs.items()}, meta


def cluster_layers_uniform(dists: Mapping[int, torch.Tensor], cfg: StunConfig, top_k: int,
                           groups: Mapping[int, int], group_rule: Optional[str]) -> tuple[dict, dict]:
    """``scope: layer``: every layer keeps n_kept(s, n) clusters (``stun_layer.py``)."""
    targets = {l: n_kept(cfg.expert_sparsity, d.shape[0]) for l, d in dists.items()}
    _, warm = cluster_layers(dists, cfg, sum(targets.values()), top_k)
    clusters, per_layer = cluster_per_layer(dists, targets, groups, top_k, group_rule, float(warm["threshold"]),
                                            cfg.search_step, cfg.search_max_iters)
    meta = {"searched": True, "scope": "layer", "rule": LAYER_RULE,
            "target_experts": sum(targets.values()), "achieved_experts": sum(len(c) for c in clusters.values()),
            "global_warm_start": {k: warm.get(k) for k in ("threshold", "hit", "achieved_experts")},
            "per_layer": per_layer}
    return clusters, meta


def _trimmed(pairs: Mapping[int, C.SortedPairs], caps: Mapping[int, int], below: tuple[float, int],
             target: int, meta: dict) -> tuple[dict[int, list[list[int]]], dict]:
    """The ``trim`` fallback: undo the largest-distance merges at τ_below until the target is met."""
    tau, total = below
    logs = {l: C.greedy_merges(p, tau, caps[l]) for l, p in pairs.items()}
    n = {l: p.dist.shape[0] for l, p in pairs.items()}
    kept = C.trim_merges(logs, sum(n.values()) - target)
    clusters = {l: C.clusters_from_merges(n[l], kept[l]) for l in pairs}
    log.info("STUN: no threshold hit %d exactly; tau=%g kept %d, undid %d largest-distance merges",
             target, tau, total, target - total)
    meta.update(threshold=tau, achieved_experts=sum(len(c) for c in clusters.values()),
                fallback_rule="trim: tau with the closest total below the target, then its "
                              "largest-distance merges over all layers undone (ties: layer, order)",
                merges_undone=target - total)
    return clusters, meta


def layer_plan(clusters: Sequence[Sequence[int]], weights_of: Callable[[int], list[torch.Tensor]],
               cfg: StunConfig) -> LayerPlan:
    """Groups and representatives (None = averaged) of one layer."""
    avg = C.reconstruct_flags(clusters, cfg.reconstruct_rule, cfg.reconstruct_max_clusters, cfg.kappa)
    reps = [None if a else C.representative(c, [weights_of(e) for e in c]) for c, a in zip(clusters, avg)]
    return LayerPlan([list(c) for c in clusters], reps)


def mask_cross_group(d: torch.Tensor, n_group: int) -> torch.Tensor:
    """+inf between experts of different position-based routing groups (group-limited routers)."""
    if n_group <= 1:
        return d
    gid = torch.arange(d.shape[0]) // (d.shape[0] // n_group)
    return d.masked_fill(gid[:, None] != gid[None, :], float("inf"))


def check_balanced(clusters: Mapping[int, list[list[int]]], groups: Mapping[int, int],
                   experts: Mapping[int, int]) -> None:
    """Group-routed layers need the same number of clusters in every routing group (surgery)."""
    for l, cl in clusters.items():
        if groups[l] <= 1:
            continue
        per = experts[l] // groups[l]
        counts = [sum(1 for c in cl if c[0] // per == g) for g in range(groups[l])]
        if len(set(counts)) > 1:
            raise ConfigError("expert_pruner.name", "stun", "a pruner that keeps routing groups balanced "
                              f"(layer {l}: clusters per routing group {counts}; n_group={groups[l]})")


def load_coactivation(path: str, layers: Sequence[int], experts: Mapping[int, int]) -> dict[int, torch.Tensor]:
    """Precomputed counts: a torch file mapping layer index (int or str) -> [E, E] tensor."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for l in layers:
        t = raw.get(l, raw.get(str(l)))
        if t is None or tuple(t.shape) != (experts[l], experts[l]):
            got = None if t is None else tuple(t.shape)
            raise ConfigError("expert_pruner.coactivation_path", path,
                              f"a file mapping each MoE layer to a [{experts[l]}, {experts[l]}] tensor "
                              f"(layer {l}: got {got})")
        out[l] = torch.as_tensor(t).float()
    return out


class StunPruner(ConfiguredPruner):
    """Built by ``hydra.utils.instantiate(cfg.expert_pruner)``; fields as in ``StunConfig``."""

    def __init__(self, **fields: Any) -> None:
        self.cfg = StunConfig(**fields)

    def observer(self, adapter: Any, layers: list[int]) -> Any:
        from stun_exp.observe.observer import ExpertObserver
        return ExpertObserver(adapter, layers)

    def plan(self, ctx: Any) -> ExpertPlan:
        stats = None
        if self.needs == "calibration_stats":
            before = ctx.counters.as_dict()
            stats = collect_stats(ctx, self, self.cfg.calib_batch_size)
            ctx.info["stun_stats_passes"] = counters_delta(ctx, before)
        return self.plan_from_stats(stats, ctx.adapter, ctx)

    def _coactivation(self, stats: Any, a: Any, meta: dict) -> dict[int, torch.Tensor]:
        if self.cfg.coactivation_path:
            meta["coactivation_source"] = str(self.cfg.coactivation_path)
            return load_coactivation(self.cfg.coactivation_path, a.moe_layers,
                                     {l: a.num_experts(l) for l in a.moe_layers})
        meta.setdefault("coactivation_source", "calibration pass")
        return {l: stat(stats[l], "coact").detach().float().cpu() for l in a.moe_layers}

    def plan_from_stats(self, stats: Any, a: Any, ctx: Any) -> ExpertPlan:
        cfg = self.cfg
        info = a.model_info()
        cfg.validate(info)
        meta: dict[str, Any] = {"distance": cfg.distance, "scope": cfg.scope}
        before = ctx.counters.as_dict()
        with timed(meta):
            routers = router_weights(a) if cfg.distance in ("router", "mixed") else {}
            coact = self._coactivation(stats, a, meta) if cfg.distance != "router" else {}
            groups = routing_groups(a)
            dists = {l: mask_cross_group(layer_distance(cfg, routers.get(l), coact.get(l)), groups[l])
                     for l in a.moe_layers}
            if cfg.scope == "layer":
                clusters, meta["search"] = cluster_layers_uniform(dists, cfg, a.top_k, groups,
                                                                  a.spec.routing.group)
            else:
                clusters, meta["search"] = cluster_layers(dists, cfg, cfg.target(info), a.top_k)
            check_balanced(clusters, groups, {l: a.num_experts(l) for l in a.moe_layers})

            def weights_of(l: int) -> Callable[[int], list[torch.Tensor]]:
                return lambda e: [w for _, w in sorted(a.expert(l, e).items())]

            layers = {l: layer_plan(clusters[l], weights_of(l), cfg) for l in a.moe_layers}
        meta["forward_passes"] = ctx.info.pop("stun_stats_passes", None) or counters_delta(ctx, before)
        meta["experts_per_layer_after"] = {str(l): len(lp.groups) for l, lp in layers.items()}
        before_total = sum(a.num_experts(l) for l in a.moe_layers)
        return ExpertPlan("stun", before_total, layers, "slice_router", meta)
