"""Typed schema of the toy MoE (``model=toy``, ``model=toy_tiny``, ``model=toy_ft``).

The toy is a transformers ``MixtralForCausalLM`` that the project trains itself (see
``stun_exp.toy.build.ensure_toy``). Scaling the expert count at similar total size: keep
``num_experts * intermediate_size`` constant, e.g. 8x256, 16x128, 32x64, 64x32 (each ~3.2M
expert parameters at hidden 128), and raise ``top_k`` in the same ratio if the *active* size should
stay fixed too (8/top-2 -> 16/top-4 ...). Depth (``num_layers``) and width (``hidden_size``) are
independent knobs; ``hidden_size`` must be a multiple of ``num_heads``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from stun_exp.config.schema import Validatable, check_choice, check_range, schema
from stun_exp.errors import ConfigError
from stun_exp.toy.corpus import DOMAINS

MAX_POSITIONS = 512  # > seq_len so lm-eval prompts + generation fit (torch-free: validation reads it)

# Fields that do not change the trained weights (excluded from the cache key).
NON_WEIGHT_FIELDS = {"kind", "cache_dir", "finetune_domain", "finetune_steps", "eval_after_build", "threads"}
POSITIVE_INTS = ("num_experts", "top_k", "num_layers", "hidden_size", "num_heads",
                 "intermediate_size", "vocab_size", "seq_len", "train_steps", "batch_size",
                 "finetune_steps")


@schema("model", "toy")
@dataclass
class ToyModelCfg(Validatable):
    """The embedded default model; the runner calls ``stun_exp.toy.build.ensure_toy(cfg)``."""

    kind: str = "toy"
    num_experts: int = 8
    top_k: int = 2
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 256
    vocab_size: int = 384
    seq_len: int = 128
    train_steps: int = 2400  # fixed step count (not wall time) so the build is deterministic
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    finetune_domain: Optional[str] = None
    finetune_steps: int = 200
    eval_after_build: bool = True  # store quick dense scores in toy_meta.json (~10 s)
    # torch intra-op threads of the run (the runner applies them; null = torch's default, every core).
    # The toy's matrices are too small to gain from a second thread, and on a busy 2-core machine two
    # threads made the toy's lm-eval suite ~25x slower than one.
    threads: Optional[int] = 1
    cache_dir: str = "${oc.env:STUN_EXP_CACHE,'~/.cache/stun_exp'}"

    def validate(self, info: Optional[Any] = None, prefix: str = "model") -> None:
        for name in POSITIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{prefix}.{name}", v, "a positive integer")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise ConfigError(f"{prefix}.threads", self.threads, "null or a positive integer")
        if self.top_k > self.num_experts:
            raise ConfigError(f"{prefix}.top_k", self.top_k, f"an integer <= num_experts ({self.num_experts})")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{prefix}.hidden_size", self.hidden_size,
                              f"a multiple of num_heads ({self.num_heads})")
        if self.vocab_size < 64:
            raise ConfigError(f"{prefix}.vocab_size", self.vocab_size, "an integer >= 64")
        check_range(f"{prefix}.lr", self.lr, 0.0, 1.0, lo_open=True)
        if self.seed < 0:
            raise ConfigError(f"{prefix}.seed", self.seed, "a non-negative integer")
        check_choice(f"{prefix}.kind", self.kind, ["toy"])
        if self.finetune_domain is not None:
            check_choice(f"{prefix}.finetune_domain", self.finetune_domain, list(DOMAINS))


def as_toy_cfg(cfg: Any) -> ToyModelCfg:
    """Accept a ToyModelCfg, an OmegaConf node or a plain mapping; resolve interpolations."""
    if isinstance(cfg, ToyModelCfg):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    known = {f.name for f in fields(ToyModelCfg)}
    unknown = set(cfg) - known - {"_target_"}
    if unknown:
        raise ConfigError("model", sorted(unknown), sorted(known), "unknown toy config keys")
    out = ToyModelCfg(**{k: v for k, v in cfg.items() if k in known})
    out.validate()
    return out


def resolve_cache_dir(cache_dir: str) -> Path:
    """Expand ``~`` and resolve the OmegaConf env interpolation when given the raw default."""
    if cache_dir.startswith("${"):
        from omegaconf import OmegaConf
        cache_dir = OmegaConf.create({"d": cache_dir}).d
    return Path(os.path.expanduser(cache_dir)).resolve()


def weight_fields(cfg: ToyModelCfg) -> dict:
    """The config fields that determine the pretrained weights (the cache key)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NON_WEIGHT_FIELDS}
