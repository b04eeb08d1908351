"""Load / save (possibly expert-pruned) causal LMs: local dirs or Hub ids, never hanging offline.

What plain ``AutoModelForCausalLM.from_pretrained(dir)`` can load after our surgery (``save_pretrained``
below writes the checkpoint through ``export.py``):
- ``zero_output`` models: yes (no shape changes; pruned experts are zeros in the checkpoint).
- ``slice_router`` with the SAME count in every MoE layer: yes (the config's one expert-count key is
  set, e.g. ``num_local_experts``), and so can vLLM-style loaders.
- ``slice_router`` with DIFFERENT counts per layer: with ``trust_remote_code=True`` (the checkpoint
  carries ``modeling_pruned_moe.py``); without it transformers raises a size-mismatch error
  (``ignore_mismatched_sizes=True`` would "load" by silently re-initialising the pruned layers, so we
  never use it). ``load_pretrained`` below needs no remote code: it subclasses the model class so
  that ``__init__`` shrinks each layer to ``config.num_experts_per_layer`` before the weights load,
  which keeps transformers' own key conversion (legacy per-expert keys included) and loading; it
  reads checkpoints written before the code was added to the folder as well.
- ``output_router_logits=True`` fails on non-uniform models (the aux loss uses the global count).

Hub ids: the local HF cache is checked first (``try_to_load_from_cache``); a model that is not
cached fails at once with a message saying what to download when ``HF_HUB_OFFLINE`` is set or the
Hub is unreachable (a 3 s socket probe replaces huggingface_hub's ~24 s of retries).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ConfigError
from .adapter import PER_LAYER_KEY, get_adapter

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE semantics (env var read now, not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache
    try:
        hit = try_to_load_from_cache(repo_id, filename)
    except Exception:   # malformed repo id, unreadable cache
        return False
    return isinstance(hit, str)


def cached_snapshot(repo_id: str) -> Optional[str]:
    """The local snapshot folder of a cached hub model (where its config.json lives), or None."""
    from huggingface_hub import try_to_load_from_cache
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:   # malformed repo id, unreadable cache
        return None
    return str(Path(hit).parent) if isinstance(hit, str) else None


def resolve_source(path_or_id: str) -> tuple[str, bool]:
    """(source, local_files_only). Raises ConfigError at once for an uncached id without network."""
    src = str(path_or_id)
    if Path(src).expanduser().is_dir():
        return str(Path(src).expanduser()), True
    if Path(src).expanduser().exists():
        raise ConfigError("model.name_or_path", src, "a model directory or a Hub id", hint="it is a file")
    if src.startswith(("/", ".", "~")) or src.count("/") > 1 or os.sep != "/" and os.sep in src:
        raise ConfigError("model.name_or_path", src, "an existing model directory or a Hub id 'org/name'",
                          hint="no such directory")
    if _is_cached(src):
        return src, True
    if hub_offline() or not _hub_reachable():
        from huggingface_hub.constants import HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub is unreachable"
        raise ConfigError("model.name_or_path", src, "a local model directory or a Hub id present in the HF cache",
                          hint=f"not in the cache ({HF_HUB_CACHE}) and {why}: on a machine with network run "
                               f"`huggingface-cli download {src}` (same HF_HOME), or copy the model folder "
                               f"here and pass model.name_or_path=<that dir>")
    return src, False


def config_for(path_or_id: str, trust_remote_code: bool = False) -> Any:
    """The model's PretrainedConfig only (cheap; for validation before loading weights)."""
    from transformers import AutoConfig
    src, local = resolve_source(path_or_id)
    return AutoConfig.from_pretrained(src, local_files_only=local, trust_remote_code=trust_remote_code)


def _base_class(config: Any, src: str, trust_remote_code: bool) -> type:
    from transformers import AutoModelForCausalLM
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], src)
    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        raise ConfigError("model config", type(config).__name__, "a causal-LM config known to transformers",
                          hint="remote-code models need model.trust_remote_code=true")
    return mapping[type(config)]


def _uniform(counts: Optional[list]) -> bool:
    return len({c for c in (counts or []) if c is not None}) <= 1


def per_layer_pruned_class(base_cls: type) -> type:
    """Subclass of `base_cls` whose __init__ shrinks each MoE layer to config.num_experts_per_layer.

    Same class name, so the adapter table and ``config.architectures`` are unaffected.
    """
    from .surgery import rebuild_layer

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        base_cls.__init__(self, config, *args, **kwargs)
        adapter = get_adapter(self)
        for l, n in enumerate(getattr(config, PER_LAYER_KEY, None) or []):
            if n is not None and l in adapter.moe_layers and n < adapter.num_experts(l):
                rebuild_layer(adapter, l, [([e], None) for e in range(n)])

    return type(base_cls.__name__, (base_cls,), {"__init__": __init__, "__module__": base_cls.__module__,
                                                 "_stun_per_layer": True})


def model_class(config: Any, src: str, trust_remote_code: bool = False) -> type:
    """The class that loads a checkpoint with this config: transformers' (or the remote code's),
    wrapped to shrink each MoE layer first when the per-layer expert counts differ."""
    cls = _base_class(config, src, trust_remote_code)
    return cls if _uniform(getattr(config, PER_LAYER_KEY, None)) else per_layer_pruned_class(cls)


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, or None when it has none (e.g. a weights-only folder)."""
    src, local = resolve_source(path_or_id)
    return _load_tokenizer(src, local, trust_remote_code)


def _load_tokenizer(src: str, local: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer
    p = Path(src)
    if p.is_dir() and not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                           "tokenizer.model", "vocab.json")):
        return None
    if not p.is_dir() and not _is_cached(src, "tokenizer_config.json") and local:
        return None
    return AutoTokenizer.from_pretrained(src, local_files_only=local, trust_remote_code=trust_remote_code)


def load_pretrained(path_or_id: str, dtype: Any = None, device: str = "cpu",
                    trust_remote_code: bool = False, device_map: Any = None, max_memory: Any = None,
                    offload_folder: str | None = None, with_tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """(model in eval mode on `device`, tokenizer or None). Handles per-layer-pruned checkpoints.

    ``device_map`` ("auto", "balanced", or an explicit map) places a model that does not fit one
    device through accelerate (spilling to CPU / ``offload_folder``); ``device`` is then ignored."""
    from transformers import AutoConfig
    src, local = resolve_source(path_or_id)
    config = AutoConfig.from_pretrained(src, local_files_only=local, trust_remote_code=trust_remote_code)
    cls = model_class(config, src, trust_remote_code)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    model = cls.from_pretrained(src, config=config, local_files_only=local,
                                trust_remote_code=trust_remote_code, **kwargs)
    model = (model if device_map is not None else model.to(device)).eval()
    return model, _load_tokenizer(src, local, trust_remote_code) if with_tokenizer else None


def save_pretrained(model: nn.Module, tokenizer: Any, path: str | os.PathLike,
                    report: Optional[dict] = None) -> Path:
    """Atomic save of a (pruned) model that loads without stun-exp (see ``export.py``): vanilla config
    when every MoE layer keeps the same count, its own modeling code otherwise, plus ``PRUNING.md``
    (``report``: the run's results, optional)."""
    from .export import save_pruned
    return save_pruned(model, tokenizer, path, report)
