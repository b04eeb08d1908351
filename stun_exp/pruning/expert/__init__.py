"""Expert pruners: each builds an ``ExpertPlan`` (plan.py) that ``models.surgery.apply_plan`` applies.

``expert_pruner=<name>`` picks one (conf/expert_pruner/<name>.yaml, schema in configs.py); every
pruner has ``plan(ctx: RunContext) -> ExpertPlan`` and counts the forward passes it runs.
Pruners with ``needs = "calibration_stats"`` (reap, hc_smoe, m_smoe; see calibrated.py) also split
planning into ``observer(adapter, layers)`` and ``plan_from_stats(stats, adapter, ctx)``.
"""
from __future__ import annotations

import importlib

from stun_exp.errors import closest

PRUNERS = {
    "stun": "stun_exp.pruning.expert.stun.StunPruner",
    "lu_combinatorial": "stun_exp.pruning.expert.lu.LuCombinatorialPruner",
    "frequency": "stun_exp.pruning.expert.baselines.FrequencyPruner",
    "routing_score": "stun_exp.pruning.expert.baselines.RoutingScorePruner",
    "random": "stun_exp.pruning.expert.baselines.RandomPruner",
    "router_change": "stun_exp.pruning.expert.router_change.RouterChangePruner",
    "reap": "stun_exp.pruning.expert.reap.ReapPruner",
    "hc_smoe": "stun_exp.pruning.expert.merging.HcSmoePruner",
    "m_smoe": "stun_exp.pruning.expert.merging.MSmoePruner",
}


def pruner_class(name: str) -> type:
    """The pruner class registered as ``name`` (KeyError lists the known names and the closest one)."""
    if name not in PRUNERS:
        raise KeyError(f"unknown expert pruner {name!r}; known: {', '.join(sorted(PRUNERS))}"
                       f"{closest(name, PRUNERS)}")
    mod, cls = PRUNERS[name].rsplit(".", 1)
    return getattr(importlib.import_module(mod), cls)
