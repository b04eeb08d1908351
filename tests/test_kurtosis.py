"""Kurtosis against scipy.stats.kurtosis (an independent implementation) on random tensors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from stun_exp.analysis.kurtosis import kurtosis, kurtosis_report, pooled_kurtosis
from stun_exp.models.adapter import Target

FP32 = 1e-5   # the documented bound for float32 chunk sums (a few 1e-6 on real-size matrices)


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "student"])
@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_matches_scipy(dist: str, chunk: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = {"normal": lambda: torch.randn(37, 23, generator=g),
         "laplace": lambda: torch.distributions.Laplace(0.3, 2.0).sample((37, 23)),
         "uniform": lambda: torch.rand(37, 23, generator=g) * 5 - 1,
         "student": lambda: torch.distributions.StudentT(5.0).sample((37, 23))}[dist]()
    ref = stats.kurtosis(x.double().numpy().ravel(), fisher=False, bias=True)
    # float32 / 16-bit weights: float32 chunk sums (documented bound); float64 weights: float64
    assert kurtosis(x, chunk=chunk) == pytest.approx(ref, rel=FP32)
    assert kurtosis(x, excess=True, chunk=chunk) == pytest.approx(ref - 3.0, abs=FP32 * ref)
    assert kurtosis(x.double(), chunk=chunk) == pytest.approx(ref, rel=1e-10)
    assert kurtosis(x.to(torch.bfloat16), chunk=chunk) == pytest.approx(
        stats.kurtosis(x.to(torch.bfloat16).double().numpy().ravel(), fisher=False), rel=FP32)


def test_known_values() -> None:
    # {-1, 1}: m2 = 1, m4 = 1 -> plain 1.0 (the minimum); uniform-ish -> 1.8; large normal -> ~3
    assert kurtosis(torch.tensor([-1.0, 1.0, -1.0, 1.0])) == pytest.approx(1.0)
    assert kurtosis(torch.linspace(-1, 1, 100001)) == pytest.approx(1.8, abs=1e-3)
    assert kurtosis(torch.randn(200000)) == pytest.approx(3.0, abs=0.1)
    assert math.isnan(kurtosis(torch.ones(5)))


def test_pooled_is_concatenation_and_differs_from_mean() -> None:
    a, b = torch.randn(50, 8), 10 * torch.randn(30, 8)
    ref = stats.kurtosis(torch.cat([a.ravel(), b.ravel()]).double().numpy(), fisher=False)
    assert pooled_kurtosis([a, b], chunk=13) == pytest.approx(ref, rel=FP32)
    assert pooled_kurtosis([a.double(), b.double()], chunk=13) == pytest.approx(ref, rel=1e-10)
    # pooling matrices of different variance inflates kurtosis over the mean of the parts
    assert pooled_kurtosis([a, b]) > (kurtosis(a) + kurtosis(b)) / 2 + 1.0


def test_nonzero_only() -> None:
    x = torch.randn(40, 40)
    masked = x * (torch.rand(40, 40) > 0.5)
    nz = masked[masked != 0].double().numpy()
    assert kurtosis(masked, nonzero_only=True, chunk=11) == pytest.approx(
        stats.kurtosis(nz, fisher=False), rel=FP32)
    assert kurtosis(masked.double(), nonzero_only=True, chunk=11) == pytest.approx(
        stats.kurtosis(nz, fisher=False), rel=1e-10)
    # zeros (a spike at 0) change the value: the labelled option exists for a reason
    assert abs(kurtosis(masked) - kurtosis(masked, nonzero_only=True)) > 0.3


def _fake_adapter(mats: dict[int, list[tuple[str, torch.Tensor]]]) -> SimpleNamespace:
    def targets(layer: int) -> list[Target]:
        out = []
        for i, (kind, w) in enumerate(mats[layer]):
            out.append(Target(name=f"l{layer}.{kind}{i}", kind=kind, weight=w,
                              expert=i if kind == "expert" else None,
                              matrix="up" if kind == "expert" else None))
        return out
    return SimpleNamespace(layers=[None] * len(mats), linear_targets=targets)


def test_report_aggregates() -> None:
    g = torch.Generator().manual_seed(3)
    e = [torch.randn(8, 6, generator=g) * s for s in (1.0, 3.0)]
    att = torch.randn(6, 6, generator=g)
    e1 = [torch.randn(4, 6, generator=g), torch.randn(16, 6, generator=g)]
    ad = _fake_adapter({0: [("attention", att), ("expert", e[0]), ("expert", e[1])],
                        1: [("expert", e1[0]), ("expert", e1[1])]})
    rep = kurtosis_report(ad)
    sk = lambda t: stats.kurtosis(t.double().numpy().ravel(), fisher=False)  # noqa: E731
    k = {"att": sk(att), "e0": sk(e[0]), "e1": sk(e[1]), "f0": sk(e1[0]), "f1": sk(e1[1])}
    l0 = rep["per_layer"]["0"]
    assert l0["expert_mean"] == pytest.approx((k["e0"] + k["e1"]) / 2)
    assert l0["all_mean"] == pytest.approx((k["att"] + k["e0"] + k["e1"]) / 3)
    assert l0["expert_pooled"] == pytest.approx(sk(torch.cat([e[0].ravel(), e[1].ravel()])))
    m = rep["model"]
    assert m["expert_mean"] == pytest.approx((k["e0"] + k["e1"] + k["f0"] + k["f1"]) / 4)
    w = np.array([48, 48, 24, 96.0])
    assert m["expert_weighted"] == pytest.approx(
        float(np.dot(w, [k["e0"], k["e1"], k["f0"], k["f1"]]) / w.sum()))
    assert m["all_weighted"] == pytest.approx(
        float(np.dot([36, 48, 48, 24, 96], [k["att"], k["e0"], k["e1"], k["f0"], k["f1"]]) / 252))
    assert m["all_mean_excess"] == pytest.approx(m["all_mean"] - 3)
    assert len(rep["per_matrix"]) == 5 and rep["nonzero_only"] is False
    assert kurtosis_report(ad, nonzero_only=True)["label"] == "non-zero entries only"


def test_report_model_pooled() -> None:
    g = torch.Generator().manual_seed(5)
    a, b, att = torch.randn(8, 4, generator=g), 4 * torch.randn(8, 4, generator=g), torch.randn(4, 4, generator=g)
    ad = _fake_adapter({0: [("attention", att), ("expert", a)], 1: [("expert", b)]})
    m = kurtosis_report(ad)["model"]
    sk = lambda *ts: stats.kurtosis(torch.cat([t.ravel() for t in ts]).double().numpy(), fisher=False)  # noqa: E731
    assert m["expert_pooled"] == pytest.approx(sk(a, b))
    assert m["all_pooled"] == pytest.approx(sk(att, a, b))
    assert m["expert_pooled_layer_mean"] == pytest.approx((sk(a) + sk(b)) / 2)
    assert m["all_pooled_excess"] == pytest.approx(m["all_pooled"] - 3)


def test_report_on_real_adapter() -> None:
    """Through the adapter's linear_targets on a tiny Mixtral (fused 3-D expert storage)."""
    from stun_exp.models.adapter import get_adapter
    from tests.tiny_models import tiny_model
    model = tiny_model("mixtral")
    ad = get_adapter(model)
    rep = kurtosis_report(ad)
    experts = [r for r in rep["per_matrix"] if r["kind"] == "expert"]
    assert len(experts) == 2 * 8 * 3
    w = ad.expert(0, 3)["down"]
    row = next(r for r in experts if r["layer"] == 0 and r["expert"] == 3 and r["matrix"] == "down")
    assert row["kurtosis"] == pytest.approx(stats.kurtosis(w.double().numpy().ravel(), fisher=False), rel=FP32)
    pooled0 = torch.cat([ad.expert(0, e)[m].reshape(-1) for e in range(8) for m in ("gate", "up", "down")])
    assert rep["per_layer"]["0"]["expert_pooled"] == pytest.approx(
        stats.kurtosis(pooled0.double().numpy(), fisher=False), rel=FP32)


def test_float32_chunk_sums_keep_the_documented_precision_on_a_full_size_matrix() -> None:
    """Float32 sums over 1 MB chunks of a 1024 x 1024 matrix: within FP32 of float64, dense and pruned."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1024, 1024, generator=g) * 0.02 + 1e-3
    pruned = w * (w.abs() > 0.01)
    for t, nz in ((w, False), (pruned, True)):
        assert kurtosis(t, nonzero_only=nz) == pytest.approx(kurtosis(t.double(), nonzero_only=nz), rel=FP32)
