"""Unstructured pruners (``hydra.utils.instantiate(cfg.unstructured_pruner)``).

One class, ``UnstructuredPruner``, composes a score (``scores.SCORES``: magnitude, wanda,
moe_pruner), an allocation (uniform or OWL) and an update rule (mask, or SparseGPT's OBS update) on
the run's ``SequentialEngine``; the presets in ``conf/unstructured_pruner/`` only pick those three.
``prune(ctx, sparsity)`` returns a JSON-able report that records the scope and every policy used.

Policies (see configs.py for the field contract):
* zero-token experts (no calibration token routed to them): ``leave_dense`` skips them (STUN's
  reference prints "NO SAMPLES ... CONTINUING"), ``magnitude`` prunes them by |W| per output row
  (or N:M). Their count is reported. SparseGPT never sees them (H == 0 would zero them wholesale).
* MoE-Pruner on a non-expert matrix (scope wider than ``experts``): no gate multiplies its input,
  so its score is plain Wanda.
* OWL: pass 1 is a dense pass (no pruning) that computes each layer's outlier ratio over the
  pruner's own scores (Wanda's for SparseGPT, as OWL's code does) of the layer's TARGETED matrices
  (zero-token experts excluded, as the reference skips them); pass 2 prunes with the layer ratios.
  An expert's running mean divides by ``owl_expert_samples``: block_calls (default; STUN's Mixtral
  code: every MoE block call is a sample for every expert) or routed_calls (only calls that routed
  it a token; see stats.py). With ``nm`` the reference's N:M variant is used (layer l prunes
  N - r_l of M). Layers with no targets are left out of the allocation.

Differences from the reference code (locuslab/wanda, luuyin/OWL, thnkinbtfly/STUN), on purpose:
* sparsity 0 prunes nothing (the threshold rules would still prune each matrix's minimum);
* N:M ties fall to the lower column (stable sort; the code's topk leaves tie order unspecified);
* OWL ratios equal across layers fall back to uniform (the code divides by zero);
* optional ``row_rounding=balanced`` and ``owl_weighting=params`` (defaults are the reference's);
* not implemented: Wanda's ``--use_variant`` (alpha bisection), OWL's ``--no_prune_zeros`` and its
  "special" N:M variant, SparseGPT's true-sequential sub-groups.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from stun_exp.analysis.sparsity import nonzero_count
from stun_exp.errors import ConfigError, DataError
from stun_exp.pruning.weights import allocation as alloc
from stun_exp.pruning.weights.engine import SequentialEngine, check_finite
from stun_exp.pruning.weights.masks import apply_mask_, parse_nm, select_mask
from stun_exp.pruning.weights.scores import get_score, magnitude_score
from stun_exp.pruning.weights.sparsegpt import iter_sparsegpt, sparsegpt_prune
from stun_exp.pruning.weights.stats import TargetStats

log = logging.getLogger("stun_exp")

KINDS = ("attention", "router", "shared_expert", "dense_mlp", "expert")
SCOPE_KINDS = {
    "experts": {"expert"},
    "experts+attention": {"expert", "attention"},
    "all_decoder_linear": set(KINDS),
}


class NoPruner:
    """``unstructured_pruner=none``."""

    def __init__(self, name: str = "none", **_: Any) -> None:
        self.name = name

    def is_targeted(self, target: Any) -> bool:
        return False

    def prune(self, ctx: Any, sparsity: Optional[float] = None) -> dict:
        return {"method": "none"}


class UnstructuredPruner:
    """score x allocation x update (see module docstring; field contract in ``configs.py``)."""

    def __init__(self, name: str, score: Optional[str] = "wanda", allocation: str = "uniform",
                 update: str = "mask", sparsity: Optional[float] = 0.5, nm: Optional[str] = None,
                 scope: str = "all_decoder_linear", prune_router: bool = True,
                 prune_shared_experts: bool = True, prune_dense_mlp: bool = True,
                 zero_token_experts: str = "leave_dense", owl_m: float = 5.0, owl_lambda: float = 0.08,
                 owl_weighting: str = "uniform", owl_expert_samples: str = "block_calls",
                 blocksize: int = 128, percdamp: float = 0.01, row_rounding: str = "floor",
                 **extra: Any) -> None:
        if scope not in SCOPE_KINDS:
            raise ConfigError("unstructured_pruner.scope", scope, list(SCOPE_KINDS))
        if update == "sparsegpt" and score is not None:
            raise ConfigError("unstructured_pruner.score", score, "null with update=sparsegpt")
        self.name, self.sparsity, self.nm = name, sparsity, parse_nm(nm)
        self.allocation, self.update = allocation, update
        # SparseGPT selects by its own saliency; magnitude is only its rule for zero-token experts
        self.score = score
        self.score_name = score if score is not None else "magnitude"
        self.nm_str, self.scope, self.zero_token_experts = nm, scope, zero_token_experts
        self.flags = {"router": prune_router, "shared_expert": prune_shared_experts,
                      "dense_mlp": prune_dense_mlp}
        self.owl_m, self.owl_lambda, self.owl_weighting = owl_m, owl_lambda, owl_weighting
        self.owl_expert_samples = owl_expert_samples
        self.blocksize, self.percdamp, self.row_rounding = blocksize, percdamp, row_rounding
        self.kinds = (SCOPE_KINDS[scope] | {k for k, on in self.flags.items() if on}) - {
            k for k, on in self.flags.items() if not on}
        self.spec = get_score(self.score_name)

    # ---- contract -----------------------------------------------------------------------------
    def is_targeted(self, target: Any) -> bool:
        """Whether this pruner prunes ``target`` (used by the sparsity ledger)."""
        return target.kind in self.kinds

    def prune(self, ctx: Any, sparsity: Optional[float] = None) -> dict:
        s = self._resolve_sparsity(sparsity)
        n_layers = len(ctx.adapter.layers)
        report = self._new_report(s)
        plan = self._layer_plan(ctx, s, n_layers, report)
        engine = self._engine(ctx, "prune:" + self.name, gram=self.update == "sparsegpt", final=True)
        def process(l: int, targets: list, stats: Optional[dict]) -> bool:
            changed = self._prune_layer(l, targets, stats, plan[l], report)
            row = report["per_layer"][str(l)]
            ctx.progress("unstructured", {"layer": l, "target_sparsity": row["target_sparsity"],
                                          "achieved": row["zeros"] / max(row["numel"], 1)})
            return changed

        engine.run(process, observe=self._needs_data)
        report["layer_forwards"] += engine.layer_forwards
        report["layer_seconds"] = [a + b for a, b in zip(engine.layer_seconds, report["layer_seconds"])] \
            if report["layer_seconds"] else engine.layer_seconds
        self._finish(report)
        return report

    # ---- planning -----------------------------------------------------------------------------
    @property
    def _needs_data(self) -> bool:
        return self.spec.stat != "none" or self.update == "sparsegpt" or self.allocation == "owl"



    def _resolve_sparsity(self, sparsity: Optional[float]) -> float:
        s = self.sparsity if sparsity is None else float(sparsity)
        if self.nm is not None:
            if s is not None and abs(s - 0.5) > 1e-6:
                raise ConfigError("unstructured_pruner.sparsity", s, f"0.5 with nm={self.nm_str!r}: "
                                  "N:M always prunes half (set the top-level sparsity=null)")
            return 0.5
        if s is None or not 0.0 <= s < 1.0:
            raise ConfigError("unstructured_pruner.sparsity", s, "a number in [0, 1)")
        return s

    def _engine(self, ctx: Any, desc: str, gram: bool = False, final: bool = False) -> SequentialEngine:
        """The run's engine (its runtime decides how layers are materialised); ``final``: the pass
        whose layers are the pruned model (streaming writes them out as it goes). The gate-weighted
        expert sums are recorded only for a score that reads them (OWL's outlier pass scores with
        the same statistic as the masks, or with Wanda's)."""
        return ctx.make_engine(desc=desc, select=self.is_targeted, gram=gram, final=final,
                               weighted=self.spec.stat == "gsq")

    def _layer_plan(self, ctx: Any, s: float, n_layers: int, report: dict) -> list[tuple]:
        """Per layer: (sparsity, nm or None): the same everywhere, or OWL's allocation."""
        if self.allocation == "owl":
            return self._owl_plan(ctx, s, n_layers, report)
        return [(s, self.nm)] * n_layers

    # ---- one layer ----------------------------------------------------------------------------
    def _prune_layer(self, l: int, targets: list, stats: Optional[dict], plan: tuple,
                     report: dict) -> bool:
        s, nm = plan
        layer = report["per_layer"].setdefault(str(l), {"target_sparsity": s, "nm": _fmt_nm(nm),
                                                        "numel": 0, "zeros": 0})
        zero_experts: set[int] = set()
        done = self._sparsegpt_stacked(targets, stats, s, nm)
        for t in targets:
            st = stats.get(t.name) if stats is not None else None
            if t.name in done:
                pass
            elif st is not None and st.ntokens == 0:
                if t.kind == "expert":
                    zero_experts.add(int(t.expert))
                if self.zero_token_experts == "leave_dense":
                    report["skipped"].append(t.name)
                else:
                    apply_mask_(t.weight, select_mask(magnitude_score(t.weight), s, "row", nm,
                                                      self.row_rounding))
            elif s > 0 or nm is not None:
                self._prune_target(t, st, s, nm)
            layer["numel"] += t.weight.numel()
            layer["zeros"] += t.weight.numel() - nonzero_count(t.weight)
        if stats is not None:
            counts = {int(t.expert): stats[t.name].ntokens for t in targets if t.kind == "expert"}
            report["tokens_per_expert"][str(l)] = [counts[e] for e in sorted(counts)]
        if zero_experts:
            report["zero_token_experts_by_layer"][str(l)] = sorted(zero_experts)
            log.info("layer %d: %d expert(s) got no calibration tokens (%s)", l, len(zero_experts),
                     self.zero_token_experts)
        return True

    @torch.no_grad()
    def _sparsegpt_stacked(self, targets: list, stats: Optional[dict], s: float, nm: Optional[tuple]) -> set:
        """SparseGPT on this layer's targets that saw tokens, same-shape ones stacked (same bits as one
        at a time, see sparsegpt.iter_sparsegpt); returns the names updated."""
        if self.update != "sparsegpt" or stats is None or not (s > 0 or nm is not None):
            return set()
        todo = [t for t in targets if stats.get(t.name) is not None and stats[t.name].ntokens > 0]
        # the Hessians are this layer's statistics, dropped after it: their memory holds the factors
        for i, (new, _) in iter_sparsegpt([(t.weight, stats[t.name].gram) for t in todo], s, nm,
                                          self.blocksize, self.percdamp, consume_hessians=True):
            todo[i].weight.copy_(new.to(todo[i].weight.dtype))
            del new, _     # views of the whole stack: keep it from living on while the next is built
        return {t.name for t in todo}

    @torch.no_grad()
    def _prune_target(self, t: Any, st: Optional[TargetStats], s: float, nm: Optional[tuple]) -> None:
        w = t.weight
        if self.update == "sparsegpt":
            new, _ = sparsegpt_prune(w, st.gram, s, nm, self.blocksize, self.percdamp)
            check_finite(new, f"{t.name} (SparseGPT update)")
            w.copy_(new.to(w.dtype))
            return
        score = target_score(self.spec, t, st)
        check_finite(score, f"{t.name} (pruning scores)")
        apply_mask_(w, select_mask(score, s, self.spec.group, nm, self.row_rounding))

    # ---- OWL ----------------------------------------------------------------------------------
    def _owl_plan(self, ctx: Any, s: float, n_layers: int, report: dict) -> list[tuple]:
        """Pass 1 (dense): each layer's outlier ratio; then OWL's layer sparsities (or N:M offsets)."""
        ratios, sizes = [0.0] * n_layers, [0] * n_layers
        outlier = self.spec if self.update == "mask" else get_score("wanda")

        def measure(l: int, targets: list, stats: Optional[dict]) -> bool:
            live = [t for t in targets if stats[t.name].ntokens > 0]
            per = self.owl_expert_samples
            ratios[l] = alloc.outlier_ratio(
                lambda: (target_score(outlier, t, stats[t.name], per) for t in live), self.owl_m)
            if not math.isfinite(ratios[l]):
                raise DataError(f"non-finite OWL outlier ratio in layer {l} ({ratios[l]})")
            sizes[l] = sum(t.weight.numel() for t in targets)
            return False                       # dense pass: nothing changes, outputs reused

        engine = self._engine(ctx, "owl:outliers")
        engine.run(measure)
        report["layer_forwards"] += engine.layer_forwards
        report["layer_seconds"] = engine.layer_seconds
        report["owl"] = {"m": self.owl_m, "lambda": self.owl_lambda, "weighting": self.owl_weighting,
                         "outlier_score": outlier.name,
                         "expert_samples": self.owl_expert_samples,
                         "outlier_ratios": ratios, "layer_numel": sizes}
        # layers with nothing to prune (e.g. a dense layer under scope=experts) take no part in
        # the min-max normalisation or the mean
        live = [l for l in range(n_layers) if sizes[l] > 0]
        plan: list[tuple] = [(0.0, None)] * n_layers
        d = [ratios[l] for l in live]
        if self.nm is not None:
            offsets = alloc.owl_nm_offsets(d, self.owl_lambda) if live else []
            n, m = self.nm
            for l, r in zip(live, offsets):
                n_l = min(max(n - r, 0), m)
                plan[l] = (n_l / m, (n_l, m) if n_l > 0 else None)
            report["owl"]["nm_offsets"] = dict(zip(map(str, live), offsets))
        elif live:
            weights = [sizes[l] for l in live] if self.owl_weighting == "params" else None
            for l, sp in zip(live, alloc.owl_sparsities(d, s, self.owl_lambda, weights)):
                plan[l] = (sp, None)
        report["owl"]["layer_sparsity"] = [p[0] for p in plan]
        return plan

    # ---- report -------------------------------------------------------------------------------
    def _new_report(self, s: float) -> dict:
        return {"method": self.name, "score": self.score, "allocation": self.allocation,
                "update": self.update, "sparsity": s, "nm": self.nm_str, "scope": self.scope,
                "kinds": sorted(self.kinds), "prune_router": self.flags["router"],
                "prune_shared_experts": self.flags["shared_expert"],
                "prune_dense_mlp": self.flags["dense_mlp"],
                "zero_token_experts": self.zero_token_experts, "zero_token_experts_by_layer": {},
                "row_rounding": self.row_rounding,
                "per_layer": {}, "skipped": [], "tokens_per_expert": {}, "layer_forwards": 0,
                "layer_seconds": []}

    @staticmethod
    def _finish(report: dict) -> None:
        numel = sum(v["numel"] for v in report["per_layer"].values())
        zeros = sum(v["zeros"] for v in report["per_layer"].values())
        for v in report["per_layer"].values():
            v["achieved"] = v["zeros"] / max(v["numel"], 1)
        report["achieved_sparsity"] = zeros / max(numel, 1)
        report["zero_token_expert_count"] = sum(len(v) for v in report["zero_token_experts_by_layer"].values())


def _fmt_nm(nm: Optional[tuple]) -> Optional[str]:
    return None if nm is None else f"{nm[0]}:{nm[1]}"


def target_score(spec: Any, t: Any, st: Optional[TargetStats], per: str = "routed_calls") -> torch.Tensor:
    """Score of target t under ``spec`` with the input statistic it asks for (``per``: what one sample
    of an expert's running mean is; rankings within a row never see it, OWL's pooled ratio does)."""
    stat = None
    if spec.stat == "sq":
        stat = st.norm_sq(per)
    elif spec.stat == "gsq":
        stat = st.norm_gsq(per)
    return spec.fn(t.weight, stat)
