"""Prune a checkpoint far larger than memory: expert plan, then layer-by-layer pruning, written out.

``prune_streaming(src, dest, expert_pruner, unstructured_pruner, calib, device)``:

1. ``LayerStore(src)``: skeleton on meta, globals loaded, shards memory-mapped.
2. census pass of the dense model (layer reads only) for the sparsity ledger.
3. expert plan (``expert.plan_streaming``); the store applies it to each layer as it is read.
4. if a total ``sparsity`` is asked: a census pass of the expert-pruned layers gives the
   unstructured ratio exactly as ``analysis.sparsity.derive_unstructured_ratio`` does.
5. the unstructured pruner's own ``prune(ctx, sparsity)``, with its engine factory swapped for a
   ``StreamingEngine`` (so OWL's dense outlier pass and SparseGPT run unchanged). The pass whose
   description starts with ``prune`` writes each processed layer to ``dest`` (one shard per layer);
   with ``unstructured_pruner=None`` a plain read-apply-write pass does it.
6. globals copied, side files (tokenizer, remote code) copied, config and ``PRUNING.md`` written by
   ``models.export.finalize_checkpoint_dir`` (vanilla when uniform, own modeling code otherwise),
   index written; everything lands in a temporary folder renamed to ``dest`` at the end.

Peak memory: one decoder layer (plus its expert plan applied), the globals, the calibration
activations of one layer boundary (on disk with ``offload_dir``) and the statistics of one layer.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from ..analysis import sparsity as ledger
from ..context import RunContext
from ..models.export import finalize_checkpoint_dir
from .census import LayerCensus
from .checkpoint import ShardedWriter
from .engine import StreamingEngine
from .expert import plan_streaming
from .store import LayerStore
from ..tracking.files import atomic_replace_dir

log = logging.getLogger("stun_exp")


def census_pass(store: LayerStore, is_targeted: Any = None) -> LayerCensus:
    """Read every layer once (expert plan applied if set) and count."""
    c = LayerCensus(is_targeted)
    for l in range(len(store.adapter.layers)):
        store.materialise(l, "cpu")
        c.add_layer(store.adapter, l)
        store.release(l)
    return c


class _LayerSink:
    """on_layer_done callback: census of the pruned layer, then its shard."""

    def __init__(self, store: LayerStore, writer: ShardedWriter, census: LayerCensus) -> None:
        self.store, self.writer, self.census = store, writer, census
        self.written: list[int] = []

    def __call__(self, l: int, layer: Any) -> None:
        self.census.add_layer(self.store.adapter, l)
        self.writer.write(self.store.layer_state(l))
        self.written.append(l)


def _streaming_engine_factory(store: LayerStore, sink: _LayerSink, offload_dir: Optional[str], pruner: Any) -> Any:
    """Stands in for ``UnstructuredPruner._engine``: the pass named ``prune:*`` writes the layers."""
    def make(ctx: Any, desc: str, gram: bool = False) -> StreamingEngine:
        return StreamingEngine(store, ctx.calib, ctx.device, pruner.is_targeted, ctx.counters, gram=gram,
                               desc=desc, on_layer_done=sink if desc.startswith("prune") else None,
                               offload_dir=offload_dir)
    return make


def _write_pass(store: LayerStore, sink: _LayerSink) -> None:
    for l in range(len(store.adapter.layers)):
        layer = store.materialise(l, "cpu")
        sink(l, layer)
        store.release(l)


def prune_streaming(src: str | Path, dest: str | Path, expert_pruner: Any = None, unstructured_pruner: Any = None,
                    calib: Optional[torch.Tensor] = None, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None, sparsity: Optional[float] = None,
                    offload_dir: Optional[str] = None, trust_remote_code: bool = False,
                    cfg: Any = None) -> dict[str, Any]:
    """Prune the checkpoint at `src` into `dest` holding one decoder layer at a time (see module doc)."""
    t0, times = time.perf_counter(), {}
    device = torch.device(device)
    store = LayerStore(src, dtype=dtype, trust_remote_code=trust_remote_code)
    ctx = RunContext(cfg, store.model, None, store.adapter, calib, device)
    dense = census_pass(store).finish(store.model, store.adapter)
    times["dense_census"] = round(time.perf_counter() - t0, 3)

    t = time.perf_counter()
    plan = plan_streaming(expert_pruner, store, ctx, offload_dir) if expert_pruner is not None else None
    store.plan = plan
    times["expert_pruning"] = round(time.perf_counter() - t, 3)

    un = unstructured_pruner if getattr(unstructured_pruner, "name", "none") != "none" else None
    split = None
    if un is not None and sparsity is not None:
        c = census_pass(store, un.is_targeted)
        split = ledger.ratio_from_counts(float(sparsity), dense, c.c["dec_nz"], *c.targeted)

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        n_layers = len(store.adapter.layers)
        writer = ShardedWriter(tmp, n_layers + 1)
        final = LayerCensus(un.is_targeted if un is not None else None)
        sink = _LayerSink(store, writer, final)
        t = time.perf_counter()
        report: dict[str, Any] = {}
        if un is None:
            _write_pass(store, sink)
        else:
            un._engine = _streaming_engine_factory(store, sink, offload_dir, un)
            try:
                report = un.prune(ctx, sparsity=split["unstructured_ratio"] if split else None)
            finally:
                del un._engine
            report["split"] = split
            report["targeted"] = final.targeted
        times["unstructured_pruning"] = round(time.perf_counter() - t, 3)
        if sorted(sink.written) != list(range(n_layers)):
            raise RuntimeError(f"streaming wrote layers {sink.written}, expected each of 0..{n_layers - 1} once")
        writer.write(store.global_state())
        writer.close()
        now = final.finish(store.model, store.adapter)
        expert = {}
        if plan is not None:
            expert = {"method": plan.method, "experts_before": plan.experts_before,
                      "experts_after": plan.experts_after, "removal": plan.removal, "meta": plan.meta}
        store.copy_side_files(tmp)
        # config (vanilla when uniform, else with its own modeling code) and PRUNING.md, as in memory
        card = {"config": OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg or {}),
                "expert_pruning": expert, "unstructured_pruning": report,
                "sparsity": ledger.sparsity_report(dense, now, report.get("targeted"))}
        finalize_checkpoint_dir(tmp, store.model.config, type(store.model), card)
        atomic_replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    times["total"] = round(time.perf_counter() - t0, 3)
    return {"expert_plan": plan, "expert_pruning": expert, "unstructured_pruning": report,
            "sparsity": ledger.sparsity_report(dense, now, report.get("targeted")),
            "census": {"dense": dense, "pruned": now}, "counters": ctx.counters.as_dict(), "timings": times,
            "streaming": {"checkpoint": str(dest), "peak_live_layers": store.peak_live,
                          "layer_reads": store.materialised,
                          "key_format": sorted(set(store.formats.values())),
                          "dtype": str(store.dtype), "device": str(device),
                          "offload_dir": offload_dir}}


