"""Validate a composed config before any model loads; torch-free, so a bad value costs about a second.

Order: keys no schema knows (``+key=`` included; with the closest real key), mandatory values left
empty, the root keys, every group's generic field checks (finite floats) and its own
``validate(None)``, the sparsity knobs (``config.sparsity.resolve``), then the checks that need model
facts: ``info`` (a ModelInfo) comes from the model *config* only — the toy's own fields, or the
checkpoint's config.json (a hub id that is not cached fails here). Checks that read files or need
torch (calibration tensors, safetensors headers, model sizes) are in ``config.inputs``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from stun_exp.config.core import ROOT_KEYS, validate_root
from stun_exp.errors import ConfigError, DataError

GROUPS = ["model", "calib", "expert_pruner", "unstructured_pruner", "distill", "eval", "logger", "runtime"]
# Keys Hydra adds or reads beside the schema fields.
_EXTRA_ROOT = {"hydra"}
_EXTRA_GROUP = {"_target_"}


def as_schema(node: DictConfig) -> Any:
    """The schema dataclass instance behind a group node (or the plain container)."""
    return OmegaConf.to_object(node)


def check_keys(cfg: DictConfig) -> None:
    """Every key is one a schema knows; a typo (also an added ``+key=``) names the closest real key."""
    for key in cfg.keys():
        if key not in ROOT_KEYS and key not in _EXTRA_ROOT:
            raise ConfigError.unknown_key(str(key), cfg.get(key), ROOT_KEYS)
    for g in GROUPS:
        node = cfg.get(g)
        if not isinstance(node, DictConfig):
            continue
        cls = OmegaConf.get_type(node)
        known = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        if not known:
            continue
        for key in node.keys():
            if key not in known and key not in _EXTRA_GROUP:
                raise ConfigError.unknown_key(f"{g}.{key}", node.get(key),
                                              [f"{g}.{k}" for k in known if k != "_target_"],
                                              f"{g}={node.get('name', node.get('kind', g))}")


def check_missing(cfg: DictConfig) -> None:
    """Mandatory values (``???``) left empty: one line naming the key."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        group = key.split(".")[0]
        node = cfg.get(group) if group in GROUPS else None
        choice = (node.get("name") or node.get("kind") or "") if isinstance(node, DictConfig) else ""
        raise ConfigError.missing(key, f" with {group}={choice}" if choice else "")


def toy_info(m: DictConfig) -> Any:
    """The toy's ModelInfo straight from its fields (it is a Mixtral: every layer is MoE)."""
    from stun_exp.models.info import ModelInfo
    from stun_exp.toy.config import MAX_POSITIONS
    layers = list(range(int(m.num_layers)))
    return ModelInfo("MixtralForCausalLM", len(layers), layers, {l: int(m.num_experts) for l in layers},
                     int(m.top_k), int(m.hidden_size), MAX_POSITIONS, extra={"vocab_size": int(m.vocab_size)})


def model_info(cfg: DictConfig) -> Any:
    """ModelInfo from the model config alone (no weights)."""
    if cfg.model.kind == "toy":
        return toy_info(cfg.model)
    return checkpoint_info("model.name_or_path", cfg.model.name_or_path, cfg.model.trust_remote_code)


def checkpoint_info(key: str, name_or_path: str, trust_remote_code: bool) -> Any:
    """ModelInfo of a local or cached checkpoint; its files are checked first (one line naming them)."""
    from stun_exp.config.files import check_model_dir
    check_model_dir(key, name_or_path)
    from stun_exp.models.adapter import model_info_from_config
    from stun_exp.models.loading import config_for
    try:
        config = config_for(name_or_path, trust_remote_code)
    except (ConfigError, DataError):
        raise
    except Exception as e:  # noqa: BLE001 — transformers' own errors about a bad config.json
        raise DataError(f"{key}={name_or_path}: its config cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    return model_info_from_config(config)


def validate(cfg: DictConfig) -> Optional[Any]:
    """Raise ConfigError (one line: key, value, what is allowed) on the first bad value; return the
    ModelInfo the model-dependent checks used."""
    check_keys(cfg)
    check_missing(cfg)
    validate_root(cfg)
    nodes = {g: as_schema(cfg[g]) for g in GROUPS if g in cfg and cfg[g] is not None}
    for g, node in nodes.items():
        if hasattr(node, "check_fields"):
            node.check_fields(g)
        if hasattr(node, "validate"):
            node.validate(None, prefix=g)
    from stun_exp.config.sparsity import resolve
    request = resolve(cfg)
    info = model_info(cfg)
    _cross_checks(cfg, info, request)
    for g, node in nodes.items():
        if hasattr(node, "validate"):
            node.validate(info, prefix=g)
    return info


def _cross_checks(cfg: DictConfig, info: Any, request: Any) -> None:
    """Combinations of groups (checked before each group's model-dependent values)."""
    if cfg.eval.name == "toy" and cfg.model.kind != "toy" and not cfg.eval.get("task_dir"):
        raise ConfigError("eval", "toy", "eval=toy only with model=toy (or set eval.task_dir); use eval=paper, "
                          "eval=ppl or eval=none for other models")
    if cfg.expert_pruner.name != "none" and not info.moe_layers:
        raise ConfigError("expert_pruner", cfg.expert_pruner.name, "none for a model without MoE layers "
                          f"({info.arch})")
    up = cfg.unstructured_pruner
    if up.name != "none":
        from stun_exp.pruning.weights.configs import check_unused_components
        check_unused_components(up)
    if up.name != "none" and not info.moe_layers and up.get("scope") == "experts":
        raise ConfigError("unstructured_pruner.scope", up.scope, "experts+attention or all_decoder_linear: "
                          f"the model ({info.arch}) has no routed experts to prune")
    if cfg.distill.name != "none" and not info.moe_layers:
        raise ConfigError("distill", cfg.distill.name, "none for a model without MoE layers (expert-wise KD)")
    if cfg.expert_pruner.name == "router_change":
        _check_pretrained_pair(cfg, info)
    if cfg.runtime.streaming:
        _check_streaming(cfg)


def _check_streaming(cfg: DictConfig) -> None:
    """What the streaming runtime cannot honour (it never holds the whole model)."""
    ep = cfg.expert_pruner.name
    node = as_schema(cfg.expert_pruner)
    if ep != "none" and (not hasattr(node, "needs") or node.needs() == "whole_model"):
        raise ConfigError("expert_pruner", ep, "a pruner that reads weights or one calibration pass with "
                          "runtime=streaming (this method needs the whole model: use runtime=default)")
    if cfg.distill.name != "none":
        raise ConfigError("distill", cfg.distill.name, "none with runtime=streaming (distillation trains "
                          "the whole model; use runtime=default)")


def _check_pretrained_pair(cfg: DictConfig, info: Any) -> None:
    """router_change needs the pre-fine-tuning checkpoint, with the same expert layout."""
    path = cfg.expert_pruner.pretrained_path or cfg.model.get("pretrained_path")
    if path is None:
        if cfg.model.kind == "toy" and cfg.model.finetune_domain:
            return                              # the toy pair: built together with the fine-tuned toy
        raise ConfigError("expert_pruner.pretrained_path", None, "the checkpoint the model was fine-tuned "
                          "from (or model=toy_ft, whose pair is built for you)")
    pre = checkpoint_info("expert_pruner.pretrained_path", str(path), cfg.model.get("trust_remote_code", False))
    if (pre.experts_per_layer, pre.hidden_size) != (info.experts_per_layer, info.hidden_size):
        raise ConfigError("expert_pruner.pretrained_path", str(path), "a checkpoint with the model's expert "
                          f"layout (it has experts {pre.experts_per_layer}, hidden {pre.hidden_size}; the model "
                          f"has {info.experts_per_layer}, hidden {info.hidden_size})")
