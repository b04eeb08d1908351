"""SparseGPT (Frantar & Alistarh 2023; IST-DASLab/sparsegpt ``sparsegpt.py``) as a pure function.

Given one weight W [C_out, C_in] and its input Hessian H ~ sum_t x_t x_t^T [C_in, C_in] (any
positive scale: dampening is relative to mean(diag H), so the scale cancels):

1. Dead inputs (H_ii == 0): set H_ii = 1 and zero column i of W.
2. H += percdamp * mean(diag H) * I;  U = chol(H^-1, upper).
3. Column blocks of ``blocksize``: unstructured masks are chosen per block jointly over all
   rows (score w^2 / U_jj^2, prune score <= value at sorted position floor(numel * s));
   N:M masks per row per group of M just before the group is processed (on the already
   updated weights). Each pruned column's error is propagated to the later columns (OBS update),
   within the block immediately and to later blocks lazily.

Differences from the reference code: s == 0 prunes nothing (the code would prune the minimum of
each block); N:M ties fall to the lower index (stable sort instead of topk).
MoE (our extension): an expert's H comes from its routed tokens only; a zero-token expert has H == 0
and would be zeroed wholesale, so the caller must not pass it here (policy in pruners.py).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from stun_exp.pruning.weights.masks import kth_values, nm_mask

# weight entries per stack: 16 MB of fp32 weights (+ mask and block buffers); larger stacks save
# little per-column Python time and raise the peak memory of the layer
MAX_STACK_NUMEL = 1 << 22


def _inverse_factor(h: Tensor, percdamp: float, consume: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of the prepared H^-1, dead-input mask). H is prepared (dead inputs,
    dampening) on a copy, or, with ``consume``, in place, and the factor is then written into H's
    own memory with the factor's strides (the same values and layout, so the same BLAS products):
    the factors then cost no memory beyond the Hessians that exist anyway."""
    own = h.detach().to(device, torch.float32)
    if not consume and own.data_ptr() == h.data_ptr():
        own = own.clone()
    dead = torch.diagonal(own) == 0
    own[dead, dead] = 1.0
    own += percdamp * torch.mean(torch.diagonal(own)) * torch.eye(own.shape[0], dtype=own.dtype,
                                                                   device=own.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(own)), upper=True)
    if consume and own.is_contiguous() and (u.is_contiguous() or u.mT.is_contiguous()):
        u = own.as_strided(u.shape, u.stride()).copy_(u)
    return u, dead


class _Factors:
    """One factor per distinct Hessian of a call: matrices fed by the same inputs (an expert's gate
    and up projections) pass the same tensor, factored once; each is dropped after its last use."""

    def __init__(self, hessians: Sequence[Tensor], percdamp: float, consume: bool) -> None:
        self.percdamp, self.consume = percdamp, consume
        self.uses: dict[tuple, int] = {}
        for h in hessians:
            self.uses[self._key(h)] = self.uses.get(self._key(h), 0) + 1
        self.done: dict[tuple, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _key(h: Tensor) -> tuple:
        return h.device, h.data_ptr(), tuple(h.shape), tuple(h.stride())

    def take(self, h: Tensor, w: Tensor) -> Tensor:
        """The factor for ``h``; zeroes the dead-input columns of ``w`` (one matrix)."""
        key = self._key(h)
        if key not in self.done:
            self.done[key] = _inverse_factor(h, self.percdamp, self.consume, w.device)
        u, dead = self.done[key]
        self.uses[key] -= 1
        if not self.uses[key]:
            del self.done[key]
        w[:, dead] = 0.0
        return u


@torch.no_grad()
def sparsegpt_prune(weight: Tensor, hessian: Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Return (updated weight in fp32, boolean mask of pruned entries). Inputs are not modified."""
    (w, mask), = sparsegpt_prune_many([(weight, hessian)], sparsity, nm, blocksize, percdamp)
    return w, mask


@torch.no_grad()
def sparsegpt_prune_many(items: Sequence[tuple[Tensor, Tensor]], sparsity: float,
                         nm: tuple[int, int] | None = None, blocksize: int = 128,
                         percdamp: float = 0.01, max_numel: int = MAX_STACK_NUMEL,
                         consume_hessians: bool = False) -> list[tuple[Tensor, Tensor]]:
    """``sparsegpt_prune`` of each (weight, hessian), equal bit for bit to one call per matrix."""
    out = dict(iter_sparsegpt(items, sparsity, nm, blocksize, percdamp, max_numel, consume_hessians))
    return [out[i] for i in range(len(items))]


@torch.no_grad()
def iter_sparsegpt(items: Sequence[tuple[Tensor, Tensor]], sparsity: float,
                   nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01,
                   max_numel: int = MAX_STACK_NUMEL, consume_hessians: bool = False
                   ) -> Iterator[tuple[int, tuple[Tensor, Tensor]]]:
    """Yield (index, (weight, mask)) as ``sparsegpt_prune`` would return them, stack by stack
    (grouped by shape, so not necessarily in index order).

    ``consume_hessians``: the Hessians are overwritten by their factors (the caller drops them
    afterwards); otherwise they are left as they were.

    Matrices of one shape are stacked (in their order; stacks of balanced sizes with at most
    ``max_numel`` weight entries, or one matrix, so memory stays bounded) and their column loops
    run together: every step is elementwise per matrix, or a per-matrix selection / matrix
    product, so stacking changes no value, only the per-column Python cost (the experts of an MoE
    layer share shapes).
    """
    factors = _Factors([h for _, h in items], percdamp, consume_hessians)
    groups: dict[tuple, list[int]] = {}
    for i, (w, _) in enumerate(items):
        groups.setdefault(tuple(w.shape), []).append(i)
    for idx in groups.values():
        stacks = -(-len(idx) * items[idx[0]][0].numel() // max(max_numel, 1))    # ceil: balanced sizes
        per = max(1, -(-len(idx) // max(stacks, 1)))
        for a in range(0, len(idx), per):
            part = idx[a:a + per]
            yield from zip(part, _prune_stack([items[i] for i in part], sparsity, nm, blocksize, factors))


def _prune_stack(items: Sequence[tuple[Tensor, Tensor]], sparsity: float, nm: tuple[int, int] | None,
                 blocksize: int, cache: _Factors) -> list[tuple[Tensor, Tensor]]:
    w = torch.stack([wt.detach().float() for wt, _ in items])                       # [E, rows, cols]
    # the factors in LAPACK's memory layout (it picks the BLAS path of the lazy update product
    # below, so it is kept); each block's diagonal tiles are stacked for the elementwise column
    # loop (a stacked copy of the whole factors would double their memory)
    factors = [cache.take(h, w[e]) for e, (_, h) in enumerate(items)]
    n_mat, rows, cols = w.shape
    if nm is not None and (blocksize % nm[1] or cols % nm[1]):
        raise ValueError(f"N:M {nm} needs blocksize ({blocksize}) and width ({cols}) divisible by M")
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, :, i1:i2].clone(), torch.stack([f[i1:i2, i1:i2] for f in factors])
        d = torch.diagonal(u1, dim1=1, dim2=2)                                       # [E, B]
        m1 = _block_mask(w1, d, sparsity) if nm is None else torch.zeros_like(w1, dtype=torch.bool)
        err1 = torch.zeros_like(w1)
        for c in range(i2 - i1):
            if nm is not None and c % nm[1] == 0:
                grp = w1[:, :, c:c + nm[1]] ** 2 / d[:, None, c:c + nm[1]] ** 2
                m1[:, :, c:c + nm[1]] |= nm_mask(grp.reshape(n_mat * rows, -1), *nm).view_as(grp)
            col = w1[:, :, c]
            q = col.masked_fill(m1[:, :, c], 0.0)
            err = (col - q) / d[:, c:c + 1]
            w1[:, :, c:] -= err.unsqueeze(2) * u1[:, c, c:].unsqueeze(1)
            w1[:, :, c] = q
            err1[:, :, c] = err
        w[:, :, i1:i2] = w1
        mask[:, :, i1:i2] = m1
        for e in range(n_mat):                       # per matrix: the reference's own product
            w[e, :, i2:] -= err1[e] @ factors[e][i1:i2, i2:]
    return [(w[e], mask[e]) for e in range(n_mat)]


def _block_mask(w1: Tensor, d: Tensor, sparsity: float) -> Tensor:
    """Unstructured masks of one column block [E, rows, B], one threshold per matrix over all its rows."""
    if sparsity <= 0:
        return torch.zeros_like(w1, dtype=torch.bool)
    score = w1 ** 2 / d.unsqueeze(1) ** 2
    flat = score.reshape(score.shape[0], -1)
    thr = kth_values(flat, int(flat.shape[1] * sparsity) + 1)
    return score <= thr[:, :, None]
