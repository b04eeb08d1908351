"""Pure clustering and alignment math of the merging baselines, as CerebrasResearch/reap runs them.

* Distances (``metrics.py``): ``euclidean`` = ‖x_i − x_j‖, ``cosine`` = 1 − cos, ``angular`` =
  acos(cos)/π, between the rows of a per-expert matrix (float32, REAP's functions).
* HC-SMoE (``cluster.py`` ``hierarchical_clustering`` + ``linkage_to_labels``): SciPy ``linkage``
  on the condensed distance matrix (zero diagonal), then the first n − c merges of the linkage
  replayed; labels numbered in ascending order of the final cluster ids.
* M-SMoE (``cluster.py`` ``mc_smoe_clustering``): the most frequent expert of every layer is
  dominant, the remaining dominant slots go to the globally most frequent others (stable sort,
  layer order then id on ties); every other expert joins its nearest dominant expert (first
  minimum over the sorted dominant ids).
* Dominant expert of a cluster (``merge.py``): its most frequent member (first maximum).
* Weight matching (``permute.py`` ``WeightMatchingPermuter``): cost[i, j] = Σ over gate, up (rows)
  and down (columns) of the squared L2 distance between intermediate neuron i of the expert and
  neuron j of the dominant expert (``torch.cdist(..)**2`` in the weights' dtype; on CPU, half
  precision goes through a float32 cdist rounded back), rounded to float16 before
  ``scipy.optimize.linear_sum_assignment``; the permutation is ``argsort(col_ind)``: new neuron j =
  old neuron matched to the dominant's neuron j.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from stun_exp.observe.reap_metrics import cosine_similarity_rows


# ---- distances ---------------------------------------------------------------------------------
def pairwise_distance(x: torch.Tensor, measure: str) -> torch.Tensor:
    """[n, n] distance between the rows of x, as REAP's ``distance_fn(x[None], x[:, None])``."""
    if measure == "euclidean":
        return torch.norm(x.unsqueeze(0) - x.unsqueeze(1), dim=-1)
    sim = cosine_similarity_rows(x, x)
    if measure == "cosine":
        return 1.0 - sim
    if measure == "angular":
        return torch.acos(torch.clamp(sim, -1.0, 1.0)) / math.pi
    raise ValueError(f"unknown distance {measure!r}; known: euclidean, cosine, angular")


# ---- HC-SMoE -----------------------------------------------------------------------------------
def linkage_to_labels(Z: np.ndarray, n_clusters: int) -> list[int]:
    """Labels after replaying the first n − c merges of a SciPy linkage matrix (REAP's rule)."""
    n = Z.shape[0] + 1
    if not 1 <= n_clusters <= n:
        raise ValueError(f"number of clusters must be in [1, {n}], got {n_clusters}")
    labels = np.arange(n)
    for i in range(n - n_clusters):
        a, b = int(Z[i, 0]), int(Z[i, 1])
        labels[(labels == a) | (labels == b)] = n + i
    remap = {int(v): k for k, v in enumerate(np.unique(labels))}
    return [remap[int(v)] for v in labels]


def hierarchical_labels(dist: torch.Tensor, method: str, n_clusters: int) -> list[int]:
    """HC-SMoE cluster labels of one layer from its [n, n] expert distance matrix."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform
    d = dist.detach().cpu().clone()
    d.fill_diagonal_(0)
    return linkage_to_labels(linkage(squareform(d.numpy()), method=method), n_clusters)


# ---- M-SMoE ------------------------------------------------------------------------------------
def dominant_experts(proba: Mapping[int, torch.Tensor], total_clusters: int) -> set[tuple[int, int]]:
    """Global dominant (layer, expert) set: each layer's most frequent, then the most frequent rest."""
    layers = list(proba)
    if total_clusters < len(layers):
        raise ValueError(f"total_clusters ({total_clusters}) must be >= the number of layers ({len(layers)})")
    dom = {(l, int(torch.argmax(proba[l]).item())) for l in layers}
    rest = [(float(p), l, e) for l in layers for e, p in enumerate(proba[l].tolist()) if (l, e) not in dom]
    rest.sort(key=lambda r: r[0], reverse=True)
    for _, l, e in rest[:max(0, total_clusters - len(dom))]:
        dom.add((l, e))
    return dom


def mc_smoe_labels(dist: Mapping[int, torch.Tensor], proba: Mapping[int, torch.Tensor],
                   total_clusters: int) -> dict[int, list[int]]:
    """M-SMoE labels of every layer: each expert joins its nearest dominant expert of the layer."""
    dom = dominant_experts(proba, total_clusters)
    out = {}
    for l in dist:
        n = proba[l].shape[0]
        doms = sorted(e for (ll, e) in dom if ll == l)
        idx = torch.tensor(doms, dtype=torch.long)
        raw = [e if (l, e) in dom else doms[int(torch.argmin(dist[l][e, idx]))] for e in range(n)]
        remap = {v: k for k, v in enumerate(sorted(set(raw)))}
        out[l] = [remap[v] for v in raw]
    return out


# ---- clusters -> groups --------------------------------------------------------------------------
def groups_from_labels(labels: Sequence[int]) -> list[list[int]]:
    """Member lists (ascending ids), ordered by smallest member."""
    by: dict[int, list[int]] = {}
    for e, c in enumerate(labels):
        by.setdefault(int(c), []).append(e)
    return sorted(by.values(), key=lambda g: g[0])


def dominant_of(members: Sequence[int], proba: torch.Tensor) -> int:
    """The most frequent member (first maximum in ascending id order), as REAP's merger picks it."""
    ids = torch.tensor(list(members), dtype=torch.long)
    return int(ids[torch.argmax(proba[ids])].item())


# ---- weight matching -------------------------------------------------------------------------------
def _sq_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cdist(a, b) ** 2`` in the weights' dtype. CPU torch has no half-precision cdist: there
    the distance is computed in float32 and rounded to the weights' dtype before squaring."""
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return torch.cdist(a.float(), b.float(), p=2).to(a.dtype) ** 2
    return torch.cdist(a, b, p=2) ** 2


def matching_cost(expert: Mapping[str, torch.Tensor], dom: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[I, I] cost between intermediate neurons (rows of gate/up, columns of down), weights' dtype."""
    up = _sq_cdist(expert["up"], dom["up"])
    gate = _sq_cdist(expert["gate"], dom["gate"])
    down = _sq_cdist(expert["down"].T, dom["down"].T)
    return up + gate + down


def matching_permutation(cost: torch.Tensor) -> list[int]:
    """Assignment of a [I, I] cost (rounded to float16 first, as REAP's permuter does), returned
    as p with p[j] = the expert neuron matched to the dominant's neuron j (``argsort(col_ind)``)."""
    from scipy.optimize import linear_sum_assignment
    _, col = linear_sum_assignment(cost.detach().cpu().to(torch.float16).numpy())
    return torch.tensor(col, dtype=torch.long).argsort().tolist()


def weight_matching_permutation(expert: Mapping[str, torch.Tensor], dom: Mapping[str, torch.Tensor]) -> list[int]:
    """Permutation p aligning `expert` to `dom`: neuron j of the aligned expert = neuron p[j]."""
    return matching_permutation(matching_cost(expert, dom))


def permute_weights(w: Mapping[str, torch.Tensor], perm: Sequence[int]) -> dict[str, torch.Tensor]:
    """Gate/up rows and down columns reordered by ``perm`` (the expert's function is unchanged)."""
    p = torch.as_tensor(list(perm), dtype=torch.long, device=w["gate"].device)
    return {"gate": w["gate"][p], "up": w["up"][p], "down": w["down"][:, p]}


