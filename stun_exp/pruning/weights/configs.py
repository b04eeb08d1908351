"""Schema of the ``unstructured_pruner`` group (field names are a public contract).

An unstructured pruner composes three parts (``pruners.UnstructuredPruner``):
  score        magnitude | wanda | moe_pruner (``scores.SCORES``); null with update=sparsegpt, which
               selects by its own OBS saliency
  allocation   uniform | owl (outlier-weighted layer sparsities)
  update       mask | sparsegpt (OBS weight update)
The named presets (``conf/unstructured_pruner/<name>.yaml``: magnitude, wanda, owl, sparsegpt,
moe_pruner) only pick these three and their own defaults; every shared field and its default lives
here, once. Any combination runs, e.g. ``unstructured_pruner=moe_pruner unstructured_pruner.allocation=owl``.

Shared fields
  sparsity              ratio over the targeted weights, in [0, 1); a default that steps aside for a
                        total target (root ``sparsity``), see ``config/sparsity.py``.
  nm                    null | "2:4" | "4:8": N pruned of every M input columns (always 50%).
  scope                 experts | experts+attention | all_decoder_linear (the STUN/Wanda reference:
                        every Linear in the decoder layers, router included)
  prune_router, prune_shared_experts, prune_dense_mlp
                        add (true) or remove (false) that kind on top of ``scope``.
  zero_token_experts    leave_dense (the STUN reference: an expert no calibration token reached is
                        skipped) | magnitude (prune it by |W| with the method's comparison rule)
  row_rounding          floor (reference: floor(C_in*s) per row) | balanced (round(numel*s) per matrix)
OWL (allocation=owl): owl_m (M, default 5), owl_lambda (lambda, default 0.08), owl_weighting (uniform =
reference; params = layer sparsities shifted so the parameter-weighted mean hits the target),
owl_expert_samples (block_calls = STUN's Mixtral code: each MoE block call is one sample of every
expert's running mean, tokens or not; routed_calls = only calls that routed the expert >= 1 token).
SparseGPT (update=sparsegpt): blocksize (128), percdamp (0.01).
Component fields hold ``${stun.default:...}`` defaults: setting one for a component the pruner does not
use (``owl_m`` with allocation=uniform) is refused instead of ignored.
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


SCORES = ["magnitude", "wanda", "moe_pruner"]
ALLOCATIONS = ["uniform", "owl"]
UPDATES = ["mask", "sparsegpt"]
OWL_FIELDS = ("owl_m", "owl_lambda", "owl_weighting", "owl_expert_samples")
SPARSEGPT_FIELDS = ("blocksize", "percdamp")


@schema("unstructured_pruner", "none")
@dataclass
class NoneSchema(Validatable):
    _target_: str = f"{_PKG}.NoPruner"
    name: str = "none"


@schema("unstructured_pruner", "unstructured")
@dataclass
class UnstructuredConfig(Validatable):
    """One schema for every preset; see the module docstring."""
    _target_: str = f"{_PKG}.UnstructuredPruner"
    name: str = "wanda"
    score: Optional[str] = "wanda"
    allocation: str = "uniform"
    update: str = "mask"
    sparsity: Optional[float] = "${stun.default:0.5}"   # type: ignore[assignment]  (a marked default)
    nm: Optional[str] = None
    scope: str = "all_decoder_linear"
    prune_router: bool = True
    prune_shared_experts: bool = True
    prune_dense_mlp: bool = True
    zero_token_experts: str = "leave_dense"
    row_rounding: str = "floor"
    owl_m: Optional[float] = "${stun.default:5.0}"                  # type: ignore[assignment]
    owl_lambda: Optional[float] = "${stun.default:0.08}"            # type: ignore[assignment]
    owl_weighting: str = "${stun.default:uniform}"
    owl_expert_samples: str = "${stun.default:block_calls}"
    blocksize: int = "${stun.default:128}"                          # type: ignore[assignment]
    percdamp: float = "${stun.default:0.01}"                        # type: ignore[assignment]

    def validate(self, info: Optional[Any] = None, prefix: str = "unstructured_pruner") -> None:
        check_choice(f"{prefix}.allocation", self.allocation, ALLOCATIONS)
        check_choice(f"{prefix}.update", self.update, UPDATES)
        if self.update == "sparsegpt":
            if self.score is not None:
                raise ConfigError(f"{prefix}.score", self.score, "null with update=sparsegpt (SparseGPT selects "
                                  "weights by its own OBS saliency)")
        else:
            check_choice(f"{prefix}.score", self.score, SCORES)
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
        if self.allocation == "owl":
            self._validate_owl(prefix)
        if self.update == "sparsegpt":
            self._validate_sparsegpt(prefix)

    def _validate_owl(self, prefix: str) -> None:
        if self.owl_m is None or not self.owl_m > 0:
            raise ConfigError(f"{prefix}.owl_m", self.owl_m, "a number > 0 (OWL's M; e.g. 3, 5, 7)")
        if self.owl_lambda is None or not self.owl_lambda >= 0:
            raise ConfigError(f"{prefix}.owl_lambda", self.owl_lambda, "a number >= 0 (OWL's lambda)")
        if self.nm is None and self.owl_lambda >= 0.5:
            raise ConfigError(f"{prefix}.owl_lambda", self.owl_lambda, "a number in [0, 0.5) for "
                              "unstructured OWL (layer sparsities span 2*lambda)")
        check_choice(f"{prefix}.owl_weighting", self.owl_weighting, OWL_WEIGHTINGS)
        check_choice(f"{prefix}.owl_expert_samples", self.owl_expert_samples, OWL_EXPERT_SAMPLES)

    def _validate_sparsegpt(self, prefix: str) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"{prefix}.blocksize", self.blocksize, "an integer >= 1")
        if self.nm is not None and self.blocksize % int(self.nm.split(":")[1]):
            raise ConfigError(f"{prefix}.blocksize", self.blocksize, f"a multiple of M for nm={self.nm}")
        check_range(f"{prefix}.percdamp", self.percdamp, 0.0, 1.0, lo_open=True, hi_open=False)


def check_unused_components(node: Any, prefix: str = "unstructured_pruner") -> None:
    """A component field set by the user for a component this pruner does not use is refused (its
    defaults are ``${stun.default:...}``; see ``config/sparsity.is_default``)."""
    from stun_exp.config.sparsity import is_default
    unused = {"allocation": (node.get("allocation") != "owl", OWL_FIELDS, "owl"),
              "update": (node.get("update") != "sparsegpt", SPARSEGPT_FIELDS, "sparsegpt")}
    for part, (off, fields, needed) in unused.items():
        for f in fields:
            if off and f in node and not is_default(node, f):
                raise ConfigError(f"{prefix}.{f}", node.get(f), f"no value unless {prefix}.{part}={needed} "
                                  f"(this pruner has {part}={node.get(part)}, which does not use it)")
