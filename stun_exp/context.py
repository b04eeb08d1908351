"""RunContext: what every stage receives. Built once by ``run.run``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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
