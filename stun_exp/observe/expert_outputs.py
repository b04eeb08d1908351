"""ExpertOutputObserver: REAP-style statistics of expert *outputs* while MoE blocks run.

    with ExpertOutputObserver(adapter, layers, renormalize=False) as obs:
        model(batch)              # a full-model forward, or one decoder layer at a time (streaming)
    obs.stats[l]                  # ReapStats (observe/reap_metrics.py)

A forward pre-hook on each observed MoE block sees the block's input x (whatever runs the block:
a whole-model pass or a single decoder layer), re-runs the router through the adapter and
evaluates each expert on the tokens routed to it only (top-k of the raw logits, REAP's rule), so
the cost is the routed compute, not every expert on every token. Each block call is one REAP
"batch" (its per-batch means are what the running means average).

Optional extras, for the merging baselines:
* ``characteristic=True`` (HC-SMoE): every expert's mean output over all tokens of the call; this
  evaluates every expert on every token (the statistic needs it);
* ``logit_similarity=True`` (M-SMoE): the [E, E] cosine distance between experts' logit columns.

Padding: ``with obs.token_mask(mask):`` around a forward drops tokens whose mask is 0 from every
statistic (the mask is flattened like the block input, [batch·seq]).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..models.adapter import MoEAdapter
from .reap_metrics import (ReapStats, RunningMean, batch_metrics, logit_similarity,
                                           routing_weights, selected_experts)


class ExpertOutputObserver:
    """Context manager filling ``stats[l]`` (``ReapStats``) for the given MoE layers."""

    def __init__(self, adapter: MoEAdapter, layers: Optional[list[int]] = None, *, renormalize: bool,
                 characteristic: bool = False, logit_similarity: bool = False,
                 batch_sequences: Optional[int] = None) -> None:
        moe = adapter.moe_layers
        self.adapter, self.layers = adapter, list(moe if layers is None else layers)
        bad = [l for l in self.layers if l not in moe]
        if bad:
            raise ValueError(f"layers {bad} are not MoE layers; MoE layers: {moe}")
        self.renormalize, self.characteristic, self.similarity = renormalize, characteristic, logit_similarity
        self.stats: dict[int, ReapStats] = {}
        self._mask: Optional[torch.Tensor] = None
        self._handles: list[Any] = []
        # REAP's statistics are per calibration batch (running means, M-SMoE's per-batch cosine): with
        # batch_sequences set, calls carrying fewer sequences (one decoder layer at a time, batch 1) are
        # buffered into batches of that many sequences, so every runtime sees the same batches.
        self.batch_sequences = batch_sequences
        self._buffer: dict[int, list[torch.Tensor]] = {}
        self._buffered: dict[int, int] = {}

    @contextmanager
    def token_mask(self, mask: Optional[torch.Tensor]) -> Iterator[None]:
        """Tokens with mask 0 are left out of the statistics of forwards run inside this block."""
        prev, self._mask = self._mask, mask
        try:
            yield
        finally:
            self._mask = prev

    def _layer(self, l: int, hidden: int) -> ReapStats:
        if l not in self.stats:
            E = self.adapter.num_experts(l)
            st = ReapStats(E)
            if self.characteristic:
                st.characteristic_activation = RunningMean((E, hidden))
            if self.similarity:
                st.router_logit_similarity = RunningMean((E, E))
            self.stats[l] = st
        return self.stats[l]

    @torch.no_grad()
    def observe(self, l: int, h: torch.Tensor) -> None:
        """Add one MoE-block call on hidden states h [sequences, T, H] (or [N, H]) to layer l."""
        x = h.reshape(-1, h.shape[-1])
        if self._mask is not None:
            x = x[self._mask.reshape(-1).bool().to(x.device)]
        if self.batch_sequences is None:
            self._observe_batch(l, x)
            return
        self._buffer.setdefault(l, []).append(x)
        self._buffered[l] = self._buffered.get(l, 0) + (h.shape[0] if h.dim() == 3 else 1)
        if self._buffered[l] >= self.batch_sequences:
            self._flush(l)

    def _flush(self, l: int) -> None:
        if self._buffer.get(l):
            self._observe_batch(l, torch.cat(self._buffer.pop(l)))
        self._buffered[l] = 0

    @torch.no_grad()
    def _observe_batch(self, l: int, x: torch.Tensor) -> None:
        """One calibration batch of (unmasked) tokens x [N, H] into layer l's statistics."""
        ad = self.adapter
        logits = ad.router_logits(l, x)
        st = self._layer(l, x.shape[-1])
        if x.shape[0] == 0:
            return
        E = ad.num_experts(l)
        ids = selected_experts(logits, ad.top_k)
        norms = torch.zeros(ids.shape, dtype=torch.float32, device=x.device)
        if self.characteristic:
            means = torch.empty(E, x.shape[-1], dtype=torch.float32, device=x.device)
            for e in range(E):
                y = ad.expert_output(l, e, ad.expert_hidden(l, e, x)).float()
                means[e] = y.mean(dim=0)
                tok, pos = torch.where(ids == e)
                norms[tok, pos] = torch.linalg.norm(y[tok], dim=-1)
            st.characteristic_activation.update(means, x.shape[0])
        else:
            for e in ids.unique().tolist():
                tok, pos = torch.where(ids == e)
                y = ad.expert_output(l, e, ad.expert_hidden(l, e, x[tok])).float()
                norms[tok, pos] = torch.linalg.norm(y, dim=-1)
        if self.similarity:
            st.router_logit_similarity.update(logit_similarity(logits), x.shape[0])
        st.add(batch_metrics(ids, norms, routing_weights(logits, ids, self.renormalize), E))

    def _hook(self, l: int):
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            self.observe(l, args[0] if args else next(iter(kwargs.values())))
        return hook

    def __enter__(self) -> "ExpertOutputObserver":
        try:
            for l in self.layers:
                self._handles.append(self.adapter.moe_block(l).register_forward_pre_hook(
                    self._hook(l), with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for l in list(self._buffer):              # the last, partial batch
            self._flush(l)
