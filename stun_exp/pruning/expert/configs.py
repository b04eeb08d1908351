"""Typed schemas of the ``expert_pruner`` config group (field names are a public contract).

Each dataclass is ``schema_<name>`` in Hydra's ConfigStore, carries the ``_target_`` class that
``hydra.utils.instantiate`` builds, and validates itself before any model loads
(``validate(info)``; ``info`` is a ``ModelInfo`` or None for the model-free checks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence

from stun_exp.config.schema import Validatable, check_choice, check_range, schema
from stun_exp.errors import ConfigError
from stun_exp.pruning.expert.counts import group_floor, n_kept, n_removed

_PKG = "stun_exp.pruning.expert"
SCOPES = ["layer", "global"]


def _total(info: Any) -> int:
    return sum(info.experts_per_layer[l] for l in info.moe_layers)


def _check_sparsity_keeps_topk(key: str, s: float, scope: str, info: Any) -> None:
    """expert_sparsity must leave ≥ top_k experts in every layer (layer scope) / overall (global)."""
    if info is None:
        return
    k = info.top_k
    if scope == "layer":
        for l in info.moe_layers:
            n = info.experts_per_layer[l]
            if n_kept(s, n) < k:
                raise ConfigError(key, s, f"a fraction that keeps >= top_k={k} of the {n} experts of "
                                  f"layer {l} (at most {(n - k) / n:.4g})")
    else:
        drop = n_removed(s, _total(info))
        room = sum(info.experts_per_layer[l] - k for l in info.moe_layers)
        if drop > room:
            raise ConfigError(key, s, f"a fraction removing at most {room} experts (top_k={k} per layer)")


@schema("expert_pruner", "none")
@dataclass
class NoneExpertPrunerConfig(Validatable):
    """``expert_pruner=none``: the runner skips the expert stage (``name == 'none'``)."""
    _target_: Optional[str] = None
    name: str = "none"


@dataclass
class _ScoredConfig(Validatable):
    """Fields shared by the score-ranking baselines."""
    expert_sparsity: float = 0.25
    scope: str = "layer"
    calib_batch_size: int = 8

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        check_range(f"{prefix}.expert_sparsity", self.expert_sparsity, 0.0, 1.0)
        check_choice(f"{prefix}.scope", self.scope, SCOPES)
        if self.calib_batch_size < 1:
            raise ConfigError(f"{prefix}.calib_batch_size", self.calib_batch_size, "an integer >= 1")
        _check_sparsity_keeps_topk(f"{prefix}.expert_sparsity", self.expert_sparsity, self.scope, info)

    def needs(self) -> str:
        """What the pruner reads (see ``stun_exp.runtime``): one observed calibration pass."""
        return "calibration_stats"

    def experts_removed(self, info: Any) -> int:
        """Experts this config removes from a model with ``info`` (known before the run)."""
        if self.scope == "layer":
            return sum(n_removed(self.expert_sparsity, info.experts_per_layer[l]) for l in info.moe_layers)
        return n_removed(self.expert_sparsity, _total(info))


@schema("expert_pruner", "frequency")
@dataclass
class FrequencyConfig(_ScoredConfig):
    _target_: str = f"{_PKG}.baselines.FrequencyPruner"
    name: str = "frequency"


ROUTING_SCORE_VARIANTS = ["soft_topk_mean", "soft_full_mean", "conditional_mean"]


@schema("expert_pruner", "routing_score")
@dataclass
class RoutingScoreConfig(_ScoredConfig):
    _target_: str = f"{_PKG}.baselines.RoutingScorePruner"
    name: str = "routing_score"
    variant: str = "soft_topk_mean"

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        check_choice(f"{prefix}.variant", self.variant, ROUTING_SCORE_VARIANTS)
        super().validate(info, prefix)


@schema("expert_pruner", "random")
@dataclass
class RandomConfig(_ScoredConfig):
    _target_: str = f"{_PKG}.baselines.RandomPruner"
    name: str = "random"
    seed: int = 0

    def needs(self) -> str:
        return "weights"          # expert counts only

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        if self.seed < 0:
            raise ConfigError(f"{prefix}.seed", self.seed, "a non-negative integer")
        super().validate(info, prefix)


@schema("expert_pruner", "router_change")
@dataclass
class RouterChangeConfig(_ScoredConfig):
    _target_: str = f"{_PKG}.router_change.RouterChangePruner"
    name: str = "router_change"
    pretrained_path: Optional[str] = None
    delta: str = "norm_diff"
    removal: str = "zero_output"

    def needs(self) -> str:
        return "whole_model"      # loads the pre-fine-tuning model as a whole

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        # pretrained_path may be null here: the runner fills it from model.pretrained_path (or the toy
        # pair) after validation; RouterChangePruner.plan raises ConfigError if it is still missing.
        check_choice(f"{prefix}.delta", self.delta, ["norm_diff", "diff_norm"])
        check_choice(f"{prefix}.removal", self.removal, ["zero_output", "slice_router"])
        super().validate(info, prefix)


@schema("expert_pruner", "lu_combinatorial")
@dataclass
class LuCombinatorialConfig(_ScoredConfig):
    _target_: str = f"{_PKG}.lu.LuCombinatorialPruner"
    name: str = "lu_combinatorial"
    variant: str = "layerwise"
    max_candidates: int = 10000

    def needs(self) -> str:
        return "whole_model"      # MoE-block forwards of every candidate on the live model

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        check_choice(f"{prefix}.variant", self.variant, ["layerwise", "progressive"])
        if self.max_candidates < 1:
            raise ConfigError(f"{prefix}.max_candidates", self.max_candidates, "an integer >= 1")
        if self.scope != "layer":
            raise ConfigError(f"{prefix}.scope", self.scope, "layer",
                              "Lu et al. keep the same count r in every layer")
        super().validate(info, prefix)
        if info is not None:
            check_budget(dict(info.experts_per_layer), info.moe_layers, self.expert_sparsity,
                         self.max_candidates, f"{prefix}.max_candidates")


STUN_DISTANCES = ["router", "coactivation", "mixed"]


def _check_layer_counts(key: str, s: float, info: Any) -> None:
    """STUN scope=layer: every layer keeps >= top_k; group-routed layers split evenly into their groups."""
    from stun_exp.models.arch_table import ARCH_SPECS
    _check_sparsity_keeps_topk(key, s, "layer", info)
    g = int(info.n_group or 1)
    if g <= 1:
        return
    rule = ARCH_SPECS[info.arch].routing.group if info.arch in ARCH_SPECS else None
    topk_group = int(info.extra.get("topk_group", 1) or 1)
    for l in info.moe_layers:
        n = info.experts_per_layer[l]
        kept = n_kept(s, n)
        per = kept // g
        if n % g or kept % g:
            raise ConfigError(key, s, f"a fraction whose kept count is divisible by n_group={g} (layer {l} "
                              f"keeps {kept} of {n}; group routing needs the same count in every group)")
        least = max(group_floor(g, info.top_k, rule), -(-info.top_k // topk_group))
        if per < least:
            raise ConfigError(key, s, f"a fraction keeping >= {least} experts per routing group (layer {l}: "
                              f"{per}; n_group={g}, topk_group={topk_group}, top_k={info.top_k})")


@schema("expert_pruner", "stun")
@dataclass
class StunConfig(Validatable):
    NONFINITE_OK: ClassVar[frozenset[str]] = frozenset({"threshold"})   # inf: merge all the cap allows
    _target_: str = f"{_PKG}.stun.StunPruner"
    name: str = "stun"
    distance: str = "router"
    mix_weight: Optional[float] = None
    normalize: bool = True
    coact_divide_mean: bool = True
    coactivation_path: Optional[str] = None
    # null = the reference's defaults: 1 merge per layer for a single pass at `threshold`
    # (merge_weight.py top_k=1), no cap when searching a target (README Arctic: top_k = n-1).
    max_merges_per_layer: Optional[int] = None
    threshold: float = math.inf
    target_experts: Optional[int] = None
    expert_sparsity: Optional[float] = None
    reconstruct_max_clusters: int = 0
    reconstruct_rule: str = "layer_clusters"
    kappa: int = 3
    search_init: float = 0.5
    search_step: float = 0.1
    search_max_iters: int = 100
    search_fallback: str = "trim"                # trim (exact target) | nearest (see search.py)
    calib_batch_size: int = 8
    # global: the authors' one τ for all layers (counts differ per layer); layer: every MoE layer keeps
    # n - round-half-up(expert_sparsity * n) experts (stun_layer.py)
    scope: str = "global"

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        check_choice(f"{prefix}.distance", self.distance, STUN_DISTANCES)
        check_choice(f"{prefix}.search_fallback", self.search_fallback, ["trim", "nearest"])
        check_choice(f"{prefix}.reconstruct_rule", self.reconstruct_rule, ["layer_clusters", "cluster_size"])
        check_choice(f"{prefix}.scope", self.scope, SCOPES)
        if self.scope == "layer":
            self._check_layer_fields(prefix)
        if self.distance == "mixed" and self.mix_weight is None:
            raise ConfigError(f"{prefix}.mix_weight", None, "a number (λ) when distance=mixed")
        if self.mix_weight is not None and not self.mix_weight >= 0:
            raise ConfigError(f"{prefix}.mix_weight", self.mix_weight, "a number >= 0 (λ weights the "
                              "co-activation term)")
        if math.isnan(self.threshold) or self.threshold < 0:
            raise ConfigError(f"{prefix}.threshold", self.threshold, "a distance >= 0, or inf")
        if self.target_experts is not None and self.target_experts < 1:
            raise ConfigError(f"{prefix}.target_experts", self.target_experts, "an integer >= 1 or null")
        if self.reconstruct_max_clusters < 0:
            raise ConfigError(f"{prefix}.reconstruct_max_clusters", self.reconstruct_max_clusters,
                              "an integer >= 0")
        if self.target_experts is not None and self.expert_sparsity is not None:
            raise ConfigError(f"{prefix}.target_experts", self.target_experts,
                              "null when expert_sparsity is set (give one of the two)")
        if self.expert_sparsity is not None:
            check_range(f"{prefix}.expert_sparsity", self.expert_sparsity, 0.0, 1.0)
        if self.max_merges_per_layer is not None and self.max_merges_per_layer < 0:
            raise ConfigError(f"{prefix}.max_merges_per_layer", self.max_merges_per_layer,
                              "an integer >= 0 or null (no cap)")
        if self.kappa < 2:
            raise ConfigError(f"{prefix}.kappa", self.kappa, "an integer >= 2")
        for key in ("search_init", "search_step"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "a number > 0")
        for key in ("calib_batch_size", "search_max_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "an integer >= 1")
        if info is not None and self.scope == "layer":
            _check_layer_counts(f"{prefix}.expert_sparsity", self.expert_sparsity, info)
        elif info is not None:
            self._check_target(info, prefix)

    def _check_layer_fields(self, prefix: str) -> None:
        """scope=layer fixes every layer's count from expert_sparsity; fields that would compete refuse."""
        why = "scope=layer: each MoE layer keeps n - round-half-up(expert_sparsity * n) experts"
        if self.target_experts is not None:
            raise ConfigError(f"{prefix}.target_experts", self.target_experts,
                              f"null ({why}; a total over all layers is scope=global)")
        if self.expert_sparsity is None:
            raise ConfigError(f"{prefix}.expert_sparsity", None, f"a fraction in [0, 1) ({why})")
        if not (isinstance(self.threshold, (int, float)) and math.isinf(self.threshold) and self.threshold > 0):
            raise ConfigError(f"{prefix}.threshold", self.threshold, f".inf ({why}; τ is searched per layer)")
        if self.max_merges_per_layer is not None:
            raise ConfigError(f"{prefix}.max_merges_per_layer", self.max_merges_per_layer,
                              f"null ({why}, i.e. exactly that many merges)")
        if self.search_fallback != "trim":
            raise ConfigError(f"{prefix}.search_fallback", self.search_fallback,
                              f"trim ({why}; nearest may miss a layer's count)")

    def merge_cap(self, n: int, top_k: int, searching: bool) -> int:
        """Merges allowed in a layer of n experts: the configured cap (null: 1 for a single pass,
        none when searching), never so many that fewer than top_k experts survive (surgery needs
        top_k distinct experts; the reference's modeling code would route to min(k, K) instead)."""
        cap = self.max_merges_per_layer
        if cap is None:
            cap = n if searching else 1
        return max(0, min(int(cap), n - top_k))

    def needs(self) -> str:
        """Router distance or precomputed counts: weights only; co-activation: one calibration pass."""
        return "weights" if self.distance == "router" or self.coactivation_path else "calibration_stats"

    def experts_removed(self, info: Any) -> Optional[int]:
        """Experts removed when a target is given; None for a pass at ``threshold`` (known after it)."""
        target = self.target(info)
        return None if target is None else _total(info) - target

    def target(self, info: Any) -> Optional[int]:
        """Total experts to keep (None = one pass at ``threshold``)."""
        if self.target_experts is not None:
            return int(self.target_experts)
        if self.expert_sparsity is not None:
            return n_kept(self.expert_sparsity, _total(info))
        return None

    def _check_target(self, info: Any, prefix: str) -> None:
        target, total = self.target(info), _total(info)
        if target is None:
            return
        m = self.max_merges_per_layer
        floor = sum(info.experts_per_layer[l] - self.merge_cap(info.experts_per_layer[l], info.top_k, True)
                    for l in info.moe_layers)
        key = f"{prefix}.target_experts" if self.target_experts is not None else f"{prefix}.expert_sparsity"
        val = self.target_experts if self.target_experts is not None else self.expert_sparsity
        if not floor <= target <= total:
            raise ConfigError(key, val, f"a target between {floor} and {total} kept experts "
                              f"(asked {target}; each layer keeps at least top_k={info.top_k} and "
                              f"n - max_merges_per_layer (= {m}) experts)")


# ---- REAP and the expert-merging baselines (CerebrasResearch/reap) ---------------------------------
REAP_CRITERIA = ["reap", "ean_sum", "ean_mean", "weighted_ean_sum", "frequency", "weighted_frequency"]
MERGE_REMOVALS = ["slice_router", "zero_output"]
HC_SMOE_LINKAGES = ["average", "single", "complete", "ward"]
HC_SMOE_DISTANCES = ["euclidean", "cosine", "angular"]


def reap_n_pruned(expert_sparsity: float, n: int) -> int:
    """Experts REAP removes from n: ``int(n * compression_ratio)`` (truncation, prune.py main)."""
    return int(n * expert_sparsity)


def reap_n_clusters(expert_sparsity: float, n: int) -> int:
    """Clusters REAP forms from n experts: ``int(n * (1 - compression_ratio))`` (main.py main)."""
    return int(n * (1 - expert_sparsity))


def _check_int(key: str, value: Any, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(key, value, f"an integer >= {lo}")


def _check_bool_or_null(key: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(key, value, ["null", "true", "false"])


@schema("expert_pruner", "reap")
@dataclass
class ReapConfig(Validatable):
    """REAP (router-weighted expert activation pruning) and the saliencies REAP's code ships."""
    _target_: str = f"{_PKG}.reap.ReapPruner"
    name: str = "reap"
    criterion: str = "reap"
    renormalize: Optional[bool] = None
    expert_sparsity: float = 0.25
    scope: str = "layer"
    calib_batch_size: int = 1

    def needs(self) -> str:
        return "calibration_stats"

    def experts_removed(self, info: Any) -> int:
        if self.scope == "layer":
            return sum(reap_n_pruned(self.expert_sparsity, info.experts_per_layer[l]) for l in info.moe_layers)
        return n_removed(self.expert_sparsity, _total(info))

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        check_choice(f"{prefix}.criterion", self.criterion, REAP_CRITERIA)
        _check_bool_or_null(f"{prefix}.renormalize", self.renormalize)
        check_range(f"{prefix}.expert_sparsity", self.expert_sparsity, 0.0, 1.0)
        check_choice(f"{prefix}.scope", self.scope, SCOPES)
        _check_int(f"{prefix}.calib_batch_size", self.calib_batch_size)
        if info is None:
            return
        key, s = f"{prefix}.expert_sparsity", self.expert_sparsity
        if self.scope == "global":
            if info.n_group > 1:
                raise ConfigError(f"{prefix}.scope", self.scope, ["layer"],
                                  "a global ranking cannot keep routing groups balanced (n_group > 1)")
            _check_sparsity_keeps_topk(key, s, "global", info)
            return
        for l in info.moe_layers:
            n = info.experts_per_layer[l]
            drop = reap_n_pruned(s, n)
            if n - drop < info.top_k:
                raise ConfigError(key, s, f"a fraction that keeps >= top_k={info.top_k} of the {n} experts "
                                  f"of layer {l} (int({n}*{s}) = {drop} removed)")
            if info.n_group > 1 and drop % info.n_group:
                raise ConfigError(key, s, f"a fraction whose removed count int({n}*s) is divisible by "
                                  f"n_group={info.n_group} (group routing needs equal survivors per group)")


@dataclass
class _MergeConfig(Validatable):
    """Fields shared by the merging baselines: each cluster of experts becomes one merged expert."""
    expert_sparsity: float = 0.25
    removal: str = "slice_router"      # slice_router: collapse each cluster; zero_output: REAP's keep-all-slots
    calib_batch_size: int = 8

    def needs(self) -> str:
        return "calibration_stats"

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        check_range(f"{prefix}.expert_sparsity", self.expert_sparsity, 0.0, 1.0)
        check_choice(f"{prefix}.removal", self.removal, MERGE_REMOVALS)
        _check_int(f"{prefix}.calib_batch_size", self.calib_batch_size)
        if info is None:
            return
        if self.removal == "slice_router" and info.n_group > 1:
            raise ConfigError(f"{prefix}.removal", self.removal, ["zero_output"],
                              f"clusters would span routing groups (n_group={info.n_group}); keep-all-slots "
                              "merging leaves the groups intact")
        for l in info.moe_layers:
            n = info.experts_per_layer[l]
            c = reap_n_clusters(self.expert_sparsity, n)
            if c < info.top_k:
                raise ConfigError(f"{prefix}.expert_sparsity", self.expert_sparsity,
                                  f"a fraction leaving >= top_k={info.top_k} clusters of the {n} experts of "
                                  f"layer {l} (int({n}*(1-s)) = {c})")


@schema("expert_pruner", "hc_smoe")
@dataclass
class HcSmoeConfig(_MergeConfig):
    """HC-SMoE as REAP runs it: hierarchical clustering of characteristic activations, per layer."""
    _target_: str = f"{_PKG}.merging.HcSmoePruner"
    name: str = "hc_smoe"
    linkage: str = "average"
    distance: str = "euclidean"

    def experts_removed(self, info: Any) -> int:
        """Collapsed clusters: n - int(n(1-s)) per layer; keep-all-slots removes none."""
        if self.removal == "zero_output":
            return 0
        return sum(info.experts_per_layer[l] - reap_n_clusters(self.expert_sparsity, info.experts_per_layer[l])
                   for l in info.moe_layers)

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        check_choice(f"{prefix}.linkage", self.linkage, HC_SMOE_LINKAGES)
        check_choice(f"{prefix}.distance", self.distance, HC_SMOE_DISTANCES)
        super().validate(info, prefix)


@schema("expert_pruner", "m_smoe")
@dataclass
class MSmoeConfig(_MergeConfig):
    """M-SMoE as REAP runs it: global dominant experts, router-logit grouping, aligned merge."""
    _target_: str = f"{_PKG}.merging.MSmoePruner"
    name: str = "m_smoe"
    permute: str = "wm"

    def validate(self, info: Any = None, prefix: str = "expert_pruner") -> None:
        check_choice(f"{prefix}.permute", self.permute, ["wm", "none"])
        super().validate(info, prefix)


def check_budget(experts_per_layer: Mapping[int, int], layers: Sequence[int], expert_sparsity: float,
                 max_candidates: int, key: str = "expert_pruner.max_candidates") -> int:
    """Raise ConfigError when any layer needs more than ``max_candidates`` = C(E, r) candidates."""
    worst = 0
    for l in layers:
        n = experts_per_layer[l]
        r = n_kept(expert_sparsity, n)
        c = math.comb(n, r)
        worst = max(worst, c)
        if c > max_candidates:
            raise ConfigError(key, max_candidates, f">= C({n},{r}) = {c} candidates (layer {l} keeps "
                              f"{r} of {n} experts); Lu et al. enumerate every subset")
    return worst
