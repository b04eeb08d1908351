"""RunContext: what every stage receives. Built once by ``run.run``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig


@dataclass
class Counters:
    """Forward-pass accounting reported in results.json."""
    full_model_forwards: int = 0      # full-model forward passes (one per calibration batch per pass)
    moe_block_forwards: int = 0       # isolated MoE-block forward passes (Lu et al. candidates, ...)
    layer_forwards: int = 0           # single decoder-layer forwards (sequential engine)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RunContext:
    cfg: DictConfig
    model: torch.nn.Module
    tokenizer: Any
    adapter: Any                       # stun_exp.models.adapter.MoEAdapter
    calib: torch.Tensor                # LongTensor [nsamples, seqlen] of token ids
    device: torch.device
    run_dir: Optional[str] = None
    counters: Counters = field(default_factory=Counters)
    dense_state: Optional[dict] = None # original (dense) state dict on CPU when a later stage needs it (KD)
    info: dict = field(default_factory=dict)   # free-form facts stages hand to later stages / results
    runtime: Any = None                # stun_exp.runtime.Runtime: how layers are materialised (None: in memory)
    on_progress: Optional[Callable[[str, dict], None]] = None   # stage progress as it happens (W&B)

    def progress(self, stage: str, row: dict) -> None:
        """Report a result as soon as it exists (a pruned layer, a plan); never fails the run."""
        if self.on_progress is not None:
            self.on_progress(stage, row)

    def make_engine(self, desc: str, select: Callable[[Any], bool], gram: bool = False,
                    final: bool = False, weighted: bool = True) -> Any:
        """The sequential layer engine of this run's runtime (in memory when no runtime is set)."""
        if self.runtime is not None:
            return self.runtime.make_engine(self, desc, select, gram=gram, final=final, weighted=weighted)
        from stun_exp.pruning.weights.engine import SequentialEngine
        return SequentialEngine(self.model, self.adapter, self.calib, self.device, select, self.counters,
                                gram=gram, desc=desc, final=final, weighted=weighted)
