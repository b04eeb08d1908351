"""ModelInfo: static facts of a model config. Torch-free, so config validation stays fast."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelInfo:
    """Static facts read from a model config (no weights needed)."""
    arch: str
    num_layers: int
    moe_layers: list[int]
    experts_per_layer: dict[int, int]
    top_k: int
    hidden_size: int
    max_position_embeddings: int
    n_group: int = 1
    extra: dict = field(default_factory=dict)
