"""``expert_pruner=hc_smoe`` and ``expert_pruner=m_smoe``: merge experts instead of dropping them,
as CerebrasResearch/reap runs these baselines (``main.py`` cluster/merge with the settings of
``experiments/hc_smoe.sh`` and ``experiments/m_smoe.sh``). Math in ``merge_clustering.py``.

* HC-SMoE (Chen et al. 2024): per layer, ``int(n·(1−s))`` clusters from average-linkage hierarchical
  clustering of the experts' characteristic activations (each expert's mean output over all
  calibration tokens, routed or not) under the euclidean distance; no frequency penalty.
* M-SMoE (MC-SMoE, Li et al. 2024): the distance between experts is the cosine distance between the
  rows of the token-averaged [E, E] router-logit cosine-distance matrix (REAP computes the
  ``router_logits`` similarity this way); ``Σ_l int(n_l·(1−s))`` dominant experts chosen globally
  by routing frequency, so layers end up with different counts; each other expert joins its
  nearest dominant expert; members are weight-matched to the cluster's most frequent expert
  (``permute: wm``) before averaging.
* Merge (both): frequency-weighted average of the members (weights = routing frequency / tokens).

Each cluster is one plan group: a singleton keeps its expert (representative = itself), a larger
cluster has representative null with per-member ``merge_weights`` (and ``permutations`` for
M-SMoE) in the plan. ``removal``:

* ``slice_router`` (default): each cluster collapses into ONE expert (this saves the memory). Router
  rule for a collapsed group: its router row (and bias / correction bias) is the same
  frequency-weighted average of the members' rows as the expert weights. A linear router cannot give
  the merged expert the members' summed probability (that needs a log-sum-exp of their logits); the
  weighted row keeps the logit on the members' scale and lets the most-used member dominate, the same
  convention as the merged weights (and the project's averaging rule for merged groups).
* ``zero_output``: REAP's keep-all-slots behaviour: the merged weights are written into every member
  slot and the router is unchanged (no memory saved; reproduces REAP's merged checkpoints). The plan's
  ``experts_after`` then counts distinct merged experts, while the sparsity census removes no weights.

Deliberate differences from REAP's code:
* The weighted average is computed in float32 and normalised exactly (REAP: in the weights' dtype,
  divided by Σw + float32 eps); a cluster whose members were never routed still becomes a zero expert.
* REAP's merge touches gate/up/down weights only; expert biases (GPT-OSS) are averaged (and, under
  ``slice_router``, router rows) as well, with the same weights.
* Collapsing clusters (``slice_router``) is our extension; M-SMoE may leave a layer fewer clusters
  than top_k, which only keep-all-slots can apply (a ConfigError says so).
* The router-logit similarity uses the same ``F.cosine_similarity`` call, chunked over rows.
* Group-limited routers (n_group > 1) are supported with ``zero_output`` only (clusters may span groups).
* Cluster counts use each layer's own expert count (REAP takes the first layer's; equal for uniform models).
* REAP's singleton-super-expert options (off in its scripts) are not offered.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from stun_exp.errors import ConfigError
from stun_exp.pruning.expert import merge_clustering as M
from stun_exp.pruning.expert.calibrated import CalibrationStatsPruner
from stun_exp.pruning.expert.configs import HcSmoeConfig, MSmoeConfig, reap_n_clusters
from stun_exp.models.plan import ExpertPlan, LayerPlan

ROUTER_RULE = ("collapsed group: router row (bias, correction bias) = the members' rows averaged with "
               "the merge weights (routing frequencies)")


class _MergePruner(CalibrationStatsPruner):
    method = ""

    def labels(self, stats: dict[int, Any], layers: list[int], adapter: Any,
               proba: dict[int, torch.Tensor]) -> tuple[dict[int, list[int]], dict]:
        raise NotImplementedError

    def permutations(self, adapter: Any, l: int, members: list[int], dom: int) -> Optional[list]:
        return None

    def plan_from_stats(self, stats: dict[int, Any], adapter: Any, ctx: Any) -> ExpertPlan:
        cfg = self.cfg
        cfg.validate(adapter.model_info())
        layers = list(adapter.moe_layers)
        missing = [l for l in layers if l not in stats]
        if missing:
            raise ValueError(f"no statistics for MoE layers {missing} (the observer saw no forward there)")
        proba = {l: stats[l].expert_proba() for l in layers}
        labels, meta = self.labels(stats, layers, adapter, proba)
        plans, dominants = {}, {}
        for l in layers:
            plans[l], dominants[str(l)] = self._layer_plan(adapter, l, labels[l], proba[l])
        meta.update(removal=cfg.removal, router_rule=ROUTER_RULE if cfg.removal == "slice_router" else
                    "keep-all-slots: merged weights in every member slot, router unchanged",
                    clusters={str(l): labels[l] for l in layers},
                    experts_per_layer_after={str(l): len(plans[l].groups) for l in layers},
                    dominant=dominants,
                    expert_proba={str(l): [float(x) for x in proba[l].tolist()] for l in layers})
        total = sum(adapter.num_experts(l) for l in layers)
        return ExpertPlan(self.method, total, plans, cfg.removal, meta)

    def _layer_plan(self, adapter: Any, l: int, labels: list[int], proba: torch.Tensor) -> tuple[LayerPlan, list]:
        groups = M.groups_from_labels(labels)
        if self.cfg.removal == "slice_router" and len(groups) < adapter.top_k:
            raise ConfigError("expert_pruner.expert_sparsity", self.cfg.expert_sparsity,
                              f"a fraction leaving >= top_k={adapter.top_k} clusters in every layer "
                              f"(layer {l} got {len(groups)}); or removal=zero_output (REAP's keep-all-slots)")
        reps, weights, perms, doms = [], [], [], []
        for g in groups:
            dom = M.dominant_of(g, proba)
            doms.append(dom)
            single = len(g) == 1
            reps.append(g[0] if single else None)
            weights.append(None if single else [float(proba[e]) for e in g])
            perms.append(None if single else self.permutations(adapter, l, g, dom))
        has_perm = any(p is not None for p in perms)
        return LayerPlan(groups, reps, weights, perms if has_perm else None), doms


class HcSmoePruner(_MergePruner):
    """HC-SMoE; fields as in ``HcSmoeConfig``."""
    method = "hc_smoe"
    characteristic = True

    def __init__(self, **fields: Any) -> None:
        self.cfg = HcSmoeConfig(**fields)

    def labels(self, stats, layers, adapter, proba):
        cfg, out, counts = self.cfg, {}, {}
        for l in layers:
            ca = stats[l].characteristic_activation.mean
            counts[str(l)] = reap_n_clusters(cfg.expert_sparsity, ca.shape[0])
            out[l] = M.hierarchical_labels(M.pairwise_distance(ca, cfg.distance), cfg.linkage, counts[str(l)])
        return out, {"similarity": "characteristic_activation", "distance": cfg.distance,
                     "linkage": cfg.linkage, "num_clusters": counts}


class MSmoePruner(_MergePruner):
    """M-SMoE; fields as in ``MSmoeConfig``."""
    method = "m_smoe"
    logit_similarity = True

    def __init__(self, **fields: Any) -> None:
        self.cfg = MSmoeConfig(**fields)

    def labels(self, stats, layers, adapter, proba):
        dist = {l: M.pairwise_distance(stats[l].router_logit_similarity.mean, "cosine") for l in layers}
        total = sum(reap_n_clusters(self.cfg.expert_sparsity, adapter.num_experts(l)) for l in layers)
        return M.mc_smoe_labels(dist, proba, total), {
            "similarity": "router_logits", "distance": "cosine", "total_clusters": total,
            "permute": self.cfg.permute}

    def permutations(self, adapter, l, members, dom):
        if self.cfg.permute == "none":
            return None
        ref = adapter.expert(l, dom)
        return [None if e == dom else M.weight_matching_permutation(adapter.expert(l, e), ref) for e in members]
