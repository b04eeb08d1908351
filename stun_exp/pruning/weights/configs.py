"""Schemas of the ``unstructured_pruner`` group (CONTRACT: field names are used by outside tools).

Shared fields
  sparsity              ratio over the targeted weights, in [0, 1). A top-level ``sparsity`` (total
                        target) overrides it: the runner derives the ratio and passes it to prune().
  nm                    null | "2:4" | "4:8": N pruned of every M input columns. N:M always means
                        50%, so ``sparsity`` must then be 0.5 or null (null = 0.5). A derived ratio
                        other than 0.5 is refused at prune time (set the top-level sparsity=null).
  scope                 experts | experts+attention | all_decoder_linear (the STUN/Wanda reference:
                        every Linear in the decoder layers, router included)
  prune_router, prune_shared_experts, prune_dense_mlp
                        add (true) or remove (false) that kind on top of ``scope``; the schema
                        defaults agree with each method's scope.
  zero_token_experts    leave_dense (the STUN reference: an expert no calibration token reached is
                        skipped) | magnitude (prune it by |W| with the method's comparison rule)
OWL: owl_m (M), owl_lambda (lambda), owl_weighting (uniform = reference; params = the layer
sparsities are shifted so the parameter-weighted mean hits the target), owl_expert_samples
(block_calls = STUN's Mixtral code: each MoE block call is one sample of every expert's running
mean, tokens or not; routed_calls = only the calls that routed the expert >= 1 token).
SparseGPT: blocksize, percdamp.
Extra (not in the contract): row_rounding = floor (reference: floor(C_in*s) per row) | balanced
(total round(numel*s) per matrix; for narrow toy matrices where floor undershoots the target).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from stun_exp.config.schema import Validatable, check_choice, check_range, schema
from stun_exp.errors import ConfigError

SCOPES = ["experts", "experts+attention", "all_decoder_linear"]
NM_PATTERNS = [None, "2:4", "4:8"]
ZERO_TOKEN_POLICIES = ["leave_dense", "magnitude"]
OWL_WEIGHTINGS = ["uniform", "params"]
OWL_EXPERT_SAMPLES = ["block_calls", "routed_calls"]
_PKG = "stun_exp.pruning.weights.pruners"


@dataclass
class UnstructuredBase(Validatable):
    _target_: str = f"{_PKG}.WandaPruner"
    name: str = "wanda"
    sparsity: Optional[float] = 0.5
    nm: Optional[str] = None
    scope: str = "all_decoder_linear"
    prune_router: bool = True
    prune_shared_experts: bool = True
    prune_dense_mlp: bool = True
    zero_token_experts: str = "leave_dense"
    row_rounding: str = "floor"

    def validate(self, info: Optional[Any] = None, prefix: str = "unstructured_pruner") -> None:
        if self.sparsity is not None:
            check_range(f"{prefix}.sparsity", self.sparsity, 0.0, 1.0)
        if self.nm not in NM_PATTERNS:
            raise ConfigError(f"{prefix}.nm", self.nm, ["null", "2:4", "4:8"])
        if self.nm is not None and self.sparsity is not None and abs(self.sparsity - 0.5) > 1e-9:
            raise ConfigError(f"{prefix}.sparsity", self.sparsity, f"0.5 or null when nm={self.nm!r} "
                              "(N:M always prunes half)")
        check_choice(f"{prefix}.scope", self.scope, SCOPES)
        check_choice(f"{prefix}.zero_token_experts", self.zero_token_experts, ZERO_TOKEN_POLICIES)
        check_choice(f"{prefix}.row_rounding", self.row_rounding, ["floor", "balanced"])
        for key in ("prune_router", "prune_shared_experts", "prune_dense_mlp"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "true or false")


@schema("unstructured_pruner", "none")
@dataclass
class NoneSchema(Validatable):
    _target_: str = f"{_PKG}.NoPruner"
    name: str = "none"


@schema("unstructured_pruner", "magnitude")
@dataclass
class MagnitudeSchema(UnstructuredBase):
    _target_: str = f"{_PKG}.MagnitudePruner"
    name: str = "magnitude"


@schema("unstructured_pruner", "wanda")
@dataclass
class WandaSchema(UnstructuredBase):
    _target_: str = f"{_PKG}.WandaPruner"
    name: str = "wanda"


@schema("unstructured_pruner", "owl")
@dataclass
class OWLSchema(UnstructuredBase):
    _target_: str = f"{_PKG}.OWLPruner"
    name: str = "owl"
    owl_m: Optional[float] = None
    owl_lambda: Optional[float] = None
    owl_weighting: str = "uniform"
    owl_expert_samples: str = "block_calls"

    def validate(self, info: Optional[Any] = None, prefix: str = "unstructured_pruner") -> None:
        super().validate(info, prefix)
        if self.owl_m is None or self.owl_m <= 0:
            raise ConfigError(f"{prefix}.owl_m", self.owl_m, "a number > 0 (OWL's M; e.g. 3, 5, 7)")
        if self.owl_lambda is None or self.owl_lambda < 0:
            raise ConfigError(f"{prefix}.owl_lambda", self.owl_lambda, "a number >= 0 (OWL's lambda)")
        if self.nm is None and self.owl_lambda >= 0.5:
            raise ConfigError(f"{prefix}.owl_lambda", self.owl_lambda, "a number in [0, 0.5) for "
                              "unstructured OWL (layer sparsities span 2*lambda)")
        check_choice(f"{prefix}.owl_weighting", self.owl_weighting, OWL_WEIGHTINGS)
        check_choice(f"{prefix}.owl_expert_samples", self.owl_expert_samples, OWL_EXPERT_SAMPLES)


@schema("unstructured_pruner", "sparsegpt")
@dataclass
class SparseGPTSchema(UnstructuredBase):
    _target_: str = f"{_PKG}.SparseGPTPruner"
    name: str = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self, info: Optional[Any] = None, prefix: str = "unstructured_pruner") -> None:
        super().validate(info, prefix)
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"{prefix}.blocksize", self.blocksize, "an integer >= 1")
        if self.nm is not None and self.blocksize % int(self.nm.split(":")[1]):
            raise ConfigError(f"{prefix}.blocksize", self.blocksize, f"a multiple of M for nm={self.nm}")
        check_range(f"{prefix}.percdamp", self.percdamp, 0.0, 1.0, lo_open=True, hi_open=False)


@schema("unstructured_pruner", "moe_pruner")
@dataclass
class MoEPrunerSchema(UnstructuredBase):
    _target_: str = f"{_PKG}.MoEPruner"
    name: str = "moe_pruner"
    scope: str = "experts"
    prune_router: bool = False
    prune_shared_experts: bool = False
    prune_dense_mlp: bool = False
