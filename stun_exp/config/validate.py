"""Validate every config group before any model loads.

Each group's node is converted to its schema dataclass (Hydra already type-checked it while
composing) and its ``validate(info)`` runs. ``info`` (a ModelInfo) comes from the model *config*
only: the toy's own fields, or the checkpoint's config.json (cheap; a hub id that is not cached
fails here, before anything expensive).
"""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from stun_exp.config.core import validate_root
from stun_exp.errors import ConfigError

GROUPS = ["model", "calib", "expert_pruner", "unstructured_pruner", "distill", "eval", "logger", "runtime"]


def as_schema(node: DictConfig) -> Any:
    """The schema dataclass instance behind a group node (or the plain container)."""
    return OmegaConf.to_object(node)


def toy_info(m: DictConfig) -> Any:
    """The toy's ModelInfo straight from its fields (it is a Mixtral: every layer is MoE)."""
    from stun_exp.models.info import ModelInfo
    from stun_exp.toy.config import MAX_POSITIONS
    layers = list(range(int(m.num_layers)))
    return ModelInfo("MixtralForCausalLM", len(layers), layers, {l: int(m.num_experts) for l in layers},
                     int(m.top_k), int(m.hidden_size), MAX_POSITIONS)


def model_info(cfg: DictConfig) -> Any:
    """ModelInfo from the model config alone (no weights)."""
    if cfg.model.kind == "toy":
        return toy_info(cfg.model)
    from stun_exp.models.adapter import model_info_from_config
    from stun_exp.models.loading import config_for
    return model_info_from_config(config_for(cfg.model.name_or_path, cfg.model.trust_remote_code))


def validate(cfg: DictConfig) -> Optional[Any]:
    """Raise ConfigError (one line: key, value, what is allowed) on the first bad value."""
    validate_root(cfg)
    nodes = {g: as_schema(cfg[g]) for g in GROUPS if g in cfg and cfg[g] is not None}
    for g, node in nodes.items():
        if hasattr(node, "validate"):
            node.validate(None, prefix=g)
    info = model_info(cfg)
    for g, node in nodes.items():
        if hasattr(node, "validate"):
            node.validate(info, prefix=g)
    _cross_checks(cfg, info)
    return info


def _cross_checks(cfg: DictConfig, info: Any) -> None:
    up = cfg.unstructured_pruner
    if cfg.sparsity is not None and up.name != "none" and getattr(up, "nm", None):
        raise ConfigError("sparsity", cfg.sparsity, "null when unstructured_pruner.nm is set "
                          "(N:M fixes the unstructured ratio at 0.5)")
    if cfg.expert_pruner.name != "none" and not info.moe_layers:
        raise ConfigError("expert_pruner", cfg.expert_pruner.name, "none for a model without MoE layers")
    if cfg.expert_pruner.name == "router_change":
        _check_pretrained_pair(cfg, info)


def _check_pretrained_pair(cfg: DictConfig, info: Any) -> None:
    """router_change needs the pre-fine-tuning checkpoint, with the same expert layout."""
    path = cfg.expert_pruner.pretrained_path or cfg.model.get("pretrained_path")
    if path is None:
        if cfg.model.kind == "toy" and cfg.model.finetune_domain:
            return                              # the toy pair: built together with the fine-tuned toy
        raise ConfigError("expert_pruner.pretrained_path", None, "the checkpoint the model was fine-tuned "
                          "from (or model=toy_ft, whose pair is built for you)")
    from stun_exp.models.adapter import model_info_from_config
    from stun_exp.models.loading import config_for
    pre = model_info_from_config(config_for(str(path), cfg.model.get("trust_remote_code", False)))
    if (pre.experts_per_layer, pre.hidden_size) != (info.experts_per_layer, info.hidden_size):
        raise ConfigError("expert_pruner.pretrained_path", str(path), "a checkpoint with the model's expert "
                          f"layout (it has experts {pre.experts_per_layer}, hidden {pre.hidden_size}; the model "
                          f"has {info.experts_per_layer}, hidden {info.hidden_size})")
