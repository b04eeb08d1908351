"""Expert plans in streaming mode: the in-memory pruners, fed from the checkpoint or a streaming pass.

* ``stun``: ``StunPruner.plan`` runs unchanged on ``CheckpointAdapter``, a view of the skeleton's
  adapter whose ``router_weight(l)`` and ``expert(l, e)`` read the tensors straight from the
  memory-mapped shards. Router mode therefore reads the router rows of every layer and, for the
  representative choice, the expert tensors of multi-member clusters only (``reads`` counts them).
  Co-activation / mixed modes first run a streaming calibration pass and hand the counts to the
  pruner through its own ``coactivation_path`` input (a temporary torch file).
* ``frequency`` / ``routing_score``: the pruner's own ``scores`` + ``select`` on ``LayerStats`` from
  the streaming calibration pass (per decoder layer, batch 1, through ``StreamingEngine``). Integer
  routing counts equal the in-memory full-model pass whenever the routing decisions are equal; a
  different batch size can change router logits in the last bit, which only matters at exact ties.
* ``random``: ``plan(ctx)`` needs expert counts only (meta shapes).
Others (``lu_combinatorial``, ``router_change``) run MoE-block forwards on whole-model state and are
refused with a ConfigError.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError
from ..pruning.expert.plan import ExpertPlan
from .checkpoint import LEGACY, native_key
from .engine import StreamingEngine
from .store import LayerStore

SUPPORTED = ("none", "stun", "frequency", "routing_score", "random")


class CheckpointAdapter:
    """Delegates to the skeleton adapter; routers and experts come from the checkpoint."""

    def __init__(self, store: LayerStore) -> None:
        self._store, self._a = store, store.adapter
        self.reads = {"router": 0, "expert": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._a, name)

    def _key(self, l: int, rel: str) -> str:
        s = self._store
        src = native_key(rel, s.arch, s.layer_format(l))
        try:
            return s.reader.layer_keys[l][src]
        except KeyError:
            raise ConfigError("checkpoint key", f"layer {l}: {src}", "a key of the checkpoint",
                              hint=f"format {s.layer_format(l)!r}") from None

    def router_weight(self, l: int) -> torch.Tensor:
        spec = self._a.spec
        self.reads["router"] += 1
        return self._store.reader.get(self._key(l, f"{spec.moe_attr}.{spec.router_attr}.weight"))

    def expert(self, l: int, e: int) -> dict[str, torch.Tensor]:
        """Expert e of layer l as {gate [I,H], up [I,H], down [H,I]} read from the shards."""
        self.reads["expert"] += 1
        s, spec = self._store, self._a.spec
        ex = f"{spec.moe_attr}.{spec.experts_attr}"
        r = s.reader
        if spec.layout == "modulelist":
            g, u, d = (r.get(self._key(l, f"{ex}.{e}.{n}.weight")) for n in spec.modulelist_names)
            return {"gate": g, "up": u, "down": d}
        if s.layer_format(l) == "legacy":
            names = LEGACY[s.arch].names
            g, u, d = (r.get(self._key(l, f"{ex}.{e}.{n}.weight")) for n in names)
            return {"gate": g, "up": u, "down": d}
        gu = r.get_slice(self._key(l, f"{ex}.gate_up_proj"), e)
        down = r.get_slice(self._key(l, f"{ex}.down_proj"), e)
        if spec.layout == "fused":
            i = gu.shape[0] // 2
            return {"gate": gu[:i], "up": gu[i:], "down": down}
        return {"gate": gu[:, 0::2].T, "up": gu[:, 1::2].T, "down": down.T}


def calibration_stats(store: LayerStore, calib: torch.Tensor, device: torch.device, counters: Any = None,
                      keep_logits: bool = False, offload_dir: Optional[str] = None) -> dict[int, Any]:
    """Per-MoE-layer ``LayerStats`` of the dense model from one streaming pass (nothing pruned)."""
    stats: dict[int, Any] = {}
    engine = StreamingEngine(store, calib, device, select=lambda t: False, counters=counters,
                             desc="calibrate", layer_stats=stats, keep_logits=keep_logits,
                             offload_dir=offload_dir)
    engine.run(lambda l, targets, st: False)
    if engine.offload is not None:
        engine.offload.cleanup()
    return stats


def plan_streaming(pruner: Any, store: LayerStore, ctx: Any, offload_dir: Optional[str] = None) -> Optional[ExpertPlan]:
    """The expert plan of `pruner` (an instantiated expert pruner) for the model in `store`."""
    from ..pruning.expert.baselines import RandomPruner, _ObservedPruner
    from ..pruning.expert.stun import StunPruner
    name = getattr(getattr(pruner, "cfg", None), "name", None) or getattr(pruner, "name", None)
    if isinstance(pruner, StunPruner):
        return _plan_stun(pruner, store, ctx, offload_dir)
    if isinstance(pruner, _ObservedPruner):
        return _plan_observed(pruner, store, ctx, offload_dir)
    if isinstance(pruner, RandomPruner):
        return pruner.plan(ctx)
    if name in (None, "none") or not hasattr(pruner, "plan"):
        return None
    raise ConfigError("expert_pruner (streaming mode)", name, SUPPORTED,
                      hint="this method runs MoE-block forwards on the whole model; use runtime.streaming=false")


def _plan_stun(pruner: Any, store: LayerStore, ctx: Any, offload_dir: Optional[str]) -> ExpertPlan:
    view = CheckpointAdapter(store)
    vctx = _with_adapter(ctx, view)
    cfg = pruner.cfg
    if cfg.distance == "router" or cfg.coactivation_path:
        plan = pruner.plan(vctx)
    else:
        stats = calibration_stats(store, ctx.calib, ctx.device, ctx.counters, offload_dir=offload_dir)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "coactivation.pt"
            torch.save({l: st.coact.float() for l, st in stats.items()}, path)
            cfg.coactivation_path = str(path)
            try:
                plan = pruner.plan(vctx)
            finally:
                cfg.coactivation_path = None
        plan.meta["coactivation_source"] = "streaming calibration pass (per layer, batch 1)"
    plan.meta["checkpoint_reads"] = dict(view.reads)
    return plan


def _plan_observed(pruner: Any, store: LayerStore, ctx: Any, offload_dir: Optional[str]) -> ExpertPlan:
    """``_ObservedPruner.plan`` with the observer statistics from the streaming pass."""
    from ..pruning.expert.common import routing_groups, timed
    from ..pruning.expert.selection import select
    cfg, a = pruner.cfg, store.adapter
    cfg.validate(a.model_info())
    layers = list(a.moe_layers)
    meta: dict[str, Any] = {"scope": cfg.scope}
    before = ctx.counters.as_dict()
    with timed(meta):
        stats = calibration_stats(store, ctx.calib, ctx.device, ctx.counters,
                                  keep_logits=pruner.keep_logits, offload_dir=offload_dir)
        scores = pruner.scores(stats, layers)
        keep = select(scores, cfg.expert_sparsity, a.top_k, cfg.scope, routing_groups(a))
    now = ctx.counters.as_dict()
    meta.update(scores={str(l): [float(x) for x in s] for l, s in scores.items()},
                forward_passes={k: now[k] - before.get(k, 0) for k in now})
    return ExpertPlan.from_keep(pruner.method, {l: a.num_experts(l) for l in layers}, keep, "slice_router", **meta)


def _with_adapter(ctx: Any, adapter: Any) -> Any:
    import copy
    out = copy.copy(ctx)
    out.adapter = adapter
    return out

