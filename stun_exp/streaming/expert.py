"""What expert pruners read in streaming mode, without the model in memory.

* ``CheckpointAdapter``: a view of the skeleton's adapter whose ``router_weight(l)`` and
  ``expert(l, e)`` read the tensors straight from the memory-mapped shards (``reads`` counts them):
  pruners that need weights only (STUN's router distance reads the router rows of every layer and,
  for the representative choice, the experts of multi-member clusters) run their own ``plan`` on it.
* ``calibration_stats``: one streaming calibration pass (per decoder layer, batch 1, through
  ``StreamingEngine``) with the pruner's own observer on each MoE layer. Integer routing counts equal
  the in-memory full-model pass whenever the routing decisions are equal; a different batch size can
  change router logits in the last bit, which only matters at exact ties.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError
from .checkpoint import LEGACY, native_key
from .engine import StreamingEngine
from .store import LayerStore

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
        if s.layer_format(l) == "legacy" and LEGACY[s.arch].names is not None:   # per-expert keys
            g, u, d = (r.get(self._key(l, f"{ex}.{e}.{n}.weight")) for n in LEGACY[s.arch].names)
            return {"gate": g, "up": u, "down": d}
        gu = r.get_slice(self._key(l, f"{ex}.gate_up_proj"), e)
        down = r.get_slice(self._key(l, f"{ex}.down_proj"), e)
        if spec.layout == "fused":
            i = gu.shape[0] // 2
            return {"gate": gu[:i], "up": gu[i:], "down": down}
        return {"gate": gu[:, 0::2].T, "up": gu[:, 1::2].T, "down": down.T}


def calibration_stats(store: LayerStore, calib: torch.Tensor, device: torch.device, counters: Any = None,
                      observer: Optional[Callable[[Any, list[int]], Any]] = None,
                      offload_dir: Optional[str] = None) -> dict[int, Any]:
    """Per-MoE-layer statistics of the dense model from one streaming pass (nothing pruned):
    ``observer(adapter, [l])`` (default: ``ExpertObserver``) wraps the calibration forward of each
    MoE layer and its ``.stats[l]`` is kept (on CPU where it has a ``to``)."""
    stats: dict[int, Any] = {}
    engine = StreamingEngine(store, calib, device, select=lambda t: False, counters=counters,
                             desc="calibrate", layer_stats=stats, layer_observer=observer,
                             offload_dir=offload_dir)
    engine.run(lambda l, targets, st: False)
    if engine.offload is not None:
        engine.offload.cleanup()
    return stats
