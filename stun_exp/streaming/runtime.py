"""The streaming runtime: prune a checkpoint far larger than memory, one decoder layer at a time.

The runner's stages are the in-memory ones (``pipeline.py``); this runtime supplies them with:

* ``load``: ``LayerStore`` — the model skeleton on the meta device, globals loaded, shards
  memory-mapped; decoder layers are materialised one at a time (the expert plan applied as read).
* ``census`` / ``kurtosis``: one read of every layer, counted / measured while it is materialised.
* ``plan_experts``: by what the pruner ``needs`` — router / expert weights read straight from the
  shards (``CheckpointAdapter``), or one streaming calibration pass with the pruner's own observer on
  each MoE layer (``StreamingEngine``); whole-model pruners are refused at validation.
* ``make_engine``: ``StreamingEngine``; the pruner's final pass (``final=True``) writes each pruned
  layer into a new sharded checkpoint as it goes (``runtime.output_dir`` or ``<run>/checkpoint``).
* ``write`` / ``save``: the remaining layers (when nothing was pruned layer by layer), the globals, the
  index, side files; config and ``PRUNING.md`` via ``models.export.finalize_checkpoint_dir``
  (vanilla when every layer keeps the same count, own modeling code otherwise); the folder is
  renamed into place only when complete.
* ``evaluate``: ``eval=ppl`` streams the windows through the layers (dense: the source checkpoint,
  pruned: the written one); lm-eval suites load the checkpoint in memory (a model that does not fit
  needs ``model.device_map=auto``).

Peak memory: one decoder layer, the globals, one layer boundary of calibration activations (on disk
with ``runtime.offload_activations``) and one layer's statistics.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from ..errors import ConfigError
from ..runtime import model_source, torch_dtype
from .census import LayerReport
from .checkpoint import ShardedWriter
from .engine import StreamingEngine
from .expert import CheckpointAdapter, calibration_stats
from .store import LayerStore

log = logging.getLogger("stun_exp")


class StreamingRuntime:
    name = "streaming"

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        src, self.model_dir, self.pretrained_path = model_source(cfg)
        self.trust = bool(cfg.model.get("trust_remote_code", False))
        self.source = local_dir(src)
        self.dtype = torch_dtype(cfg, device)
        self.store: Optional[LayerStore] = None
        self.model: Any = None
        self.adapter: Any = None
        self.tokenizer: Any = None
        self._out: Optional[_Output] = None
        self.dest: Optional[Path] = None
        self.offload_dir: Optional[str] = None

    # ---- loading -------------------------------------------------------------------------------
    def load_tokenizer(self) -> Any:
        from ..models.loading import load_tokenizer
        self.tokenizer = load_tokenizer(self.source, self.trust)
        return self.tokenizer

    def load(self) -> None:
        self.store = LayerStore(self.source, dtype=self.dtype, trust_remote_code=self.trust)
        self.model, self.adapter = self.store.model, self.store.adapter

    def bind(self, run_dir: Optional[Path]) -> None:
        """Where the pruned checkpoint and the offloaded activations go."""
        rt = self.cfg.runtime
        base = run_dir or Path(tempfile.mkdtemp(prefix="stun-exp-streaming-"))
        self.dest = Path(rt.output_dir) if rt.output_dir else base / "checkpoint"
        if rt.offload_activations:
            self.offload_dir = rt.offload_dir or str(base / "activations")

    # ---- analysis -------------------------------------------------------------------------------
    def weight_report(self, nonzero_only: bool = False, is_targeted: Any = None, digest: bool = True) -> dict:
        """Census, kurtosis, digest (and targeted counts) of the model as it is now: one read of every
        layer, or, once the pruned checkpoint is written, what was measured while writing it."""
        if self._out is not None and self._out.done:
            return self._out.report.finish(self.model, self.adapter)
        rep = LayerReport(is_targeted, nonzero_only, digest)
        for l in range(len(self.store.adapter.layers)):
            self.store.materialise(l, "cpu")
            rep.add_layer(self.store.adapter, l)
            self.store.release(l)
        return rep.finish(self.model, self.adapter)

    # ---- pruning --------------------------------------------------------------------------------
    def make_engine(self, ctx: Any, desc: str, select: Any, gram: bool = False, final: bool = False,
                    weighted: bool = True) -> Any:
        sink = self._output(select, nonzero_only=True) if final else None
        return StreamingEngine(self.store, ctx.calib, self.device, select, ctx.counters, gram=gram, desc=desc,
                               on_layer_done=sink, offload_dir=self.offload_dir, final=final, weighted=weighted)

    def plan_experts(self, pruner: Any, ctx: Any) -> Any:
        import copy
        needs = getattr(pruner, "needs", "whole_model")
        view = CheckpointAdapter(self.store)
        vctx = copy.copy(ctx)
        vctx.adapter = view
        if needs == "weights":
            plan = pruner.plan(vctx)
        elif needs == "calibration_stats":
            stats = calibration_stats(self.store, ctx.calib, self.device, ctx.counters,
                                      observer=pruner.observer, offload_dir=self.offload_dir)
            plan = pruner.plan_from_stats(stats, view, vctx)
            plan.meta["statistics_source"] = "streaming calibration pass (per decoder layer)"
        else:
            raise ConfigError("expert_pruner", getattr(pruner, "name", type(pruner).__name__),
                              "a pruner that needs weights or one calibration pass with runtime=streaming")
        plan.meta["checkpoint_reads"] = dict(view.reads)
        return plan

    def apply_plan(self, plan: Any) -> None:
        self.store.plan = plan

    # ---- output ---------------------------------------------------------------------------------
    def _output(self, select: Any = None, nonzero_only: bool = False) -> "_Output":
        if self._out is None:
            if self.dest is None:
                self.bind(None)
            self._out = _Output(self.store, self.dest, LayerReport(select, nonzero_only))
        return self._out

    def write(self, ctx: Any) -> None:
        """Every layer written (a plain read-apply-write pass when no final pruning pass ran)."""
        out = self._output()
        if not out.written:
            for l in range(len(self.store.adapter.layers)):
                out(l, self.store.materialise(l, "cpu"))
                self.store.release(l)
        out.close()

    def finish(self, run_dir: Optional[Path], report: dict) -> Optional[Path]:
        """Config, side files and PRUNING.md, then the folder is renamed into place."""
        from ..models.export import finalize_checkpoint_dir
        out = self._out
        self.store.copy_side_files(out.tmp)
        finalize_checkpoint_dir(out.tmp, self.model.config, type(self.model), report)
        from ..tracking.files import atomic_replace_dir
        atomic_replace_dir(out.tmp, self.dest)
        return self.dest

    def discard(self) -> None:
        """Remove a half-written output folder (the run failed)."""
        if self._out is not None:
            shutil.rmtree(self._out.tmp, ignore_errors=True)

    def evaluate(self, eval_cfg: Any, dense: bool) -> dict:
        path = self.source if dense else str(self.dest)
        if eval_cfg.name == "ppl":
            return self._streaming_ppl(eval_cfg, path)
        from ..evaluation import evaluate
        from ..models.loading import load_pretrained
        model, _ = load_pretrained(path, dtype=self.dtype, device=str(self.device), trust_remote_code=self.trust,
                                   device_map=self.cfg.model.get("device_map"), with_tokenizer=False)
        return evaluate(model, self.tokenizer, eval_cfg, model_dir=str(self.model_dir) if self.model_dir else None)

    def _streaming_ppl(self, eval_cfg: Any, path: str) -> dict:
        from ..evaluation.perplexity import dataset_tokens
        from .evaluate import streaming_perplexity
        out: dict[str, Any] = {}
        for name in eval_cfg.datasets:
            ids = dataset_tokens(name, self.tokenizer, int(eval_cfg.seqlen), int(eval_cfg.get("c4_nsamples", 256)))
            r = streaming_perplexity(path, ids, int(eval_cfg.seqlen), self.device, self.dtype,
                                     self.cfg.runtime.eval_max_windows, self.offload_dir, self.trust)
            out[f"{name}/ppl"] = r["ppl"]
            out[f"{name}/ppl_windows"] = r["windows"]
        out["eval_settings"] = {"name": "ppl", "streaming": True, "datasets": list(eval_cfg.datasets),
                                "seqlen": int(eval_cfg.seqlen), "max_windows": self.cfg.runtime.eval_max_windows}
        return out

    def facts(self) -> dict:
        """What results.json records about the streaming run."""
        s = self.store
        return {"checkpoint": str(self.dest), "peak_live_layers": s.peak_live, "layer_reads": s.materialised,
                "key_format": sorted(set(s.formats.values())), "dtype": str(s.dtype), "device": str(self.device),
                "offload_dir": self.offload_dir}


def local_dir(src: str) -> str:
    """A hub id resolved to its local snapshot (streaming reads the shards themselves)."""
    if Path(src).is_dir():
        return src
    from ..models.loading import cached_snapshot
    snap = cached_snapshot(src)
    if snap is None:
        raise ConfigError("model.name_or_path", src, "a local checkpoint folder or a cached hub id with "
                          "runtime=streaming")
    return snap


class _Output:
    """The pruned checkpoint being written: one shard per decoder layer, its weight report (census,
    kurtosis of the non-zero weights, mask digest) taken as each layer is written (``on_layer_done``
    of the final engine pass)."""

    def __init__(self, store: LayerStore, dest: Path, report: LayerReport) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.store, self.dest, self.report = store, dest, report
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        self.writer = ShardedWriter(self.tmp, len(store.adapter.layers) + 1)
        self.written: list[int] = []
        self.done = False

    def __call__(self, l: int, layer: Any) -> None:
        self.report.add_layer(self.store.adapter, l)
        self.writer.write(self.store.layer_state(l))
        self.written.append(l)

    def close(self) -> None:
        n = len(self.store.adapter.layers)
        if sorted(self.written) != list(range(n)):
            raise RuntimeError(f"streaming wrote layers {self.written}, expected each of 0..{n - 1} once")
        self.writer.write(self.store.global_state())
        self.writer.close()
        self.done = True
