"""REAP saliency statistics as pure functions (per-token tensors in, per-expert values out).

Definitions follow CerebrasResearch/reap ``pruning_metrics.py`` (``update_pruning_state``) and
``metrics.py`` (``OnlineStatsTracker``), operation for operation, so that the numbers (and their
dtypes) are the ones REAP's ``prune()`` ranks:

* which tokens count: token t counts for expert e iff e is in ``topk(router_logits_t, k)`` (the raw
  logits, as REAP's observer selects them); padding tokens (mask 0) count nowhere;
* ``a_{e,t} = ‖E_e(x_t)‖₂`` in float32: the expert's output before the routing weight is applied;
* ``g_{e,t}``: softmax over **all** experts of the logits (float32); with ``renormalize`` divided by
  the sum of the token's top-k probabilities, then clamped at float32 eps;
* per batch (one MoE-block call): ``expert_frequency`` (int64 count), ``ean_sum`` = Σa,
  ``weighted_ean_sum`` = Σa·g, ``weighted_expert_frequency_sum`` = Σg (float32 sums stored as float64),
  ``ean_mean`` = mean a and ``reap`` = mean a·g (float32);
* across batches: the sums add up in float64; the two means are running means weighted by the
  per-batch routed-token count (Welford update with Kahan compensation, float32).

Only the routed (expert, token) pairs enter: REAP evaluates every expert on every token and then
keeps the routed rows, which gives the same numbers; callers here pass the norms of the routed pairs
only (``routed_norms[t, j]`` = ‖E_{ids[t,j]}(x_t)‖).

The merging statistics (HC-SMoE's characteristic activation, M-SMoE's router-logit similarity) are
running means with the same tracker, as REAP's observer keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

# our criterion name -> REAP's observer-state key (``prune.py`` maps "frequency" the same way)
CRITERIA = {
    "reap": "reap",
    "ean_sum": "ean_sum",
    "ean_mean": "ean_mean",
    "weighted_ean_sum": "weighted_ean_sum",
    "frequency": "expert_frequency",
    "weighted_frequency": "weighted_expert_frequency_sum",
}
F32_EPS = torch.finfo(torch.float32).eps


def selected_experts(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, k] ids: top-k of the raw router logits (REAP's observer rule)."""
    return torch.topk(logits, top_k, dim=-1)[1]


def routing_weights(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """[T, E] float32 router weights: softmax over all experts, optionally top-k renormalised."""
    w = F.softmax(logits, dim=1, dtype=torch.float)
    if renormalize and ids.numel() > 0:
        top = torch.gather(w, 1, ids)
        w = torch.clamp(w / top.sum(dim=-1, keepdim=True), min=F32_EPS)
    return w


@dataclass
class BatchMetrics:
    """Per-expert values of one batch (REAP's per-batch tensors, same dtypes)."""
    tokens: int
    expert_frequency: torch.Tensor          # int64 [E]
    ean_sum: torch.Tensor                   # float64 [E] (float32 sums)
    ean_mean: torch.Tensor                  # float32 [E]
    weighted_ean_sum: torch.Tensor          # float64 [E]
    reap: torch.Tensor                      # float32 [E]
    weighted_expert_frequency_sum: torch.Tensor   # float64 [E]


def _apply_mask(mask: Optional[torch.Tensor], *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if mask is None:
        return ts
    m = mask.reshape(-1).bool().to(ts[0].device)
    return tuple(t[m] for t in ts)


def batch_metrics(ids: torch.Tensor, routed_norms: torch.Tensor, weights: torch.Tensor, num_experts: int,
                  mask: Optional[torch.Tensor] = None) -> BatchMetrics:
    """REAP's per-batch metrics from routed pairs only.

    ids [T, k] selected experts, routed_norms [T, k] float32 (‖E_{ids[t,j]}(x_t)‖), weights [T, E]
    (``routing_weights``), mask [T] (1 = real token) or None. An expert with no routed token keeps 0.
    """
    ids, routed_norms, weights = _apply_mask(mask, ids, routed_norms, weights)
    dev = weights.device
    E = num_experts
    freq = (torch.bincount(ids.reshape(-1), minlength=E) if ids.numel()
            else torch.zeros(E, dtype=torch.long, device=dev))
    ean_sum = torch.zeros(E, dtype=torch.float64, device=dev)
    w_ean_sum = torch.zeros(E, dtype=torch.float64, device=dev)
    w_freq = torch.zeros(E, dtype=torch.float64, device=dev)
    ean_mean = torch.zeros(E, dtype=torch.float32, device=dev)
    reap = torch.zeros(E, dtype=torch.float32, device=dev)
    for e in range(E):
        hit = ids == e
        rows = hit.any(dim=-1)
        if not rows.any():
            continue
        col = hit[rows].to(torch.uint8).argmax(dim=-1)          # the slot that holds e
        a = routed_norms[rows].gather(1, col[:, None])[:, 0].float()   # token order, as REAP masks
        g = weights[rows, e]
        ean_sum[e], ean_mean[e] = a.sum(), a.mean()
        w_freq[e] = g.sum()
        w_ean_sum[e], reap[e] = (a * g).sum(), (a * g).mean()
    return BatchMetrics(int(ids.shape[0]), freq.cpu(), ean_sum.cpu(), ean_mean.cpu(), w_ean_sum.cpu(),
                        reap.cpu(), w_freq.cpu())


class RunningMean:
    """Token-count-weighted running mean (Welford + Kahan), as REAP's ``OnlineStatsTracker``."""

    def __init__(self, shape: tuple[int, ...], count_shape: tuple[int, ...] | int = 1,
                 dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.count = torch.zeros(count_shape, dtype=torch.long)
        self.mean = torch.zeros(shape, dtype=dtype)
        self.comp = torch.zeros(shape, dtype=dtype)

    def update(self, new_mean: torch.Tensor, new_count: torch.Tensor | int) -> None:
        n = torch.as_tensor(new_count).to("cpu", torch.long)
        x = new_mean.to("cpu", self.dtype)
        total = self.count + n
        y = ((x - self.mean) * n / total).nan_to_num(0) - self.comp
        t = self.mean + y
        self.comp = (t - self.mean) - y
        self.mean = t
        self.count = total


@dataclass
class ReapStats:
    """One MoE layer's accumulated statistics (REAP's observer state for that layer)."""
    num_experts: int
    total_tokens: int = 0
    expert_frequency: torch.Tensor = field(init=False)
    ean_sum: torch.Tensor = field(init=False)
    weighted_ean_sum: torch.Tensor = field(init=False)
    weighted_expert_frequency_sum: torch.Tensor = field(init=False)
    ean_mean: RunningMean = field(init=False)
    reap: RunningMean = field(init=False)
    characteristic_activation: Optional[RunningMean] = None   # HC-SMoE: [E, H], count = tokens
    router_logit_similarity: Optional[RunningMean] = None     # M-SMoE: [E, E], count = tokens

    def __post_init__(self) -> None:
        E = self.num_experts
        self.expert_frequency = torch.zeros(E, dtype=torch.long)
        self.ean_sum = torch.zeros(E, dtype=torch.float64)
        self.weighted_ean_sum = torch.zeros(E, dtype=torch.float64)
        self.weighted_expert_frequency_sum = torch.zeros(E, dtype=torch.float64)
        self.ean_mean = RunningMean((E,), (E,))
        self.reap = RunningMean((E,), (E,))

    def add(self, b: BatchMetrics) -> None:
        self.total_tokens += b.tokens
        self.expert_frequency += b.expert_frequency
        self.ean_sum += b.ean_sum
        self.weighted_ean_sum += b.weighted_ean_sum
        self.weighted_expert_frequency_sum += b.weighted_expert_frequency_sum
        self.ean_mean.update(b.ean_mean, b.expert_frequency)
        self.reap.update(b.reap, b.expert_frequency)

    def saliency(self, criterion: str) -> torch.Tensor:
        """The per-expert tensor REAP's ``prune()`` ranks for ``criterion`` (its dtype included)."""
        key = CRITERIA[criterion]
        v = getattr(self, key)
        return v.mean if isinstance(v, RunningMean) else v

    def expert_proba(self) -> torch.Tensor:
        """frequency / total tokens (float32, int64 / int64 as REAP divides them)."""
        return self.expert_frequency / torch.tensor(self.total_tokens, dtype=torch.long)


def cosine_similarity_rows(x: torch.Tensor, y: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """[n, m] = cos(x_i, y_j) with ``F.cosine_similarity`` (what REAP's ``cosine_distance`` and
    ``angular_distance`` call), in row chunks so the broadcast [n, m, d] product stays small."""
    out = [F.cosine_similarity(xc[:, None, :], y[None, :, :], dim=-1) for xc in x.split(chunk)]
    return torch.cat(out, dim=0)


def logit_similarity(logits: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine *distance* (1 - cos) between experts' logit columns over the batch's tokens,
    in the logits' dtype (REAP's ``router_logit_similiarity`` per-batch value)."""
    cols = logits.T.contiguous()
    return 1.0 - cosine_similarity_rows(cols, cols)
