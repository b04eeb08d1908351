"""``StreamingEngine``: the sequential engine with layers read from disk one at a time.

It is ``pruning.weights.engine.SequentialEngine`` with two hooks around each layer step:
``store.materialise(l)`` instead of ``layer.to(device)`` and, after the step, an optional
``on_layer_done(l, layer)`` (the streaming runner writes the pruned layer there) followed by
``store.release(l)`` instead of ``layer.to(home)``. Observe / process / propagate are the parent's
own methods, so masks equal the in-memory engine's bit for bit.

Two extras:
* ``layer_stats``: when a dict is given, an observer wraps each MoE layer's observe step — the
  expert pruner's own (``layer_observer(adapter, [l])``) or ``ExpertObserver`` — and its statistics
  are stored there on CPU. This is the streaming calibration pass the expert pruners need (select
  nothing, process nothing).
* ``offload_dir``: calibration activations between layers live in files (``torch.from_file``,
  memory-mapped) instead of device memory: the parent's ``_alloc``/``_release`` buffer hooks
  hand out and delete those files; its per-sample ``_sample`` moves each sample to the device.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..pruning.weights import engine as E
from .store import LayerStore

LayerDone = Callable[[int, nn.Module], None]


class StreamingEngine(E.SequentialEngine):
    def __init__(self, store: LayerStore, calib: Optional[Tensor], device: torch.device,
                 select: Callable[[Any], bool], counters: Any = None, gram: bool = False, desc: str = "prune",
                 on_layer_done: Optional[LayerDone] = None, layer_stats: Optional[dict] = None,
                 layer_observer: Optional[Callable[[Any, list[int]], Any]] = None,
                 offload_dir: Optional[str | Path] = None, keep_final: bool = False, final: bool = False,
                 weighted: bool = True) -> None:
        super().__init__(store.model, store.adapter, calib, device, select, counters, gram, desc, final, weighted)
        self.store, self.on_layer_done = store, on_layer_done
        self.layer_stats, self.layer_observer, self.keep_final = layer_stats, layer_observer, keep_final
        self.offload = ActivationFiles(offload_dir) if offload_dir else None

    def run(self, process: E.Process, observe: bool = True) -> None:
        layers = self.adapter.layers
        cap = E.capture_inputs(self.model, layers, self.calib, self.device) if observe else None
        inps, self.final_hidden = None, None
        if cap is not None:
            inps = self.offload.put(cap.hidden) if self.offload else cap.hidden
            cap.hidden = torch.empty(0)
        try:
            for l in tqdm(range(len(layers)), desc=self.desc, leave=False):
                layer = self.store.materialise(l, self.device)
                targets = [t for t in self.adapter.linear_targets(l) if self.select(t)]
                for t in targets:
                    E.check_finite(t.weight, f"layer {l} module {t.name} (weights)")
                if cap is None:
                    process(l, targets, None)
                else:
                    args = E.to_device(cap.layer_args[l], self.device)
                    with self._layer_observer(l):
                        stats, outs = self._observe(l, layer, targets, inps, args, cap.hidden_as_kwarg)
                    changed = process(l, targets, stats)
                    if (changed or outs is None) and (l + 1 < len(layers) or self.keep_final):
                        if outs is not None:
                            self._release(outs)
                        outs = self._propagate(l, layer, inps, args, cap.hidden_as_kwarg)
                    self._release(inps)
                    inps = outs
                if self.on_layer_done is not None:
                    self.on_layer_done(l, layer)
                del layer
                self.store.release(l)
            if self.keep_final:                       # the last layer's outputs (perplexity uses them)
                self.final_hidden, inps = inps, None
        finally:
            if inps is not None:
                self._release(inps)

    @contextmanager
    def _layer_observer(self, l: int) -> Iterator[None]:
        """The pruner's observer around layer l's calibration forward; its stats kept on CPU."""
        if self.layer_stats is None or l not in self.adapter.moe_layers:
            yield
            return
        if self.layer_observer is None:
            from ..observe.observer import ExpertObserver
            obs = ExpertObserver(self.adapter, layers=[l])
        else:
            obs = self.layer_observer(self.adapter, [l])
        with obs:
            yield
        if l in obs.stats:
            st = obs.stats[l]
            self.layer_stats[l] = st.to("cpu") if hasattr(st, "to") else st

    # ---- file-backed activations (offload mode only) ------------------------------------------
    def _alloc(self, like: Tensor) -> Tensor:
        return self.offload.like(like) if self.offload else super()._alloc(like)

    def _release(self, buf: Tensor) -> None:
        if self.offload:
            self.offload.drop(buf)


class ActivationFiles:
    """CPU tensors backed by files in `root` (memory-mapped; the OS pages them in and out)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.paths: dict[int, Path] = {}

    def like(self, t: Tensor) -> Tensor:
        path = self.root / f"acts-{uuid.uuid4().hex}.bin"
        out = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        self.paths[id(out)] = path
        return out

    def put(self, t: Tensor) -> Tensor:
        out = self.like(t)
        out.copy_(t.cpu())
        return out

    def cleanup(self) -> None:
        for path in self.paths.values():
            if path.exists():
                os.unlink(path)
        self.paths.clear()

    def drop(self, t: Tensor) -> None:
        path = self.paths.pop(id(t), None)
        if path is not None and path.exists():
            os.unlink(path)
