"""Per-MoE-layer calibration statistics, accumulated in fp32 without keeping activations.

Definitions (N tokens seen by the layer, k = top-k, routing = what the model really used):
    tokens            N
    logits_sum/sq     Σ_t logit_t[e], Σ_t logit_t[e]²          [E]  (raw router logits)
    count             Σ_t 1[e ∈ topk(t)]                        [E]
    coact             Σ_t 1[e ∈ topk(t)]·1[f ∈ topk(t)], e ≠ f   [E, E] symmetric, zero diagonal
                      (for k = 2: the STUN reference's top-2 co-activation count)
    gate_sum          Σ_{t→e} g_te                               [E]
    xsq / gxsq        Σ_{t→e} x_t² / Σ_{t→e} (g_te·x_t)²          [E, H]  inputs of gate/up
    hsq / ghsq        Σ_{t→e} h_te² / Σ_{t→e} (g_te·h_te)²        [E, I]  inputs of down
                      (gxsq / ghsq only with weighted=True; they stay zero otherwise)
    gram_x / gram_h   Σ_{t→e} x_t x_tᵀ / h_te h_teᵀ               [E, H, H] / [E, I, I] (optional)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class LayerStats:
    num_experts: int
    hidden: int
    inter: int
    gram: bool = False
    keep_logits: bool = False
    weighted: bool = True
    tokens: int = 0
    logits_tokens: int = 0
    logits_sum: torch.Tensor = field(init=False)
    logits_sq: torch.Tensor = field(init=False)
    count: torch.Tensor = field(init=False)
    coact: torch.Tensor = field(init=False)
    gate_sum: torch.Tensor = field(init=False)
    xsq: torch.Tensor = field(init=False)
    hsq: torch.Tensor = field(init=False)
    gxsq: torch.Tensor = field(init=False)
    ghsq: torch.Tensor = field(init=False)
    gram_x: Optional[torch.Tensor] = None
    gram_h: Optional[torch.Tensor] = None
    logits_chunks: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        E, H, I = self.num_experts, self.hidden, self.inter
        z = lambda *s: torch.zeros(*s, dtype=torch.float32)
        self.logits_sum, self.logits_sq = z(E), z(E)
        self.count = torch.zeros(E, dtype=torch.long)
        self.coact = torch.zeros(E, E, dtype=torch.long)
        self.gate_sum, self.xsq, self.hsq, self.gxsq, self.ghsq = z(E), z(E, H), z(E, I), z(E, H), z(E, I)
        if self.gram:
            self.gram_x, self.gram_h = z(E, H, H), z(E, I, I)

    def to(self, device: torch.device | str) -> "LayerStats":
        """Move the accumulators (stats live where the activations are; call .to("cpu") to save)."""
        for name in ("logits_sum", "logits_sq", "count", "coact", "gate_sum", "xsq", "hsq", "gxsq", "ghsq",
                     "gram_x", "gram_h"):
            t = getattr(self, name)
            if t is not None and t.device != torch.device(device):
                setattr(self, name, t.to(device))
        return self

    @property
    def logits(self) -> torch.Tensor:
        """All kept raw router logits [N, E] (needs keep_logits=True)."""
        if not self.keep_logits:
            raise RuntimeError("router logits were not kept: use ExpertObserver(..., keep_logits=True)")
        return torch.cat(self.logits_chunks) if self.logits_chunks else torch.zeros(0, self.num_experts)

    @property
    def frequency(self) -> torch.Tensor:
        """Fraction of tokens routed to each expert [E]."""
        return self.count.float() / max(self.tokens, 1)

    @property
    def logits_mean(self) -> torch.Tensor:
        return self.logits_sum / max(self.logits_tokens, 1)


@torch.no_grad()
def add_logits(st: LayerStats, logits: torch.Tensor) -> None:
    lf = logits.detach().reshape(-1, logits.shape[-1]).float()
    st.to(lf.device)
    st.logits_tokens += lf.shape[0]
    st.logits_sum += lf.sum(0)
    st.logits_sq += lf.pow(2).sum(0)
    if st.keep_logits:
        st.logits_chunks.append(lf.cpu().clone())


@torch.no_grad()
def add_routing(st: LayerStats, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Token count, per-expert count, co-activation and gate sums from (ids [N,k], weights [N,k])."""
    ids, w = ids.detach(), weights.detach().float()
    st.to(ids.device)
    st.tokens += ids.shape[0]
    hot = torch.zeros(ids.shape[0], st.num_experts, dtype=torch.float32, device=ids.device)
    hot.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    st.count += hot.sum(0).long()
    co = (hot.T @ hot).round().long()      # exact: integer counts < 2**24 per call
    co.fill_diagonal_(0)
    st.coact += co
    st.gate_sum.index_add_(0, ids.reshape(-1), w.reshape(-1))


@torch.no_grad()
def add_expert(st: LayerStats, e: int, x: torch.Tensor, h: torch.Tensor, g: torch.Tensor) -> None:
    """Inputs of expert e: x [n,H] (to gate/up), h [n,I] (to down), gate weights g [n]."""
    x, h, g = x.detach().float(), h.detach().float(), g.detach().float()[:, None]
    st.xsq[e] += x.pow(2).sum(0)
    st.hsq[e] += h.pow(2).sum(0)
    if st.weighted:
        st.gxsq[e] += (g * x).pow(2).sum(0)
        st.ghsq[e] += (g * h).pow(2).sum(0)
    if st.gram:
        st.gram_x[e] += x.T @ x
        st.gram_h[e] += h.T @ h


def observe_tokens(st: LayerStats, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   hidden_fn: Callable[[int, torch.Tensor], torch.Tensor],
                   output_fn: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                   out: Optional[torch.Tensor] = None, hidden_rows: Optional[torch.Tensor] = None) -> None:
    """Record routing + per-expert inputs; if `out` is given also accumulate the weighted expert
    outputs into it (so a fused experts forward computes x -> h once). ``hidden_rows`` [N*k, I]
    (flat (token, slot) order): the experts' hidden states already computed by the forward, used
    instead of ``hidden_fn``."""
    add_routing(st, ids, weights)
    k = ids.shape[1]
    for e in ids.unique().tolist():
        tok, pos = torch.where(ids == e)
        xe = x[tok]
        he = hidden_fn(e, xe) if hidden_rows is None else hidden_rows[tok * k + pos]
        we = weights[tok, pos]
        add_expert(st, e, xe, he, we)
        if out is not None and output_fn is not None:
            y = output_fn(e, he) * we[:, None]
            out.index_add_(0, tok, y.to(out.dtype))
