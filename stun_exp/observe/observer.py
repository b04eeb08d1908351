"""ExpertObserver: one calibration pass records per-MoE-layer routing and expert-input statistics.

    with ExpertObserver(adapter, layers=None, gram=False, keep_logits=False, weighted=True) as obs:
        model(batch)                      # or a single decoder layer / MoE block forward
    obs.stats[l]                          # LayerStats (see stats.py)

How it sees what the model really does, without changing outputs (unless told to skip them) or
holding activations:
- Fused experts (transformers 5): a custom entry "stun_observe" in transformers'
  ``ALL_EXPERTS_FUNCTIONS`` registry is switched on only inside the ``with`` block (the previous
  implementation is restored on exit). It receives the model's own (hidden, top_k_index,
  top_k_weights), records the statistics and returns the previous implementation's output
  (bit-identical). Router logits come from a forward hook on the router.
- ModuleList experts (Arctic remote code): a forward pre-hook on the MoE block re-runs the router
  and the adapter's routing rule (tested equal to the model's) and recomputes act(gate x)·up x for
  the routed tokens (extra compute during calibration only).
- ``outputs = False`` (set by a caller that re-runs the layer anyway, e.g. the pruning pass of the
  sequential engine): fused experts stop after their gating step and return zeros instead of
  their output, so the down projections (a third of the experts' compute) are not spent on a
  result nobody reads. Every statistic is recorded exactly as with outputs on.
- zero_output-pruned layers keep their router, so the routing recorded is the model's real one
  (pruned experts are still chosen and counted; their h is zero).
Anything that calls a router or experts module while observing is recorded, including
``adapter.moe_forward`` (with its ``drop`` mask applied).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..models.adapter import MoEAdapter
from .stats import LayerStats, add_logits, observe_tokens

IMPL_NAME = "stun_observe"
_ACTIVE: dict[int, tuple["ExpertObserver", int, bool]] = {}   # id(experts) -> (observer, layer, observed?)


def _previous_forward(self: nn.Module, obs: "ExpertObserver"):
    """The experts implementation that was active before observing (eager = the class's own forward)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    eager = type(self).forward.__wrapped__
    prev = obs._prev_impl
    return eager if prev in (None, "eager") else ALL_EXPERTS_FUNCTIONS.get_interface(prev, eager)


def _observe_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward that records statistics and returns exactly what the previous implementation would.

    Under "eager" the per-expert loop is the eager math, so x -> h is computed once and reused for the
    output. Under any other implementation (grouped_mm, ...) that implementation computes the output
    (bit-identical to the unobserved model, bf16 included); h is taken from its own gating step when
    its row layout is known and was checked equal to a recomputation, else recomputed per expert.
    """
    entry = _ACTIVE.get(id(self))
    if entry is None:
        raise RuntimeError("experts implementation 'stun_observe' used outside an ExpertObserver")
    obs, l, observed = entry
    prev = _previous_forward(self, obs)
    if not observed:
        return prev(self, hidden_states, top_k_index, top_k_weights)
    if obs.on_experts is not None:
        obs.on_experts()
    ad, st = obs.adapter, obs._layer_stats(l)
    hidden_fn = lambda e, x: ad.expert_hidden(l, e, x)
    if obs._prev_impl in (None, "eager"):
        out = torch.zeros_like(hidden_states)
        observe_tokens(st, hidden_states, top_k_index, top_k_weights, hidden_fn,
                       lambda e, h: ad.expert_output(l, e, h), out if obs.outputs else None)
        if not obs.outputs:
            obs.skipped += 1
        return out
    with torch.no_grad():
        out, rows = _forward_keeping_hidden(self, prev, obs._prev_impl, hidden_states, top_k_index,
                                            top_k_weights, obs.outputs)
        if rows is not None and l not in obs._rows_checked:
            obs._rows_checked[l] = rows_match(rows, hidden_states, top_k_index, hidden_fn)
        if not obs._rows_checked.get(l, False):
            rows = None
        observe_tokens(st, hidden_states, top_k_index, top_k_weights, hidden_fn, hidden_rows=rows)
    if out is None:
        obs.skipped += 1
        out = torch.zeros_like(hidden_states)
    return out


# Row order of the gated hidden states [N*k, I] inside the known fused implementations, as a
# function of the flattened expert ids: grouped_mm sorts the (token, slot) pairs by expert id
# (``torch.sort``, which is deterministic, so the same call reproduces its permutation);
# batched_mm keeps the flat (token, slot) order.
_ROW_ORDER = {"grouped_mm": lambda ids: torch.sort(ids).indices, "batched_mm": lambda ids: None}


class _GateDone(Exception):
    """Raised from inside the experts implementation once its gated hidden states exist."""


def _forward_keeping_hidden(ex: nn.Module, prev: Any, impl: Optional[str], x: torch.Tensor,
                            ids: torch.Tensor, w: torch.Tensor, outputs: bool = True
                            ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(prev's output or None, its gated hidden states in flat (token, slot) order [N*k, I] or None).

    The hidden states are read from the implementation's one call of ``_apply_gate`` (the input
    of every down projection); None when the layout is unknown or the gate was not called once.
    ``outputs=False``: the implementation is stopped right after that call (no down projections)
    and the output is None; where the gate cannot be intercepted it does not run at all.
    """
    order = _ROW_ORDER.get(impl or "")
    gate = getattr(type(ex), "_apply_gate", None)
    if order is None or gate is None or "_apply_gate" in vars(ex):
        return (prev(ex, x, ids, w) if outputs else None), None
    seen: list[torch.Tensor] = []

    def keep(gate_up: torch.Tensor) -> torch.Tensor:
        h = gate(ex, gate_up)
        seen.append(h)
        if not outputs:
            raise _GateDone
        return h
    ex._apply_gate = keep
    try:
        out = prev(ex, x, ids, w)
    except _GateDone:
        out = None
    finally:
        del ex._apply_gate
    flat = ids.reshape(-1)
    if len(seen) != 1 or seen[0].shape[0] != flat.shape[0]:
        return out, None
    perm = order(flat)
    if perm is None:
        return out, seen[0]
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(perm.shape[0], device=perm.device)
    return out, seen[0][pos]


def rows_match(rows: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, hidden_fn: Any) -> bool:
    """Whether the kept rows of every expert routed in this call equal a per-expert recomputation,
    bit for bit. Checked on a layer's first call: a fused kernel can round differently from the
    per-expert product on some CPUs (seen as one 1-ulp entry of one expert among eight for GPT-OSS
    on AVX-512 while the first expert matched), and the layer then uses the recomputation."""
    for e in torch.unique(ids).tolist():
        tok, pos = torch.where(ids == e)
        if not torch.equal(rows[tok * ids.shape[1] + pos], hidden_fn(e, x[tok])):
            return False
    return True


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    if IMPL_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPL_NAME, _observe_experts_forward)


class ExpertObserver:
    """Context manager recording ``LayerStats`` for the chosen MoE layers (default: all)."""

    def __init__(self, adapter: MoEAdapter, layers: Optional[list[int]] = None, gram: bool = False,
                 keep_logits: bool = False, weighted: bool = True) -> None:
        self.adapter, self.gram, self.keep_logits, self.weighted = adapter, gram, keep_logits, weighted
        moe = adapter.moe_layers
        self.layers = list(moe if layers is None else layers)
        bad = [l for l in self.layers if l not in moe]
        if bad:
            raise ValueError(f"layers {bad} are not MoE layers; MoE layers: {moe}")
        self.stats: dict[int, LayerStats] = {}
        self._handles: list[Any] = []
        self._keys: list[int] = []
        self._prev_impl: Optional[str] = None
        self._rows_checked: dict[int, bool] = {}   # layer -> kept hidden rows verified equal to recompute
        self.outputs = True            # False: fused experts return zeros, not their output (docstring)
        self.skipped = 0               # experts calls that returned zeros instead of their output
        self.on_experts: Optional[Callable[[], None]] = None   # called as each observed experts call starts

    # ---- stats -------------------------------------------------------------------------------
    def _layer_stats(self, l: int) -> LayerStats:
        if l not in self.stats:
            d = self.adapter.expert(l, 0)
            self.stats[l] = LayerStats(self.adapter.num_experts(l), d["gate"].shape[1], d["gate"].shape[0],
                                       gram=self.gram, keep_logits=self.keep_logits, weighted=self.weighted)
        return self.stats[l]

    def reset(self) -> None:
        self.stats.clear()

    # ---- hooks -------------------------------------------------------------------------------
    def _router_hook(self, l: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            add_logits(self._layer_stats(l), output[0] if isinstance(output, tuple) else output)
        return hook

    def _modulelist_hook(self, l: int):
        ad = self.adapter

        @torch.no_grad()
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            h = args[0] if args else next(iter(kwargs.values()))
            x = h.reshape(-1, h.shape[-1])
            logits = ad.router_logits(l, x)
            add_logits(self._layer_stats(l), logits)
            ids, w = ad.route(l, logits)
            observe_tokens(self._layer_stats(l), x, ids, w, lambda e, xe: ad.expert_hidden(l, e, xe))
        return hook

    # ---- context -----------------------------------------------------------------------------
    def __enter__(self) -> "ExpertObserver":
        try:
            return self._enter()
        except BaseException:
            self.__exit__()
            raise

    def _enter(self) -> "ExpertObserver":
        ad = self.adapter
        fused = ad.spec.layout != "modulelist"
        for l in (ad.moe_layers if fused else []):
            ex = ad.experts(l)
            if id(ex) in _ACTIVE:
                raise RuntimeError(f"layer {l} is already being observed (nested observers)")
            _ACTIVE[id(ex)] = (self, l, l in self.layers)
            self._keys.append(id(ex))
        for l in self.layers:
            if fused:
                self._handles.append(ad.router(l).register_forward_hook(self._router_hook(l)))
            else:
                self._handles.append(ad.moe_block(l).register_forward_pre_hook(
                    self._modulelist_hook(l), with_kwargs=True))
        if fused:
            _register()
            self._prev_impl = ad.config._experts_implementation
            _set_impl(ad.model, IMPL_NAME)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for key in self._keys:
            _ACTIVE.pop(key, None)
        self._keys.clear()
        if self._prev_impl is not None:
            _set_impl(self.adapter.model, self._prev_impl)
            self._prev_impl = None


def _set_impl(model: nn.Module, name: str) -> None:
    """Switch the experts implementation of every (sub)config of the model."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    else:   # not a PreTrainedModel: set the config attribute directly
        model.config._experts_implementation = name
