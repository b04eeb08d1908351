"""STUN phase-1 pure math on hand-built inputs: distances, clustering, search, representatives."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from stun_exp.pruning.expert import clustering as C
from stun_exp.pruning.expert.search import search_threshold

INF = math.inf


def sym(n: int, entries: dict[tuple[int, int], float], fill: float = 1.0) -> torch.Tensor:
    d = torch.full((n, n), fill)
    for (a, b), v in entries.items():
        d[a, b] = d[b, a] = v
    d.fill_diagonal_(INF)
    return d


def reference_loop(values: torch.Tensor, tau: float, cap: int) -> list[list[int]]:
    """The reference's matrix-masking loop, written independently (argmin over a mutable matrix)."""
    values = values.clone()
    n = values.shape[0]
    cl = {i: {i} for i in range(n)}
    while torch.min(values) < tau:
        if len({tuple(sorted(s)) for s in cl.values()}) <= n - cap:
            break
        u, v = (int(x) for x in torch.unravel_index(torch.argmin(values.flatten()), values.shape))
        star = [values[a, v] for a in cl[u]] + [values[b, u] for b in cl[v]]
        if max(star) < tau:
            for a in cl[u]:
                values[a, v] = INF
            for b in cl[v]:
                values[b, u] = INF
            union = cl[u] | cl[v]
            for x in union:
                cl[x] = union
        else:
            values[u, v] = values[v, u] = INF
    return sorted((sorted(s) for s in {tuple(sorted(s)) for s in cl.values()}), key=lambda s: s[0])


# ---- distances ---------------------------------------------------------------------------------
def test_router_distance_matches_naive_and_normalises():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    d = C.router_distance(w, normalize=False)
    for a, b in itertools.product(range(3), repeat=2):
        want = INF if a == b else math.dist(w[a].tolist(), w[b].tolist())
        assert d[a, b].item() == pytest.approx(want)
    fro = math.sqrt(1 + 1 + 9 + 16)
    assert C.router_distance(w)[0, 2].item() == pytest.approx(math.sqrt(4 + 16) / fro)


def test_coactivation_distance_mean_includes_diagonal():
    c = torch.tensor([[0.0, 6.0, 0.0], [6.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    mean = 18.0 / 9.0                           # all 9 entries, zero diagonal included
    d = C.coactivation_distance(c)
    assert d[0, 1].item() == pytest.approx(-6.0 / mean) and d[1, 2].item() == pytest.approx(-3.0 / mean)
    assert d[0, 2].item() == 0.0 and torch.isinf(d.diagonal()).all()
    assert C.coactivation_distance(c, divide_mean=False)[0, 1].item() == -6.0


def test_mixed_distance_is_weighted_coact_plus_unnormalised_router():
    w = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    c = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    d = C.mixed_distance(w, c, mix_weight=0.5)
    assert d[0, 1].item() == pytest.approx(0.5 * (-9.0 / 2.0) + 5.0)
    assert d[0, 2].item() == pytest.approx(1.0) and torch.isinf(d[2, 2])


def test_coactivation_counts_matches_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(40)])
    want = torch.zeros(5, 5, dtype=torch.float64)
    for i, j in ids.tolist():
        want[i, j] += 1
        want[j, i] += 1
    assert torch.equal(C.coactivation_counts(ids, 5), want)


# ---- clustering ------------------------------------------------------------------------------
def test_veto_blocks_chain():
    d = sym(3, {(0, 1): 0.1, (1, 2): 0.2, (0, 2): 0.9})
    assert C.greedy_clusters(d, 0.5, max_merges=None) == [[0, 1], [2]]


def test_star_linkage_is_not_complete_linkage():
    # Joining {0,1} and {2,3} through (1,2) checks D[0,2], D[1,2], D[2,1], D[3,1] only: D[0,3] = 0.9
    # is never looked at, so all four end up together.
    d = sym(4, {(0, 1): 0.1, (2, 3): 0.15, (1, 2): 0.2, (0, 2): 0.3, (1, 3): 0.35, (0, 3): 0.9})
    assert C.greedy_clusters(d, 0.5, max_merges=None) == [[0, 1, 2, 3]]


def test_sticky_rejection_vetoes_later_star():
    # (1,2) is rejected (its star holds D[0,2] = 0.9). Joining the same clusters through (1,3) has a
    # star (D[0,3], D[1,3], D[2,1], D[3,1]) all below τ, but D[2,1] was rejected: veto.
    d = sym(4, {(0, 1): 0.1, (2, 3): 0.15, (1, 2): 0.2, (1, 3): 0.25, (0, 3): 0.3, (0, 2): 0.9})
    assert C.greedy_clusters(d, 0.5, max_merges=None) == [[0, 1], [2, 3]]


def test_tie_break_row_major_and_cap():
    d = sym(4, {(1, 2): 0.2, (0, 3): 0.2})
    assert C.greedy_clusters(d, INF, max_merges=1) == [[0, 3], [1], [2]]
    assert C.greedy_clusters(d, INF, max_merges=2) == [[0, 3], [1, 2]]
    assert C.greedy_clusters(d, 0.1, max_merges=2) == [[0], [1], [2], [3]]


def test_default_one_merge_at_infinite_threshold():
    d = sym(5, {(3, 4): 0.05, (0, 1): 0.07}, fill=0.5)
    assert C.greedy_clusters(d, INF, max_merges=1) == [[0], [1], [2], [3, 4]]


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_matrix_loop_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    n = 9
    w = torch.randn(n, 4, generator=g)
    w[5] = w[2] + 0.01                           # a near-duplicate
    d = C.router_distance(w)
    d[3, 6] = d[6, 3] = d[1, 7]                  # an exact tie
    sp = C.SortedPairs.from_matrix(d)
    for tau, cap in [(0.2, 100), (0.35, 3), (0.5, 100), (INF, 1), (INF, 4), (0.3, 0)]:
        assert C.greedy_clusters(sp, tau, cap) == reference_loop(d, tau, cap), (tau, cap)


# ---- search ----------------------------------------------------------------------------------
def test_search_expands_then_halves_and_hits():
    # Total kept falls by one at each integer τ: total(τ) = 10 - floor(τ) for τ in [0, 10].
    def total(t):
        return 10 - int(math.floor(min(max(t, 0.0), 10.0)))
    res = search_threshold(total, 6, init=0.5, step=0.1)
    assert res.hit and total(res.threshold) == 6
    taus = [t for t, _ in res.trace]
    # expansion: +0.2, +0.4, +0.8, +1.6, +3.2 (to 6.7: total 4, overshoot) then halving: -1.6 ...
    assert taus[:6] == pytest.approx([0.5, 0.7, 1.1, 1.9, 3.5, 6.7])
    assert taus[6] == pytest.approx(6.7 - 1.6)


def test_search_unreachable_target_falls_back_deterministically():
    def total(t):                                # jumps 10 -> 8 at τ = 1: 9 is unreachable
        return 10 if t < 1.0 else 8
    res = search_threshold(total, 9, init=0.5, step=0.1)
    assert not res.hit and res.total == 10       # tie |10-9| = |8-9| -> keep more experts
    assert res.threshold == min(t for t, k in res.trace if k == 10)
    assert res.stop_reason in {"stalled", "step_underflow"} and len(res.trace) < 100


def test_search_stalls_on_constant_total():
    res = search_threshold(lambda t: 5, 3, init=0.5, step=0.1)
    assert res.stop_reason == "stalled" and len(res.trace) == 11 and res.total == 5


# ---- representative & reconstruction -------------------------------------------------------------
def test_representative_closest_to_mean():
    mats = {0: [torch.tensor([[0.0]]), torch.tensor([[0.0]])],
            4: [torch.tensor([[1.0]]), torch.tensor([[1.0]])],
            7: [torch.tensor([[5.0]]), torch.tensor([[5.0]])]}
    assert C.representative([0, 4, 7], [mats[e] for e in (0, 4, 7)]) == 4   # mean 2: |2|,|1|,|3|


def test_representative_tie_goes_to_lowest_id():
    a, b = [torch.randn(3, 2), torch.randn(2, 3)], [torch.randn(3, 2), torch.randn(2, 3)]
    assert C.representative([2, 6], [a, b]) == 2
    assert C.representative([2, 6], [b, a]) == 2
    sym3 = [[torch.tensor([[v]])] for v in (-1.0, 1.0, 3.0)]       # mean 1: member 5 wins
    assert C.representative([1, 5, 9], sym3) == 5
    tie3 = [[torch.tensor([[v]])] for v in (0.0, 2.0, 4.0, 6.0)]   # mean 3: members 5 and 7 tie
    assert C.representative([1, 5, 7, 9], tie3) == 5


def test_reconstruct_rules():
    cl = [[0, 1], [2], [3, 4, 5]]
    assert C.reconstruct_flags(cl, "layer_clusters", 0) == [False, False, False]
    assert C.reconstruct_flags(cl, "layer_clusters", 3) == [True, False, True]
    assert C.reconstruct_flags(cl, "layer_clusters", 2) == [False, False, False]
    assert C.reconstruct_flags(cl, "cluster_size", kappa=3) == [True, False, False]
    assert C.reconstruct_flags(cl, "cluster_size", kappa=4) == [True, False, True]
    with pytest.raises(ValueError, match="layer_clusters"):
        C.reconstruct_flags(cl, "size")


def test_all_zero_coactivation_is_a_clear_error():
    from stun_exp.errors import DataError
    with pytest.raises(DataError, match="all zeros"):
        C.coactivation_distance(torch.zeros(3, 3))


def test_trim_merges_keeps_global_smallest_prefixes():
    logs = {0: [(0.1, 0, 1), (0.3, 2, 3), (0.5, 0, 2)], 1: [(0.2, 4, 5), (0.3, 1, 2)]}
    kept = C.trim_merges(logs, 3)                                 # 0.1 (l0), 0.2 (l1), 0.3 (l0 wins the tie)
    assert kept == {0: [(0.1, 0, 1), (0.3, 2, 3)], 1: [(0.2, 4, 5)]}
    assert C.clusters_from_merges(6, kept[1]) == [[0], [1], [2], [3], [4, 5]]
    assert C.clusters_from_merges(4, logs[0]) == [[0, 1, 2, 3]]
