"""Scores and masks against naive loops on random tensors (exact)."""
import math

import pytest
import torch

from stun_exp.pruning.weights.masks import (nm_mask, parse_nm, row_mask, select_mask,
                                            threshold_mask)
from stun_exp.pruning.weights.scores import get_score, magnitude_score, wanda_score


def _rand(r=6, c=16, seed=0):
    return torch.randn(r, c, generator=torch.Generator().manual_seed(seed))


def test_magnitude_and_wanda_scores_match_loops():
    w = _rand()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    sq = (x ** 2).sum(0)
    s = wanda_score(w, sq)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            norm = math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0])))
            assert s[i, j].item() == pytest.approx(abs(float(w[i, j])) * norm, rel=1e-5)
            assert magnitude_score(w)[i, j] == abs(w[i, j])


def test_wanda_score_rejects_wrong_stat_shape():
    with pytest.raises(ValueError):
        wanda_score(_rand(), torch.ones(5))


def test_score_registry_suggests_closest():
    with pytest.raises(KeyError, match="wanda"):
        get_score("wandaa")


def _naive_row(score, s):
    mask = torch.zeros_like(score, dtype=torch.bool)
    k = int(score.shape[1] * s)
    for i in range(score.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda j: (float(score[i, j]), j))
        for j in order[:k]:
            mask[i, j] = True
    return mask


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.7])
def test_row_mask_matches_loop(s):
    sc = _rand(seed=3).abs()
    assert torch.equal(row_mask(sc, s), _naive_row(sc, s))


def test_row_mask_ties_go_to_lower_column():
    sc = torch.ones(2, 4)
    assert row_mask(sc, 0.5).tolist() == [[True, True, False, False]] * 2


def test_threshold_mask_matches_loop():
    sc = _rand(seed=4).abs()
    s = 0.4
    vals = sorted(float(v) for v in sc.flatten())
    thr = vals[int(sc.numel() * s)]
    naive = torch.tensor([[float(v) <= thr for v in row] for row in sc])
    assert torch.equal(threshold_mask(sc, s), naive)
    assert int(threshold_mask(sc, s).sum()) == int(sc.numel() * s) + 1  # the reference's rule


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_mask_matches_loop(nm):
    n, m = parse_nm(nm)
    sc = _rand(5, 16, seed=5).abs()
    naive = torch.zeros_like(sc, dtype=torch.bool)
    for i in range(sc.shape[0]):
        for g in range(0, sc.shape[1], m):
            order = sorted(range(g, g + m), key=lambda j: (float(sc[i, j]), j))
            for j in order[:n]:
                naive[i, j] = True
    got = select_mask(sc, 0.5, nm=(n, m))
    assert torch.equal(got, naive)
    assert int(got.sum()) == sc.numel() * n // m


def test_nm_mask_rejects_bad_width_and_pattern():
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError):
        parse_nm("4:2")
    assert parse_nm(None) is None


@pytest.mark.parametrize("s", [0.25, 0.3, 0.55])
def test_balanced_row_mask_hits_matrix_total_and_matches_loop(s):
    sc = _rand(7, 16, seed=8).abs()
    got = row_mask(sc, s, rounding="balanced")
    k = int(16 * s)
    extra = round(7 * 16 * s) - 7 * k
    ordered = [sorted(range(16), key=lambda j, i=i: (float(sc[i, j]), j)) for i in range(7)]
    nxt = sorted(range(7), key=lambda i: (float(sc[i, ordered[i][k]]), i))[:extra]
    naive = torch.zeros_like(sc, dtype=torch.bool)
    for i in range(7):
        for j in ordered[i][:k + (1 if i in nxt else 0)]:
            naive[i, j] = True
    assert torch.equal(got, naive)
    assert int(got.sum()) == round(7 * 16 * s)
    assert torch.equal(row_mask(sc, s), _naive_row(sc, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_apply_mask_writes_what_masked_fill_writes_bit_for_bit(dtype):
    """+0.0 in every pruned entry (also where the weight was negative, -0.0, NaN or inf), every
    kept entry untouched; on a whole matrix and on a strided view of a stacked expert tensor."""
    from stun_exp.pruning.weights.masks import apply_mask_
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(3, 24, 40, generator=g).to(dtype)
    stacked.view(-1)[::11] = float("nan")
    stacked.view(-1)[5::13] = float("-inf")
    stacked.view(-1)[7::17] = -0.0
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[stacked.element_size()]
    for view in (lambda t: t[1], lambda t: t[2].t(), lambda t: t[0, ::2, 3:35]):
        w = stacked.clone()
        target = view(w)
        mask = torch.rand(target.shape, generator=g) < 0.5
        expected = w.clone()
        view(expected).masked_fill_(mask, 0)
        apply_mask_(target, mask)
        assert torch.equal(w.view(ints), expected.view(ints))
        assert (view(w)[mask].view(ints) == 0).all() and not (view(w)[~mask].view(ints) == 0).all()
