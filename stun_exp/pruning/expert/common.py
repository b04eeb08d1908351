"""Helpers every expert pruner shares: calibration passes with forward-pass accounting, timing."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)


class ConfiguredPruner:
    """Base of every expert pruner: its schema (``cfg``) says its name and what it needs."""
    cfg: Any

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def needs(self) -> str:
        """``weights`` | ``calibration_stats`` | ``whole_model`` (see ``stun_exp.runtime``)."""
        return self.cfg.needs()


def calib_batches(calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split the [n, seqlen] calibration ids into consecutive batches of ``batch_size`` sequences."""
    return [calib[i:i + batch_size] for i in range(0, calib.shape[0], batch_size)]


@torch.no_grad()
def forward_calibration(ctx: Any, batch_size: int) -> int:
    """One full-model pass over ``ctx.calib``; counts one ``full_model_forwards`` per batch."""
    batches = calib_batches(ctx.calib, batch_size)
    for b in batches:
        ctx.model(input_ids=b.to(ctx.device), use_cache=False)
        ctx.counters.full_model_forwards += 1
    return len(batches)


def collect_stats(ctx: Any, pruner: Any, batch_size: int) -> dict:
    """One calibration pass with ``pruner.observer`` on every MoE layer; returns its ``.stats``."""
    with pruner.observer(ctx.adapter, list(ctx.adapter.moe_layers)) as obs:
        forward_calibration(ctx, batch_size)
    return obs.stats


def stat(s: Any, key: str) -> Any:
    """Field of one layer's observer statistics, whether it is a mapping or an object."""
    if isinstance(s, dict):
        return s[key]
    return getattr(s, key)


def router_weights(adapter: Any) -> dict[int, torch.Tensor]:
    """fp32 CPU copies of every MoE layer's router matrix [E_l, H]."""
    return {l: adapter.router_weight(l).detach().float().cpu() for l in adapter.moe_layers}


@contextmanager
def timed(meta: dict, key: str = "wall_time_s") -> Iterator[None]:
    """Record the wall time of the block into ``meta[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        meta[key] = round(time.perf_counter() - t0, 4)


def counters_delta(ctx: Any, before: dict[str, int]) -> dict[str, int]:
    """Forward passes this pruner ran (difference of ``ctx.counters`` since ``before``)."""
    now = ctx.counters.as_dict()
    return {k: now[k] - before.get(k, 0) for k in now}


def routing_groups(adapter: Any) -> dict[int, int]:
    """Per MoE layer: the number of position-based routing groups surgery must keep balanced (1 = none).

    Same rule as ``models.surgery._group_order``: DeepSeek-style group-limited routing that is on.
    """
    out = {}
    for l in adapter.moe_layers:
        p = adapter.route_params(l)
        on = p.n_group > 1 and (p.use_groups or adapter.spec.routing.group == "top2sum")
        out[l] = int(p.n_group) if on else 1
    return out
