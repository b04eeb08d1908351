"""Pure routing functions: router logits -> (expert ids, gate weights), one per ``RoutingRule.score``.

Each function re-implements, operation for operation, the eval-mode router forward of the
transformers 5.23 classes listed in ``arch_table.py`` (same ops, same order, same ``sorted`` flags),
so that ids and weights match the model bit for bit. ``drop`` masks expert ids out of the choice
(their logit -> -inf before any normalisation): for softmax routers this equals slicing the router
rows; for sigmoid routers only the choice is masked (scores of other experts are per-expert anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .arch_table import RoutingRule


@dataclass(frozen=True)
class RouteParams:
    """The numbers a rule needs, read once from the model config / router module."""
    top_k: int
    renorm: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    use_groups: bool = False
    jitter_eps: float = 0.0
    correction_bias: Optional[torch.Tensor] = None


def _masked(logits: torch.Tensor, drop: Optional[Sequence[int]]) -> torch.Tensor:
    if not drop:
        return logits
    logits = logits.clone()
    logits[:, list(drop)] = float("-inf")
    return logits


def _group_mask(group_scores: torch.Tensor, p: RouteParams, n_experts: int) -> torch.Tensor:
    """[N, E] bool: experts inside the ``topk_group`` best groups (DeepSeek group-limited routing)."""
    group_idx = torch.topk(group_scores, k=p.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    per = n_experts // p.n_group
    return group_mask.unsqueeze(-1).expand(-1, p.n_group, per).reshape(-1, n_experts).bool()


def route_softmax(logits: torch.Tensor, p: RouteParams, rule: RoutingRule,
                  drop: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts -> (group filter) -> top-k -> (renormalise) -> x scaling."""
    probs = torch.softmax(_masked(logits, drop).float(), dim=-1)
    n = probs.shape[-1]
    if p.use_groups:
        gs = probs.view(-1, p.n_group, n // p.n_group).max(dim=-1).values
        probs = probs.masked_fill(~_group_mask(gs, p, n), 0.0)
    w, ids = torch.topk(probs, p.top_k, dim=-1, sorted=rule.sorted_topk)
    if p.renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w * p.scaling if rule.scaling_key else w


def route_sigmoid(logits: torch.Tensor, p: RouteParams, rule: RoutingRule,
                  drop: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: choose on sigmoid + correction bias within the best groups; weigh by sigmoid."""
    scores = logits.float().sigmoid()
    choice = scores if p.correction_bias is None else scores + p.correction_bias
    choice = _masked(choice, drop)
    n = scores.shape[-1]
    gs = choice.view(-1, p.n_group, n // p.n_group).topk(2, dim=-1)[0].sum(dim=-1)
    choice = choice.masked_fill(~_group_mask(gs, p, n), float("-inf"))
    ids = torch.topk(choice, k=p.top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if p.renorm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * p.scaling


def route_topk_softmax(logits: torch.Tensor, p: RouteParams, rule: RoutingRule,
                       drop: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GraniteMoe / GPT-OSS: top-k of raw logits, softmax over the chosen k."""
    top, ids = torch.topk(_masked(logits, drop).float(), p.top_k, dim=-1)
    return ids, torch.softmax(top, dim=-1)


def _sparsemixer_pick(scores: torch.Tensor, masked: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparsemixer step (eval): argmax of `masked`, weight = softmax within the relative threshold."""
    with torch.no_grad():
        thr, ind = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=thr)
        out = ((thr - scores) / factor) > (2 * eps)
    gates = torch.softmax(masked.masked_fill(out, float("-inf")), dim=-1)
    return ind, gates.gather(dim=-1, index=ind)


def route_sparsemixer(logits: torch.Tensor, p: RouteParams, rule: RoutingRule,
                      drop: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE eval-mode sparsemixer: exactly two picks (first = argmax, second = argmax of the rest)."""
    scores = _masked(logits, drop)
    ind1, w1 = _sparsemixer_pick(scores, scores, p.jitter_eps)
    rest = torch.scatter(scores, -1, ind1, float("-inf"))
    ind2, w2 = _sparsemixer_pick(scores, rest, p.jitter_eps)
    return torch.cat((ind1, ind2), dim=-1), torch.cat((w1, w2), dim=-1).float()


ROUTERS = {"softmax": route_softmax, "sigmoid": route_sigmoid,
           "topk_softmax": route_topk_softmax, "sparsemixer": route_sparsemixer}


def route(logits: torch.Tensor, p: RouteParams, rule: RoutingRule,
          drop: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, k] long, weights [N, k] float32) for logits [N, E] under `rule`."""
    ids, w = ROUTERS[rule.score](logits, p, rule, drop)
    return ids.long(), w.float()
