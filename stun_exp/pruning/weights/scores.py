"""Importance scores: pure functions from a weight (and its input statistics) to a score matrix.

All scores are in fp32 and have the weight's shape [C_out, C_in]; a LOWER score is pruned first.

* magnitude   S = |W|                                   (Wanda repo baseline)
* wanda       S = |W| * sqrt(s_j), s_j ~ sum_t x_tj^2   (Wanda, Sun et al. 2023)
* moe_pruner  S = |W| * sqrt(a_j), a_j ~ sum_t (g_t x_tj)^2 over the tokens routed to the expert
              (MoE-Pruner, Xie et al. 2024: Wanda on gate-scaled routed inputs; the gate value
              multiplies the input of every expert matrix, down_proj included)

``s_j`` may carry any positive per-matrix constant (the reference keeps a running mean over
forward calls): it never changes a within-row ranking, only OWL's pooled outlier statistic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from stun_exp.errors import closest


def magnitude_score(w: Tensor, stat: Optional[Tensor] = None) -> Tensor:
    """|W| (``stat`` ignored)."""
    return w.detach().abs().float()


def wanda_score(w: Tensor, stat: Tensor) -> Tensor:
    """|W_ij| * sqrt(stat_j): stat is the per-input-column sum of squared activations [C_in]."""
    if stat.shape != (w.shape[1],):
        raise ValueError(f"activation statistic has shape {tuple(stat.shape)}, expected ({w.shape[1]},)")
    return w.detach().abs().float() * stat.float().clamp_min(0).sqrt().unsqueeze(0)


@dataclass(frozen=True)
class ScoreSpec:
    """How a method scores and compares weights.

    stat: which input statistic the score needs: "none", "sq" (sum x^2 over the tokens the matrix
    sees) or "gsq" (sum (g x)^2, gate-weighted; routed experts only; non-expert matrices fall back
    to "sq" because no gate multiplies their input).
    group: the comparison group for unstructured masks: "row" (per output row, floor(C_in*s) each)
    or "matrix" (one threshold over the whole matrix, the Wanda repo's magnitude rule).
    """
    name: str
    fn: Callable[..., Tensor]
    stat: str
    group: str


SCORES: dict[str, ScoreSpec] = {
    "magnitude": ScoreSpec("magnitude", magnitude_score, "none", "matrix"),
    "wanda": ScoreSpec("wanda", wanda_score, "sq", "row"),
    "moe_pruner": ScoreSpec("moe_pruner", wanda_score, "gsq", "row"),
}


def get_score(name: str) -> ScoreSpec:
    """Registry lookup with a helpful error."""
    if name not in SCORES:
        raise KeyError(f"unknown score {name!r}; known: {', '.join(SCORES)}{closest(name, SCORES)}")
    return SCORES[name]
