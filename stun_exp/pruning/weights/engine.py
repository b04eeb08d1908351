"""The one sequential layer engine every unstructured pruner runs on (docs/methods.md, "Shared machinery").

    capture   the inputs of every calibration sample to decoder layer 0, plus the keyword
              arguments each decoder layer receives (attention mask, position ids, rotary
              position_embeddings, ...), by running the model once with the decoder layers
              replaced by identities (no layer compute) and aborting after the last one.
              Keeping per-layer kwargs matters for models whose layers get different masks
              (sliding / full attention).
    per layer l
      move    layer l (and only it) to the compute device
      observe one forward per sample (batch 1, as the reference): input hooks on the targeted
              non-expert matrices (matrices that read one tensor, like q/k/v, share its
              statistics, computed once); the adapter's ExpertObserver for routed experts, so expert
              statistics come from the tokens the CURRENT (already pruned upstream) router sends
      process the pruner's callback (score -> allocate -> mask, or SparseGPT update)
      re-run  the pruned layer to produce layer l+1's inputs (skipped when nothing changed,
              and after the last layer, whose outputs feed nothing)
      return  the layer to its original device

In the pass that prunes (``final=True``) the observe forward's outputs are the dense layer's, which
the re-run replaces, so from the second sample on fused routed experts stop after their gating
step (``ExpertObserver.outputs``): no down projections, a third of the experts' compute. Every
statistic is the same. It only happens when, on the first sample, no targeted matrix read its
input after the experts ran (such a matrix might read the experts' output; a shared expert run
after the routed ones keeps it off, conservatively). A layer whose observe outputs are incomplete
is re-run even when nothing in it changed.

The engine knows no method; pruners plug in a ``process(l, targets, stats) -> bool`` callback.
Non-finite weights or activations raise DataError naming the layer and module.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from stun_exp.errors import DataError
from stun_exp.pruning.weights.stats import TargetStats, input_hooks

Process = Callable[[int, list, Optional[dict]], bool]
_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


class _Stop(Exception):
    """Raised inside the patched decoder layers to abort the capture forward."""


@dataclass
class Captured:
    hidden: Tensor                                   # [n, T, H] layer-0 inputs on the compute device
    layer_args: list = field(default_factory=list)   # per layer: (extra positional args, kwargs)
    hidden_as_kwarg: bool = False


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside (nested) tuples/lists/dicts; leave anything else untouched."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def check_finite(t: Tensor, where: str) -> None:
    """DataError when ``t`` holds NaN or inf. A finite sum proves every entry finite (a NaN or inf
    entry makes the sum NaN or inf); only a non-finite sum, which finite entries can also give by
    overflow, pays for the entrywise test."""
    if torch.isfinite(t.sum()) or torch.isfinite(t).all():
        return
    raise DataError(f"non-finite values (NaN/inf) in {where}")


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, calib: Tensor,
                   device: torch.device) -> Captured:
    """Layer-0 inputs for every sample and each layer's call arguments (from sample 0)."""
    n, last = calib.shape[0], len(layers) - 1
    cap = Captured(hidden=torch.empty(0), layer_args=[None] * len(layers))
    state = {"j": 0}

    def patched(i: int) -> Callable:
        def fwd(*args: Any, **kwargs: Any) -> Tensor:
            hs = args[0] if args else kwargs.pop("hidden_states")
            cap.hidden_as_kwarg = not args
            if i == 0:
                if cap.hidden.numel() == 0:
                    cap.hidden = torch.empty((n,) + tuple(hs.shape[1:]), dtype=hs.dtype, device=device)
                cap.hidden[state["j"]] = hs[0].to(device)
            if state["j"] == 0:
                kw = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
                cap.layer_args[i] = (tuple(args[1:]), kw)
            if i == last or state["j"] > 0:
                raise _Stop
            return hs
        return fwd

    emb_dev = model.get_input_embeddings().weight.device
    for i, layer in enumerate(layers):
        layer.forward = patched(i)
    try:
        for j in range(n):
            state["j"] = j
            try:
                model(input_ids=calib[j:j + 1].to(emb_dev), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in layers:
            del layer.forward
    check_finite(cap.hidden, "the inputs of decoder layer 0")
    return cap


class SequentialEngine:
    """Drives one pass over the decoder layers (see module docstring)."""

    def __init__(self, model: nn.Module, adapter: Any, calib: Optional[Tensor], device: torch.device,
                 select: Callable[[Any], bool], counters: Any = None, gram: bool = False,
                 desc: str = "prune", final: bool = False, weighted: bool = True) -> None:
        self.model, self.adapter, self.calib, self.device = model, adapter, calib, torch.device(device)
        self.select, self.counters, self.gram, self.desc = select, counters, gram, desc
        self.final = final                       # the pass that prunes (module docstring)
        self.weighted = weighted                 # record the gate-weighted expert sums (TargetStats.gsq)
        self.partial_layers = 0                  # layers whose observe forward skipped the experts' output
        self.layer_forwards = 0
        self.layer_seconds: list[float] = []     # wall time per layer (observe + process + re-run)

    # ---- public -------------------------------------------------------------------------------
    def run(self, process: Process, observe: bool = True) -> None:
        """One pass: for each layer, observe (when ``observe``), process, propagate."""
        layers = self.adapter.layers
        cap = capture_inputs(self.model, layers, self.calib, self.device) if observe else None
        inps = cap.hidden if cap else None
        for l in tqdm(range(len(layers)), desc=self.desc, leave=False):
            start = time.perf_counter()
            layer = layers[l]
            home = _device_of(layer)
            layer.to(self.device)
            targets = [t for t in self.adapter.linear_targets(l) if self.select(t)]
            for t in targets:
                check_finite(t.weight, f"layer {l} module {t.name} (weights)")
            if cap is None:
                process(l, targets, None)
            else:
                args = to_device(cap.layer_args[l], self.device)
                stats, outs = self._observe(l, layer, targets, inps, args, cap.hidden_as_kwarg)
                changed = process(l, targets, stats)
                if (changed or outs is None) and l + 1 < len(layers):
                    outs = self._propagate(l, layer, inps, args, cap.hidden_as_kwarg)
                inps = outs
            layer.to(home)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.layer_seconds.append(time.perf_counter() - start)

    # ---- internals ----------------------------------------------------------------------------
    def _forward(self, layer: nn.Module, h: Tensor, args: tuple, as_kw: bool) -> Tensor:
        extra, kw = args
        out = layer(*extra, hidden_states=h, **kw) if as_kw else layer(h, *extra, **kw)
        self.layer_forwards += 1
        if self.counters is not None:
            self.counters.layer_forwards += 1
        return out[0] if isinstance(out, (tuple, list)) else out

    def _alloc(self, like: Tensor) -> Tensor:
        """Buffer for one layer's outputs (a subclass may return a file-backed CPU tensor)."""
        return torch.empty_like(like)

    def _release(self, buf: Tensor) -> None:
        """A buffer from ``_alloc`` that is no longer needed (a subclass may delete its file)."""

    def _sample(self, inps: Tensor, j: int) -> Tensor:
        """Sample j of the layer inputs, on the compute device, batch dimension kept."""
        return inps[j:j + 1].to(self.device)

    def _propagate(self, l: int, layer: nn.Module, inps: Tensor, args: tuple, as_kw: bool) -> Tensor:
        outs = self._alloc(inps)
        with torch.no_grad():
            for j in range(inps.shape[0]):
                outs[j] = self._forward(layer, self._sample(inps, j), args, as_kw)[0]
        check_finite(outs, f"layer {l} (output activations)")
        return outs

    def _observe(self, l: int, layer: nn.Module, targets: list, inps: Tensor, args: tuple,
                 as_kw: bool) -> tuple[dict[str, TargetStats], Optional[Tensor]]:
        """(statistics of every target, the layer's outputs or None when they were not computed)."""
        for t in targets:
            if t.kind != "expert" and t.module is None:
                raise DataError(f"layer {l} module {t.name}: no module to hook for its inputs")
        order = _ReadOrder()
        hooks = input_hooks(targets, self.gram, on_read=order.read)
        want_experts = any(t.kind == "expert" for t in targets)
        try:
            with _expert_observer(self.adapter, l, self.gram, want_experts, self.weighted) as obs:
                if obs is not None:
                    obs.on_experts = order.experts
                outs = self._alloc(inps)
                calls = None
                with torch.no_grad():
                    for j in range(inps.shape[0]):
                        if j == 1 and obs is not None:
                            obs.on_experts = None
                            obs.outputs = not (self.final and order.experts_last())
                        before = _counts(obs, l)
                        outs[j] = self._forward(layer, self._sample(inps, j), args, as_kw)[0]
                        calls = _add_calls(calls, before, _counts(obs, l))
                expert_stats = obs.stats.get(l) if obs is not None else None
                partial = obs is not None and obs.skipped > 0
        finally:
            for h in hooks.values():
                h.remove()
        check_finite(outs, f"layer {l} (output activations)")
        if partial:            # the experts' share is missing: not the layer's outputs
            self.partial_layers += 1
            self._release(outs)
            outs = None
        stats = {name: h.result(self.device) for name, h in hooks.items()}
        if want_experts:
            stats.update(_expert_target_stats(l, targets, expert_stats, calls, inps.shape[0]))
        for name, st in stats.items():
            check_finite(st.sq, f"layer {l} module {name} (input activations)")
        return stats, outs


class _ReadOrder:
    """Whether, in one layer forward, the routed experts ran after every targeted matrix had read
    its input (then nothing targeted reads the experts' output, and it may be skipped)."""

    def __init__(self) -> None:
        self.experts_ran = False
        self.read_after = False

    def experts(self) -> None:
        self.experts_ran = True

    def read(self) -> None:
        self.read_after = self.read_after or self.experts_ran

    def experts_last(self) -> bool:
        return self.experts_ran and not self.read_after


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class _NullCtx:
    stats: dict = {}

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _expert_observer(adapter: Any, l: int, gram: bool, wanted: bool, weighted: bool = True) -> Any:
    """The adapter observer for layer l's routed experts (a context manager), or a no-op."""
    if not wanted:
        return _NullCtx()
    from stun_exp.observe.observer import ExpertObserver
    return ExpertObserver(adapter, layers=[l], gram=gram, weighted=weighted)


def _counts(obs: Any, l: int) -> Optional[Tensor]:
    if obs is None:
        return None
    st = obs.stats.get(l)
    return None if st is None else _field(st, "count").detach().clone()


def _add_calls(calls: Optional[Tensor], before: Optional[Tensor], after: Optional[Tensor]) -> Optional[Tensor]:
    """Count, per expert, the samples in which it received at least one token."""
    if after is None:
        return calls
    hit = (after - (before if before is not None else torch.zeros_like(after))) > 0
    return hit.long() if calls is None else calls + hit.long()


def _expert_target_stats(l: int, targets: list, st: Optional[dict], calls: Optional[Tensor],
                         nblock: int) -> dict[str, TargetStats]:
    """Map the observer's per-expert arrays onto the gate/up/down targets of layer l (``nblock``:
    the layer's forward calls while observing, each one a sample under ``block_calls``)."""
    out: dict[str, TargetStats] = {}
    if st is None or int(_field(st, "count").sum()) == 0:
        # every calibration token is routed somewhere: no routed token at all means the observer
        # did not see the experts run (e.g. an experts implementation it cannot intercept)
        raise DataError(f"layer {l}: the expert observer recorded no routed tokens for any expert")
    for t in targets:
        if t.kind != "expert":
            continue
        e, down = t.expert, t.matrix == "down"
        gram_key = "gram_h" if down else "gram_x"
        gram = _field(st, gram_key)
        gsq = _field(st, "ghsq" if down else "gxsq") if _field(st, "weighted") is not False else None
        out[t.name] = TargetStats(
            sq=_field(st, "hsq" if down else "xsq")[e].float(),
            gsq=None if gsq is None else gsq[e].float(),
            gram=None if gram is None else gram[e].float(),
            ncalls=int(calls[e]) if calls is not None else 0,
            ntokens=int(_field(st, "count")[e]), nblock=nblock)
    return out


def _field(st: Any, name: str) -> Any:
    """Observer statistics are a LayerStats object (attributes); accept a plain dict too."""
    return st.get(name) if isinstance(st, dict) else getattr(st, name, None)
