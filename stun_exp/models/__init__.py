"""Model loading, the MoE adapter table and expert surgery (see adapter.py for the public API)."""
from .adapter import MoEAdapter, ModelInfo, Target, get_adapter, model_info_from_config

__all__ = ["MoEAdapter", "ModelInfo", "Target", "get_adapter", "model_info_from_config"]
