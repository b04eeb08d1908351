"""Schemas of the ``distill`` group. Every expert_kd default is a placeholder for the toy (the
MoE-Pruner paper's KD hyper-parameters are not known), not a paper value."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from stun_exp.config.schema import Validatable, check_choice, schema
from stun_exp.errors import ConfigError


@schema("distill", "none")
@dataclass
class NoDistill(Validatable):
    name: str = "none"


@schema("distill", "expert_kd")
@dataclass
class ExpertKDSchema(Validatable):
    _target_: str = "stun_exp.distill.expert_kd.ExpertKD"
    name: str = "expert_kd"
    steps: int = 50
    lr: float = 1e-4
    lambda_mse: float = 1.0
    batch_size: int = 4
    seq_len: Optional[int] = None       # null = the calibration sequence length
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    merged_experts: str = "members"     # members | skip
    eval_batches: int = 2
    seed: int = 0

    def validate(self, info: Optional[Any] = None, prefix: str = "distill") -> None:
        for key in ("steps", "batch_size", "eval_batches"):
            v = getattr(self, key)
            lo = 0 if key == "steps" else 1
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"{prefix}.{key}", v, f"an integer >= {lo}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"{prefix}.seq_len", self.seq_len, "null or an integer >= 2")
        if not self.lr > 0:
            raise ConfigError(f"{prefix}.lr", self.lr, "a number > 0")
        if self.lambda_mse < 0:
            raise ConfigError(f"{prefix}.lambda_mse", self.lambda_mse, "a number >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay", self.weight_decay, "a number >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"{prefix}.max_grad_norm", self.max_grad_norm, "a number > 0, or null (no clipping)")
        if self.seed < 0:
            raise ConfigError(f"{prefix}.seed", self.seed, "a non-negative integer")
        check_choice(f"{prefix}.merged_experts", self.merged_experts, ["members", "skip"])
