"""Model loading, the MoE adapter table and expert surgery (see adapter.py for the public API).

Exports are lazy so that torch-free modules (``models.info``, used by config validation) can be
imported without pulling in torch and transformers.
"""
from typing import Any

__all__ = ["MoEAdapter", "ModelInfo", "Target", "get_adapter", "model_info_from_config"]


def __getattr__(name: str) -> Any:
    if name == "ModelInfo":
        from .info import ModelInfo
        return ModelInfo
    if name in __all__:
        from . import adapter
        return getattr(adapter, name)
    raise AttributeError(name)
