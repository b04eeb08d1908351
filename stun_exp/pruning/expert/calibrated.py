"""Shared shape of the expert pruners that plan from one pass of expert-output statistics.

The runner asks each pruner what it needs (``needs``); these declare ``"calibration_stats"`` and
split planning in two so that any runtime can drive them:

    obs = pruner.observer(adapter, layers)     # context manager: observes whatever runs the MoE blocks
    with obs: <full-model calibration pass, or one decoder layer at a time>
    plan = pruner.plan_from_stats(obs.stats, adapter, ctx)

``plan(ctx)`` does both in memory: one calibration pass (``forward_calibration``, counted in
``ctx.counters``) and ``plan_from_stats``; wall time and forward passes go to ``plan.meta``.
"""
from __future__ import annotations

from typing import Any

from stun_exp.observe.expert_outputs import ExpertOutputObserver
from stun_exp.pruning.expert.common import ConfiguredPruner, counters_delta, forward_calibration, timed
from stun_exp.models.plan import ExpertPlan


def resolve_renormalize(setting: bool | None, config: Any) -> bool:
    """REAP's pruning entry point renormalises only when the model config's ``norm_topk_prob`` is
    truthy (its flag defaults to on); ``null`` follows that, true/false force it."""
    if setting is None:
        return bool(getattr(config, "norm_topk_prob", False))
    return bool(setting)


class CalibrationStatsPruner(ConfiguredPruner):
    """Base: ``observer`` + ``plan_from_stats``; subclasses set ``cfg`` and the observer extras."""
    characteristic = False
    logit_similarity = False

    def renormalize(self, adapter: Any) -> bool:
        return resolve_renormalize(getattr(self.cfg, "renormalize", None), adapter.config)

    def observer(self, adapter: Any, layers: list[int]) -> ExpertOutputObserver:
        return ExpertOutputObserver(adapter, layers, renormalize=self.renormalize(adapter),
                                    characteristic=self.characteristic, logit_similarity=self.logit_similarity,
                                    batch_sequences=self.cfg.calib_batch_size)

    def plan_from_stats(self, stats: dict[int, Any], adapter: Any, ctx: Any) -> ExpertPlan:
        raise NotImplementedError

    def plan(self, ctx: Any) -> ExpertPlan:
        a = ctx.adapter
        self.cfg.validate(a.model_info())
        meta: dict[str, Any] = {}
        before = ctx.counters.as_dict()
        with timed(meta):
            with self.observer(a, list(a.moe_layers)) as obs:
                forward_calibration(ctx, self.cfg.calib_batch_size)
            plan = self.plan_from_stats(obs.stats, a, ctx)
        plan.meta.update(wall_time_s=meta["wall_time_s"], forward_passes=counters_delta(ctx, before))
        return plan
