"""Weight counts from a model's shapes alone: the model is built on the meta device (no memory, no
weights read), so a run can be checked against its sizes before anything is loaded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class DecoderSizes:
    decoder_linear: int               # numel of every prunable 2-D weight in the decoder layers
    expert_numel: dict[int, int]      # per MoE layer: numel of one routed expert's matrices

    def expert_share(self, removed: int) -> float:
        """Fraction of the decoder Linear weights that `removed` experts hold (smallest experts first,
        so the share is never over-estimated when layers differ)."""
        if not self.expert_numel or not self.decoder_linear:
            return 0.0
        return removed * min(self.expert_numel.values()) / self.decoder_linear


def meta_model(config: Any, trust_remote_code: bool = False, src: str = "") -> nn.Module:
    """The model class of `config` instantiated on the meta device (per-layer expert counts applied)."""
    from .loading import model_class
    cls = model_class(config, src, trust_remote_code)
    with torch.device("meta"):
        return cls(config)


def decoder_sizes(model: nn.Module) -> DecoderSizes:
    from .adapter import get_adapter
    a = get_adapter(model)
    total = sum(t.weight.numel() for l in range(len(a.layers)) for t in a.linear_targets(l))
    per = {l: sum(w.numel() for w in a.expert(l, 0).values()) for l in a.moe_layers}
    return DecoderSizes(total, per)
