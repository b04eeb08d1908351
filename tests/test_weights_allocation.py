"""OWL allocation against naive loops (exact on random inputs)."""
import pytest
import torch

from stun_exp.pruning.weights.allocation import (outlier_ratio, owl_nm_offsets, owl_sparsities,
                                                 uniform_sparsities)


def test_outlier_ratio_matches_loop():
    g = torch.Generator().manual_seed(0)
    mats = [torch.rand(4, 8, generator=g) ** 4, torch.rand(3, 5, generator=g) ** 4]
    vals = [float(v) for m in mats for v in m.flatten()]
    mean = sum(vals) / len(vals)
    naive = 100.0 * sum(v > 3 * mean for v in vals) / len(vals)
    assert outlier_ratio(mats, 3) == pytest.approx(naive, abs=1e-12)


def test_owl_sparsities_match_reference_formula():
    d = [1.0, 4.0, 2.5, 7.0]
    s, lam = 0.6, 0.08
    lo, hi = min(d), max(d)
    dn = [(v - lo) / (hi - lo) * 2 * lam for v in d]
    mean = sum(dn) / len(dn)
    naive = [s - (v - mean) for v in dn]
    got = owl_sparsities(d, s, lam)
    assert got == pytest.approx(naive, abs=1e-12)
    assert sum(got) / len(got) == pytest.approx(s)
    assert max(got) - min(got) == pytest.approx(2 * lam)
    assert got[3] == min(got)                     # most outliers -> lowest sparsity


def test_owl_equal_ratios_fall_back_to_uniform_and_clamp():
    assert owl_sparsities([2.0, 2.0, 2.0], 0.5, 0.1) == pytest.approx(uniform_sparsities(3, 0.5))
    assert owl_sparsities([0.0, 10.0], 0.05, 0.2)[1] == 0.01   # s <= 0 -> 0.01 (reference)


def test_owl_params_weighting_hits_weighted_target():
    d, n = [1.0, 5.0, 3.0], [100.0, 400.0, 50.0]
    got = owl_sparsities(d, 0.5, 0.1, weights=n)
    assert sum(a * b for a, b in zip(got, n)) / sum(n) == pytest.approx(0.5)
    unweighted = owl_sparsities(d, 0.5, 0.1)
    diffs = [a - b for a, b in zip(got, unweighted)]
    assert max(diffs) - min(diffs) == pytest.approx(0.0, abs=1e-12)  # a pure shift


def test_owl_params_weighting_clamps_and_resolves():
    got = owl_sparsities([0.0, 10.0, 10.0], 0.1, 0.3, weights=[10.0, 1.0, 1.0])
    assert min(got) >= 0.01
    assert (got[0] * 10 + got[1] + got[2]) / 12 == pytest.approx(0.1)


def test_owl_nm_offsets():
    # lambda = 2 spreads D over [0, 2]; mean-centred and rounded
    assert owl_nm_offsets([0.0, 5.0, 10.0], 2.0) == [-1, 0, 1]
    assert owl_nm_offsets([1.0, 3.0], 0.08) == [0, 0]
