"""``expert_pruner=lu_combinatorial``: Lu et al. 2024, "Not All Experts are Equal" (Lucky-Lance/Expert_Sparsity).

Per MoE layer, every subset of E−r experts to drop is tried (``itertools.combinations`` order); the
kept set is the one whose MoE-block output on the calibration set is closest to the original output.
As in the authors' code the loss is Σ over calibration batches of the (unsquared) Frobenius norm of the
output difference, in fp64; the first minimum in enumeration order wins. A candidate masks the dropped
experts' router logits (softmax and top-k over the survivors), which is what slicing the router rows
does after pruning, so the plan uses ``slice_router``.

* ``layerwise``: one full-model pass caches every layer's MoE input X_l; targets Z_l = MoE_l(X_l).
* ``progressive``: Z_l from that first pass; then for each layer in order one more full pass, with the
  earlier layers already pruned, gives X_l (1 + L passes, as the code runs them).

Cost: C(E, r) candidates per layer, each one MoE-block forward per calibration batch. The budget
``max_candidates`` is checked (per layer, C(E, r)) before anything runs.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from stun_exp.errors import ConfigError
from stun_exp.pruning.expert.common import ConfiguredPruner, calib_batches, counters_delta, routing_groups, timed
from stun_exp.pruning.expert.configs import LuCombinatorialConfig
from stun_exp.models.plan import ExpertPlan
from stun_exp.pruning.expert.selection import n_kept

MoeFn = Callable[[torch.Tensor, Optional[Sequence[int]]], torch.Tensor]


@torch.no_grad()
def enumerate_drops(moe: MoeFn, xs: Sequence[torch.Tensor], zs: Sequence[torch.Tensor], n: int,
                    r: int, n_group: int = 1) -> tuple[tuple[int, ...], dict[tuple[int, ...], float]]:
    """Best dropped set and the loss of every candidate (Σ_b ‖Z_b − MoE(X_b; drop)‖_F, fp64).

    ``n_group`` > 1 (group-limited routing): only drops removing the same count from every
    position-based routing group are candidates (surgery must keep the groups balanced).
    """
    losses: dict[tuple[int, ...], float] = {}
    for dropped in itertools.combinations(range(n), n - r):
        if n_group > 1 and not _balanced(dropped, n, n_group):
            continue
        losses[dropped] = sum(float(torch.linalg.norm(z.double() - moe(x, dropped).double()))
                              for x, z in zip(xs, zs))
    return min(losses, key=losses.get), losses


def _balanced(dropped: Sequence[int], n: int, n_group: int) -> bool:
    per = n // n_group
    counts = [0] * n_group
    for e in dropped:
        counts[e // per] += 1
    return len(set(counts)) == 1


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture_inputs(adapter: Any, layers: Sequence[int], store: dict[int, list]) -> Iterator[None]:
    """Forward pre-hooks appending each MoE block's input [N, H] (CPU) per call."""
    hooks = []
    for l in layers:
        def pre(_m, args, kwargs, l=l):
            h = _hidden_arg(args, kwargs)
            store.setdefault(l, []).append(h.detach().reshape(-1, h.shape[-1]).cpu())
        hooks.append(adapter.moe_block(l).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def masked_blocks(adapter: Any, drops: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Make the listed layers behave as pruned (dropped experts masked from routing) during forwards."""
    hooks = []
    for l, drop in drops.items():
        def post(_m, args, kwargs, out, l=l, drop=tuple(drop)):
            h = _hidden_arg(args, kwargs)
            new = adapter.moe_forward(l, h, drop=drop).reshape(h.shape)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        hooks.append(adapter.moe_block(l).register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class LuCombinatorialPruner(ConfiguredPruner):
    """Built by ``hydra.utils.instantiate(cfg.expert_pruner)``; fields as in ``LuCombinatorialConfig``."""

    def __init__(self, **fields: Any) -> None:
        self.cfg = LuCombinatorialConfig(**fields)

    @torch.no_grad()
    def _inputs(self, ctx: Any, layers: Sequence[int], drops: Mapping[int, Sequence[int]]) -> dict[int, list]:
        store: dict[int, list] = {}
        with capture_inputs(ctx.adapter, layers, store), masked_blocks(ctx.adapter, drops):
            for b in calib_batches(ctx.calib, self.cfg.calib_batch_size):
                ctx.model(input_ids=b.to(ctx.device), use_cache=False)
                ctx.counters.full_model_forwards += 1
        return store

    def _moe_fn(self, ctx: Any, l: int) -> MoeFn:
        dev = next(ctx.adapter.moe_block(l).parameters()).device

        def moe(x: torch.Tensor, drop: Optional[Sequence[int]]) -> torch.Tensor:
            ctx.counters.moe_block_forwards += 1
            return ctx.adapter.moe_forward(l, x.to(dev), drop=list(drop) if drop else None).cpu()
        return moe

    def plan(self, ctx: Any) -> ExpertPlan:
        cfg, a = self.cfg, ctx.adapter
        info = a.model_info()
        cfg.validate(info)                                  # includes the C(n, r) budget, before any pass
        layers = list(a.moe_layers)
        n = {l: a.num_experts(l) for l in layers}
        groups = routing_groups(a)
        for l in layers:
            drop = n[l] - n_kept(cfg.expert_sparsity, n[l])
            if drop % groups[l]:
                raise ConfigError("expert_pruner.expert_sparsity", cfg.expert_sparsity,
                                  f"a fraction whose removed count ({drop}) is divisible by n_group={groups[l]}")
        meta: dict[str, Any] = {"variant": cfg.variant, "loss": "sum over batches of ||Z - Z_hat||_F (fp64)"}
        before = ctx.counters.as_dict()
        drops: dict[int, tuple[int, ...]] = {}
        losses: dict[str, dict[str, float]] = {}
        with timed(meta):
            xs = self._inputs(ctx, layers, {})
            zs = {l: [self._moe_fn(ctx, l)(x, None) for x in xs[l]] for l in layers}
            for l in layers:
                if cfg.variant == "progressive":
                    xs[l] = self._inputs(ctx, [l], drops)[l]
                drops[l], loss = enumerate_drops(self._moe_fn(ctx, l), xs[l], zs[l], n[l],
                                                 n_kept(cfg.expert_sparsity, n[l]), groups[l])
                best = sorted(loss.items(), key=lambda kv: kv[1])[:10]
                losses[str(l)] = {",".join(map(str, k)): v for k, v in best}
                del zs[l]
                if cfg.variant == "layerwise":
                    del xs[l]
        keep = {l: [e for e in range(n[l]) if e not in drops[l]] for l in layers}
        meta.update(candidates_per_layer={str(l): math.comb(n[l], len(keep[l])) for l in layers},
                    dropped={str(l): list(d) for l, d in drops.items()}, best_losses=losses,
                    forward_passes=counters_delta(ctx, before))
        return ExpertPlan.from_keep("lu_combinatorial", n, keep, "slice_router", **meta)
