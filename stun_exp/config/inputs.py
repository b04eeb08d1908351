"""Inputs checked before the model loads: files, datasets, devices, and combinations that need sizes.

``check_inputs(cfg, info)`` runs after ``validate`` (values) and before anything expensive. Each
failure is one ``ConfigError``/``DataError`` line naming the key and the path or value:

* the run folder root (``out_root``) must be writable (model folders are checked by ``validate``,
  before their config is read: see ``config.files``);
* ``calib=tokens``: an integer tensor [n, seqlen] with n >= nsamples, width >= seqlen and ids in
  [0, vocab_size) of the model; ``calib=text``: a non-empty UTF-8 text file, or JSON lines whose every
  line is an object with the text field (the first bad line is named); ``calib=c4/wikitext2``: cached
  or downloadable now (as the evaluation datasets);
* STUN's ``coactivation_path``: a torch file with one [E, E] tensor per MoE layer of this model;
* ``device``: a CUDA device only where one exists (``cuda:<i>`` with i < the device count);
* a total ``sparsity`` target the expert phase alone would already exceed (computed from the model's
  shapes on the meta device: no weights are read).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from stun_exp.config.files import check_out_root, check_text
from stun_exp.errors import ConfigError, DataError


_CHECKED: set[str] = set()   # configs already checked in this process (the CLI checks before Hydra runs)


def check_inputs(cfg: DictConfig, info: Any) -> None:
    """Every check of the module docstring that applies to ``cfg`` (raises on the first failure)."""
    import hashlib

    from omegaconf import OmegaConf
    key = hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()
    if key in _CHECKED:
        return
    _check_all(cfg, info)
    _CHECKED.add(key)


def _check_all(cfg: DictConfig, info: Any) -> None:
    check_out_root(cfg.out_root)
    check_calib(cfg.calib, info)
    if cfg.expert_pruner.name == "stun" and cfg.expert_pruner.get("coactivation_path"):
        check_coactivation(cfg.expert_pruner.coactivation_path, info)
    check_device(cfg.device)
    if cfg.eval.name != "none":
        from stun_exp.evaluation.availability import check_available
        check_available(cfg.eval, model_cfg=cfg.model)
    from stun_exp.config.sparsity import resolve
    request = resolve(cfg)
    if request.total is not None and cfg.expert_pruner.name != "none":
        check_expert_share(cfg, info, request.total, request.total_source == "default")


# ---- calibration data --------------------------------------------------------------------------
def check_calib(calib: DictConfig, info: Any) -> None:
    if calib.name == "tokens":
        check_tokens(calib.path, int(calib.nsamples), int(calib.seqlen), _vocab(info))
    elif calib.name == "text":
        check_text(calib.path, calib.text_field)
    elif calib.name in ("c4", "wikitext2"):
        check_calib_dataset(calib)


def _vocab(info: Any) -> Optional[int]:
    v = (getattr(info, "extra", None) or {}).get("vocab_size")
    return int(v) if v else None


def check_tokens(path: str, nsamples: int, seqlen: int, vocab: Optional[int]) -> None:
    """A saved integer tensor [n >= nsamples, >= seqlen] of ids in [0, vocab)."""
    import torch
    key = "calib.path"
    try:
        ids = torch.load(os.path.expanduser(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the same user error
        raise DataError(f"{key}={path}: not a torch.save'd tensor ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"{key}={path}: holds a {type(ids).__name__}, expected a tensor [nsamples, seqlen] of "
                        "token ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataError(f"{key}={path}: dtype {ids.dtype}, expected integer token ids (torch.long)")
    if ids.dim() != 2:
        raise DataError(f"{key}={path}: shape {tuple(ids.shape)}, expected 2 dimensions [nsamples, seqlen]")
    if ids.shape[0] < nsamples or ids.shape[1] < seqlen:
        raise DataError(f"{key}={path}: shape {tuple(ids.shape)}, fewer than calib.nsamples={nsamples} rows "
                        f"x calib.seqlen={seqlen} tokens")
    used = ids[:nsamples, :seqlen]
    lo, hi = int(used.min()), int(used.max())
    if lo < 0:
        raise DataError(f"{key}={path}: negative token id {lo}")
    if vocab is not None and hi >= vocab:
        raise DataError(f"{key}={path}: token id {hi} >= the model's vocab_size {vocab}")


def check_calib_dataset(calib: DictConfig) -> None:
    """A hub calibration dataset must be cached, or downloadable now (as the evaluation datasets)."""
    from stun_exp.evaluation.availability import cache_dirs, hub_reachable, is_cached, offline
    if is_cached(calib.dataset):
        return
    if not offline() and hub_reachable():
        return
    where = " or ".join(str(r) for r in cache_dirs())
    raise DataError(f"calib={calib.name}: dataset '{calib.dataset}' is not cached and the Hugging Face Hub is "
                    f"unreachable/offline. Cache it on a machine with network and copy it into {where}, or use "
                    "calib=text calib.path=<file> / calib=tokens calib.path=<ids.pt>.")


# ---- STUN co-activation counts -------------------------------------------------------------------
def check_coactivation(path: str, info: Any) -> None:
    import torch
    key = "expert_pruner.coactivation_path"
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ConfigError(key, str(path), "an existing torch file (layer -> [E, E] counts)")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{key}={path}: not a torch.save'd file ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{key}={path}: holds a {type(raw).__name__}, expected a dict layer -> [E, E] tensor")
    for l in info.moe_layers:
        t = raw.get(l, raw.get(str(l)))
        n = info.experts_per_layer[l]
        got = None if t is None else tuple(getattr(t, "shape", ()))
        if got != (n, n):
            raise ConfigError(key, str(path), f"a file mapping each MoE layer to a [{n}, {n}] tensor "
                              f"(layer {l}: got {got})")


# ---- devices ---------------------------------------------------------------------------------------
def check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ConfigError("device", device, "cpu or auto on a machine without a CUDA device")
    if ":" in device and int(device.split(":")[1]) >= n:
        raise ConfigError("device", device, f"cuda:0 .. cuda:{n - 1} (this machine has {n} CUDA device(s))")


# ---- sizes: the expert phase's share of the total target ----------------------------------------
def check_expert_share(cfg: DictConfig, info: Any, total: float, is_default: bool = False) -> None:
    """Refuse a total target that the experts this pruner removes would already exceed."""
    from stun_exp.config.validate import as_schema
    node = as_schema(cfg.expert_pruner)
    removed = node.experts_removed(info) if hasattr(node, "experts_removed") else None
    if not removed:
        return
    share = decoder_sizes_of(cfg).expert_share(removed)
    if share > total + 1e-9:
        what = " (the default total target)" if is_default else ""
        raise ConfigError("sparsity", total, f"at least {share:.4f}{what}: expert_pruner={cfg.expert_pruner.name} "
                          f"removes {removed} experts, {share:.2%} of the original decoder Linear weights on "
                          "its own (set a higher sparsity, prune fewer experts, or give the unstructured pruner "
                          "its own ratio: sparsity=null / unstructured_pruner.sparsity=...)")


def decoder_sizes_of(cfg: DictConfig) -> Any:
    """Decoder sizes of the run's model from its shapes (meta device; the toy from its own fields)."""
    from stun_exp.models.sizes import decoder_sizes, meta_model
    if cfg.model.kind == "toy":
        import torch
        from stun_exp.toy.config import as_toy_cfg
        from stun_exp.toy.train import make_model
        with torch.device("meta"):
            return decoder_sizes(make_model(as_toy_cfg(cfg.model)))
    from stun_exp.models.loading import config_for
    trust = bool(cfg.model.get("trust_remote_code", False))
    return decoder_sizes(meta_model(config_for(cfg.model.name_or_path, trust), trust, cfg.model.name_or_path))
