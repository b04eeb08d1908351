"""Runtimes: how a run holds its model. The stages (``pipeline.py``) are written once; a runtime
decides how the model is loaded, how a decoder layer is materialised and released while pruning,
how an expert plan is made and applied, how the pruned model is saved and how it is evaluated.

* ``in_memory`` (``runtime=default``): the whole model on ``device``.
* ``streaming`` (``runtime=streaming``, ``streaming/runtime.py``): one decoder layer at a time from
  the checkpoint's safetensors shards, written into a new sharded checkpoint as it is pruned.

Expert pruners declare what they need (``needs``):
  ``weights``            router / expert weights only (STUN router distance, random);
  ``calibration_stats``  one observed calibration pass: ``observer(adapter, layers)`` is a context
                         manager active while the MoE blocks run, ``plan_from_stats(stats, adapter,
                         ctx)`` turns its ``.stats`` into a plan (frequency, routing score, REAP, ...);
  ``whole_model``        forwards through the whole model or other whole-model state (Lu et al.,
                         router change): in memory only.
In memory every pruner simply runs ``plan(ctx)``; the streaming runtime dispatches on ``needs``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from omegaconf import DictConfig

class Runtime(Protocol):
    name: str
    model: torch.nn.Module          # the model (streaming: its skeleton, layers on the meta device)
    adapter: Any
    tokenizer: Any
    model_dir: Optional[Path]       # the toy's folder (task files, dense-eval cache), else None
    source: str                     # the checkpoint read (a local folder or a Hub id)
    dtype: torch.dtype
    device: torch.device

    def bind(self, run_dir: Optional[Path]) -> None: ...
    def load_tokenizer(self) -> Any: ...
    def load(self) -> None: ...
    def weight_report(self, nonzero_only: bool = False, is_targeted: Any = None, digest: bool = True) -> dict: ...
    def make_engine(self, ctx: Any, desc: str, select: Any, gram: bool = False, final: bool = False,
                    weighted: bool = True) -> Any: ...
    def plan_experts(self, pruner: Any, ctx: Any) -> Any: ...
    def apply_plan(self, plan: Any) -> None: ...
    def write(self, ctx: Any) -> None: ...
    def finish(self, run_dir: Optional[Path], report: dict) -> Optional[Path]: ...
    def discard(self) -> None: ...
    def evaluate(self, eval_cfg: Any, dense: bool) -> dict: ...
    def facts(self) -> Optional[dict]: ...


def torch_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """The toy in fp32; ``model.dtype=auto`` = bf16 on CUDA, fp32 on CPU."""
    if cfg.model.kind == "toy":
        return torch.float32
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]


def model_source(cfg: DictConfig) -> tuple[str, Optional[Path], Optional[str]]:
    """(checkpoint to load, the toy's folder or None, the pre-fine-tuning checkpoint or None).
    The toy is built here on first use (or read from its cache)."""
    if cfg.model.kind == "toy":
        from stun_exp.toy.build import ensure_toy, ensure_toy_pair
        if cfg.model.finetune_domain:
            path, pre = ensure_toy_pair(cfg.model)
            return str(path), Path(path), str(pre)
        path = ensure_toy(cfg.model)
        return str(path), Path(path), None
    return str(cfg.model.name_or_path), None, cfg.model.get("pretrained_path")


class InMemoryRuntime:
    """The whole model on ``device`` (``device_map`` spreads a model too big for one device)."""
    name = "in_memory"

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.source, self.model_dir, self.pretrained_path = model_source(cfg)
        self.dtype = torch_dtype(cfg, device)
        self.model: Any = None
        self.adapter: Any = None
        self.tokenizer: Any = None

    def bind(self, run_dir: Optional[Path]) -> None:
        """Nothing to place: the model lives in memory."""

    def load_tokenizer(self) -> Any:
        from stun_exp.models.loading import load_tokenizer
        self.tokenizer = load_tokenizer(self.source, bool(self.cfg.model.get("trust_remote_code", False)))
        return self.tokenizer

    def load(self) -> None:
        from stun_exp.models.adapter import get_adapter
        from stun_exp.models.loading import load_pretrained
        m = self.cfg.model
        self.model, _ = load_pretrained(self.source, dtype=self.dtype, device=str(self.device),
                                        trust_remote_code=bool(m.get("trust_remote_code", False)),
                                        device_map=m.get("device_map"), with_tokenizer=False)
        self.adapter = get_adapter(self.model)

    # ---- analysis ------------------------------------------------------------------------------
    def weight_report(self, nonzero_only: bool = False, is_targeted: Any = None, digest: bool = True) -> dict:
        """Census, kurtosis, mask digest (and targeted counts) from one read of every weight."""
        from stun_exp.analysis.weight_report import weight_report
        return weight_report(self.model, self.adapter, nonzero_only, is_targeted, digest)

    # ---- pruning -------------------------------------------------------------------------------
    def make_engine(self, ctx: Any, desc: str, select: Any, gram: bool = False, final: bool = False,
                    weighted: bool = True) -> Any:
        from stun_exp.pruning.weights.engine import SequentialEngine
        return SequentialEngine(self.model, self.adapter, ctx.calib, self.device, select, ctx.counters,
                                gram=gram, desc=desc, final=final, weighted=weighted)

    def plan_experts(self, pruner: Any, ctx: Any) -> Any:
        return pruner.plan(ctx)

    def apply_plan(self, plan: Any) -> None:
        from stun_exp.models.surgery import apply_plan
        apply_plan(self.adapter, plan)

    # ---- output --------------------------------------------------------------------------------
    def write(self, ctx: Any) -> None:
        """Nothing to write: the pruned model is the in-memory one."""

    def discard(self) -> None:
        """Nothing half-written to remove (a checkpoint is saved atomically)."""

    def facts(self) -> Optional[dict]:
        return None

    def finish(self, run_dir: Optional[Path], report: dict) -> Optional[Path]:
        """Save the pruned model when asked (``save_checkpoint=true``)."""
        if not (self.cfg.save_checkpoint and run_dir):
            return None
        from stun_exp.models.loading import save_pretrained
        return save_pretrained(self.model, self.tokenizer, run_dir / "checkpoint", report=report)

    def evaluate(self, eval_cfg: Any, dense: bool) -> dict:
        from stun_exp.evaluation import evaluate
        return evaluate(self.model, self.tokenizer, eval_cfg, model_dir=str(self.model_dir) if self.model_dir else None)
