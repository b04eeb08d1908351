"""STUN phase-1 math: expert distance matrices, greedy star-linkage clustering, representatives.

Faithful to thnkinbtfly/STUN ``merge_weight.py`` (``select_expert_pairs``,
``dsatur_select_mean_weight_merge``), restated in our own code:

* Distances (fp32, diagonal set to +inf afterwards):
  - ``router``: Euclidean distance between router rows, divided by the Frobenius norm of the whole
    router matrix when ``normalize`` (the reference's default ``division_by_norm``).
  - ``coactivation``: ``-C``, divided by ``|mean(C)|`` when ``divide_mean``; the mean runs over all n²
    entries including the (zero) diagonal, before the diagonal is set to +inf.
  - ``mixed``: ``λ·(-C/|mean(C)|) + ‖W_a − W_b‖₂``. As in the code, the co-activation term is always
    mean-divided and the router term is never Frobenius-normalised in this mode. (The code treats
    ``mix_weight=0`` as "no mixing"; here ``mixed`` with λ=0 is the plain unnormalised router distance.)
* Clustering ("greedy_but_reject_mixed"): pairs are visited in ascending distance, ties in row-major
  order (what ``torch.argmin`` on the flattened matrix returns). Joining clusters A∋u and B∋v needs every
  star distance D[a, v] (a∈A) and D[b, u] (b∈B) below τ and none of them previously rejected; otherwise
  (u, v) is rejected for good. At most ``max_merges`` merges happen per layer. The reference re-runs
  ``argmin`` over a matrix whose entries only ever become +inf, so walking a once-sorted pair list and
  skipping dead pairs visits exactly the same sequence (and makes n = 128 cheap).
* Representative: the member whose concatenated (gate|up|down) weights are closest in L2 to the
  cluster mean, computed in fp32 (the code uses the checkpoint dtype). Ties → lowest expert id; a tie
  is a relative gap below ``TIE_RTOL``, which always covers two-member clusters (both members are
  equidistant from their midpoint in exact arithmetic; the code resolves these by bf16 rounding, which
  mostly yields the lower id).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from stun_exp.errors import DataError

TIE_RTOL = 1e-6


# ---- distances ------------------------------------------------------------------------------
def router_distance(router: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """[E, H] router rows -> [E, E] fp32 Euclidean distances (÷‖W‖_F if normalize), diagonal +inf."""
    w = router.detach().float().cpu()
    # Direct differences (not the matmul shortcut) so D is exactly symmetric and tie-breaks are stable.
    d = torch.stack([(w - w[i]).norm(dim=1) for i in range(w.shape[0])])
    if normalize:
        d = d / w.norm()
    return _inf_diagonal(d)


def coactivation_distance(coact: torch.Tensor, divide_mean: bool = True) -> torch.Tensor:
    """[E, E] co-activation counts -> -C (÷|mean C| over all n² entries if divide_mean), diagonal +inf."""
    d = -coact.detach().float().cpu().clone()
    if divide_mean:
        d = d / _abs_mean(coact)
    return _inf_diagonal(d)


def mixed_distance(router: torch.Tensor, coact: torch.Tensor, mix_weight: float) -> torch.Tensor:
    """λ·(-C/|mean C|) + unnormalised router distance, diagonal +inf (the code's ``mix_weight`` path)."""
    c = -coact.detach().float().cpu() / _abs_mean(coact)
    r = router_distance(router, normalize=False)
    return _inf_diagonal(mix_weight * c + r.masked_fill(torch.isinf(r), 0.0))


def _abs_mean(coact: torch.Tensor) -> torch.Tensor:
    m = coact.detach().float().mean().abs()
    if m == 0:
        raise DataError("co-activation matrix is all zeros (no routed tokens): cannot divide by its mean")
    return m


def _inf_diagonal(d: torch.Tensor) -> torch.Tensor:
    d = d.clone()
    d.fill_diagonal_(float("inf"))
    return d


def coactivation_counts(topk_ids: torch.Tensor, n: int, k: int = 2) -> torch.Tensor:
    """Tokens whose top-``k`` set contains both a and b: [N, >=k] ids (best first) -> [n, n] counts.

    With k = 2 this is the reference's statistic (pairs {i_t, j_t}, symmetric, zero diagonal),
    computed with a bincount over a·n+b instead of a [T, n, n] one-hot tensor.
    """
    ids = topk_ids[:, :k].long().cpu()
    out = torch.zeros(n * n, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            if i != j:
                out += torch.bincount(ids[:, i] * n + ids[:, j], minlength=n * n).double()
    return out.view(n, n)


# ---- greedy clustering ----------------------------------------------------------------------
@dataclass
class SortedPairs:
    """Off-diagonal finite pairs of one distance matrix, ascending, ties row-major. Reused per τ."""
    dist: np.ndarray          # [n, n] float64 copy of D
    order: list[tuple[float, int, int]] = field(default_factory=list)

    @classmethod
    def from_matrix(cls, d: torch.Tensor) -> "SortedPairs":
        dn = d.detach().double().cpu().numpy()
        n = dn.shape[0]
        flat = dn.reshape(-1)
        idx = np.lexsort((np.arange(n * n), flat))   # primary: value, secondary: flat (row-major) index
        order = [(float(flat[i]), int(i // n), int(i % n)) for i in idx
                 if i // n != i % n and flat[i] < math.inf]
        return cls(dn, order)


def greedy_merges(d: torch.Tensor | SortedPairs, threshold: float,
                  max_merges: Optional[int] = 1) -> list[tuple[float, int, int]]:
    """The reference's greedy_but_reject_mixed clustering at one threshold τ, as its merge log.

    Returns the accepted merges (D[u, v], u, v) in the order they happen (ascending D).
    ``max_merges=None`` = no cap.
    """
    sp = d if isinstance(d, SortedPairs) else SortedPairs.from_matrix(d)
    dist, n = sp.dist, sp.dist.shape[0]
    floor = 1 if max_merges is None else n - max_merges
    cluster_of = list(range(n))
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    dead = np.zeros((n, n), dtype=bool)             # entries the reference has set to +inf
    log: list[tuple[float, int, int]] = []
    for value, u, v in sp.order:
        if len(members) <= floor or not value < threshold:
            break
        if dead[u, v]:
            continue
        a_id, b_id = cluster_of[u], cluster_of[v]
        if a_id == b_id:                             # star holds D[v, v] = inf -> rejected
            dead[u, v] = dead[v, u] = True
            continue
        star = [(a, v) for a in members[a_id]] + [(b, u) for b in members[b_id]]
        if all(dist[p] < threshold and not dead[p] for p in star):
            for p in star:
                dead[p] = True
            members[a_id] += members.pop(b_id)
            for e in members[a_id]:
                cluster_of[e] = a_id
            log.append((value, u, v))
        else:
            dead[u, v] = dead[v, u] = True           # sticky rejection
    return log


def clusters_from_merges(n: int, merges: Sequence[tuple[float, int, int]]) -> list[list[int]]:
    """Replay merges (union of u's and v's clusters) -> sorted clusters, ordered by smallest member."""
    cluster_of = list(range(n))
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    for _, u, v in merges:
        a_id, b_id = cluster_of[u], cluster_of[v]
        if a_id != b_id:
            members[a_id] += members.pop(b_id)
            for e in members[a_id]:
                cluster_of[e] = a_id
    return sorted((sorted(m) for m in members.values()), key=lambda m: m[0])


def greedy_clusters(d: torch.Tensor | SortedPairs, threshold: float,
                    max_merges: Optional[int] = 1) -> list[list[int]]:
    """Clusters (sorted id lists, ordered by smallest member) of ``greedy_merges`` at τ."""
    sp = d if isinstance(d, SortedPairs) else SortedPairs.from_matrix(d)
    return clusters_from_merges(sp.dist.shape[0], greedy_merges(sp, threshold, max_merges))


def trim_merges(logs: dict[int, list[tuple[float, int, int]]], keep: int) -> dict[int, list]:
    """Keep the ``keep`` smallest-distance merges over all layers (ties: layer, then merge order).

    Each layer's log is ascending, so every layer keeps a prefix of its own merge sequence: a state
    the greedy procedure passed through. Used to hit a total exactly (search.py's ``trim`` rule).
    """
    events = sorted((m[0], l, i) for l, log in logs.items() for i, m in enumerate(log))[:keep]
    count = {l: 0 for l in logs}
    for _, l, _i in events:
        count[l] += 1
    return {l: log[:count[l]] for l, log in logs.items()}


# ---- representative and reconstruction --------------------------------------------------------
def representative(members: Sequence[int], weights: Sequence[Sequence[torch.Tensor]]) -> int:
    """Member closest (L2, fp32) to the mean of the members' concatenated weights; ties → lowest id.

    ``weights[i]`` is the list of matrices of ``members[i]`` (e.g. gate, up, down); the squared
    distance is accumulated matrix by matrix, so no concatenated copy is ever built.
    """
    members = list(members)
    if len(members) == 1:
        return members[0]
    sq = torch.zeros(len(members), dtype=torch.float64)
    for mats in zip(*weights):
        stack = torch.stack([m.detach().float().cpu() for m in mats])
        diff = stack - stack.mean(dim=0, keepdim=True)
        sq += diff.reshape(len(members), -1).pow(2).sum(dim=1).double()
    dists = sq.sqrt()
    best = float(dists.min())
    tied = [i for i in range(len(members)) if dists[i] <= best * (1 + TIE_RTOL) + 1e-30]
    return min(members[i] for i in tied)


def reconstruct_flags(clusters: Sequence[Sequence[int]], rule: str, max_clusters: int = 0,
                      kappa: int = 3) -> list[bool]:
    """Which clusters are replaced by their average (True) instead of a kept representative.

    ``layer_clusters`` (code): every multi-member cluster of a layer left with ≤ ``max_clusters``
    clusters. ``cluster_size`` (paper's κ rule): each multi-member cluster with fewer than κ members.
    Singletons are never averaged.
    """
    if rule == "layer_clusters":
        avg = len(clusters) <= max_clusters
        return [avg and len(c) > 1 for c in clusters]
    if rule == "cluster_size":
        return [1 < len(c) < kappa for c in clusters]
    raise ValueError(f"unknown reconstruct_rule {rule!r}; known: layer_clusters, cluster_size")
