"""``expert_pruner=reap``: REAP (Lasby et al., ICLR 2026), faithful to CerebrasResearch/reap.

One calibration pass records, per MoE layer and expert, the statistics of REAP's observer
(``observe/reap_metrics.py``); ``criterion`` picks the saliency REAP's ``prune()`` ranks (``reap`` = mean
over the expert's routed tokens of router weight × ‖expert output‖; ``ean_sum``, ``ean_mean``,
``weighted_ean_sum``, ``frequency``, ``weighted_frequency``). Per layer the ``int(n · s)``
lowest-saliency experts are removed with ``torch.topk(saliency, n_drop, largest=False)`` on the
saliency tensor in REAP's dtype (int64 counts, float64 sums, float32 means), so ties resolve as in
REAP's code; the kept experts keep their order, router rows and correction biases (surgery,
``slice_router``). ``renormalize: null`` follows REAP's pruning entry point: on iff the model
config's ``norm_topk_prob`` is truthy (so off for Mixtral, whose config has no such key).

As in REAP's code, the tokens that count are the top-k of the raw router logits and the router weight is
a softmax over all logits, whatever the model's own rule: for sigmoid routers with a correction bias
(DeepSeek-V3 style) or group-limited choice (DeepSeek-V2 ``group_limited_greedy``) this can count
tokens the model itself routes elsewhere.

Deliberate differences from REAP's code:
* Expert outputs are computed for routed tokens only (REAP evaluates every expert on every token
  and keeps the routed rows: same numbers, E/k times the compute).
* ``weighted_frequency`` ranks REAP's ``weighted_expert_frequency_sum`` statistic; REAP's CLI name
  for it (``weighted_frequency_sum``) is not a key of its observer state, so its ``prune()`` stops.
* ``scope: global`` (an extension) ranks all (layer, expert) saliencies together with the
  project's rule (``selection.keep_global``: round-half-up count, >= top_k per layer); REAP's
  saliencies are per-layer quantities, so treat global rankings as exploratory.
* Group-limited routers (DeepSeek ``n_group`` > 1, an extension): the same number of experts,
  int(n·s)/n_group, is removed inside each routing group by REAP's rule (surgery needs balanced
  groups); REAP's code has no group handling.
* Each layer's count uses its own expert count (REAP takes the first layer's; equal for uniform models).
* The super-expert / outlier preservation options of REAP's CLI (off by default) are not offered.
"""
from __future__ import annotations

from typing import Any

import torch

from stun_exp.pruning.expert.calibrated import CalibrationStatsPruner
from stun_exp.pruning.expert.common import routing_groups
from stun_exp.pruning.expert.configs import ReapConfig, reap_n_pruned
from stun_exp.models.plan import ExpertPlan
from stun_exp.pruning.expert.selection import keep_global


def reap_keep(saliency: torch.Tensor, n_drop: int, n_group: int = 1) -> list[int]:
    """Kept ids of one layer: REAP's ``torch.topk(saliency, n_drop, largest=False)`` complement,
    applied inside each of ``n_group`` position-based routing groups when n_group > 1."""
    n = saliency.shape[0]
    per, drop_per = n // n_group, n_drop // n_group
    dropped: set[int] = set()
    for g in range(n_group):
        part = saliency[g * per:(g + 1) * per]
        dropped |= {g * per + int(i) for i in torch.topk(part, drop_per, largest=False)[1].tolist()}
    return [e for e in range(n) if e not in dropped]


def _jsonable(t: torch.Tensor) -> list:
    return t.tolist() if not t.is_floating_point() else [float(x) for x in t.tolist()]


class ReapPruner(CalibrationStatsPruner):
    """Built by ``hydra.utils.instantiate(cfg.expert_pruner)``; fields as in ``ReapConfig``."""
    method = "reap"

    def __init__(self, **fields: Any) -> None:
        self.cfg = ReapConfig(**fields)

    def plan_from_stats(self, stats: dict[int, Any], adapter: Any, ctx: Any) -> ExpertPlan:
        cfg = self.cfg
        info = adapter.model_info()
        cfg.validate(info)
        layers = list(adapter.moe_layers)
        missing = [l for l in layers if l not in stats]
        if missing:
            raise ValueError(f"no statistics for MoE layers {missing} (the observer saw no forward there)")
        n = {l: adapter.num_experts(l) for l in layers}
        sal = {l: stats[l].saliency(cfg.criterion) for l in layers}
        if cfg.scope == "layer":
            groups = routing_groups(adapter)
            keep = {l: reap_keep(sal[l], reap_n_pruned(cfg.expert_sparsity, n[l]), groups[l]) for l in layers}
            rule = "per layer: torch.topk(saliency, int(n*s), largest=False) removed (REAP prune())"
        else:
            keep = keep_global({l: sal[l].double() for l in layers}, cfg.expert_sparsity, adapter.top_k)
            rule = "global: stable ascending (saliency, layer, id), round-half-up count, >= top_k per layer"
        meta = {"criterion": cfg.criterion, "renormalize": self.renormalize(adapter),
                "renormalize_setting": cfg.renormalize, "scope": cfg.scope, "selection_rule": rule,
                "saliency_dtype": str(next(iter(sal.values())).dtype).replace("torch.", ""),
                "saliency": {str(l): _jsonable(sal[l]) for l in layers},
                "total_tokens": {str(l): int(stats[l].total_tokens) for l in layers},
                "experts_removed_per_layer": {str(l): n[l] - len(keep[l]) for l in layers}}
        return ExpertPlan.from_keep("reap", n, keep, "slice_router", **meta)
