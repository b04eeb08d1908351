"""weight_report (one read) equals census + kurtosis_report + mask_digest + targeted_counts."""
import math

import pytest
import torch

from stun_exp.analysis import sparsity as ledger
from stun_exp.analysis.kurtosis import Moments, chunk_moments, kurtosis_report
from stun_exp.analysis.weight_report import weight_report
from stun_exp.context import RunContext
from stun_exp.models.adapter import get_adapter
from stun_exp.pruning.weights.pruners import UnstructuredPruner
from tests.tiny_models import tiny_input, tiny_model


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float):
        # float32 chunk sums: another chunking rounds differently (documented precision ~1e-6 of
        # the kurtosis, so excess values near 0 get an absolute bound)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-4)
    else:
        assert a == b


def _same_kurtosis(one_read: dict, separate: dict, engine: str) -> None:
    """The kurtosis reports agree; each records the engine that took its sums."""
    assert (one_read["sums"], separate["sums"]) == (engine, "torch")
    _same({**one_read, "sums": None}, {**separate, "sums": None})


@pytest.fixture(params=["native", "torch"])
def engine(request, monkeypatch):
    """Each weight_report test runs with the C extension's scan and with the torch engine."""
    from stun_exp.analysis import weight_report as wr
    if request.param == "native" and wr.native is None:
        pytest.skip("stun-exp was installed without its C extension (see test_native_scan)")
    if request.param == "torch":
        monkeypatch.setattr(wr, "native", None)
    return request.param


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v2", "arctic"])
@pytest.mark.parametrize("chunk", [16, 1 << 16])
def test_one_read_equals_the_separate_analyses(arch, chunk, engine):
    model = tiny_model(arch)
    ad = get_adapter(model)
    pruner = UnstructuredPruner(score="wanda", name="wanda", prune_router=False)
    dense = weight_report(model, ad, chunk=chunk)
    _same(dense["census"], ledger.census(model, ad))
    _same_kurtosis(dense["kurtosis"], kurtosis_report(ad), engine)
    assert dense["mask_digest"] == ledger.mask_digest(ad)
    pruner.prune(RunContext(cfg=None, model=model, tokenizer=None, adapter=ad, calib=tiny_input(3, 12),
                            device=torch.device("cpu")), sparsity=0.5)
    after = weight_report(model, ad, nonzero_only=True, is_targeted=pruner.is_targeted, chunk=chunk)
    _same(after["census"], ledger.census(model, ad))
    _same_kurtosis(after["kurtosis"], kurtosis_report(ad, nonzero_only=True), engine)
    assert after["mask_digest"] == ledger.mask_digest(ad) != dense["mask_digest"]
    assert after["targeted"] == ledger.targeted_counts(ad, pruner.is_targeted)
    assert after["census"]["decoder_linear_nonzero"] < dense["census"]["decoder_linear_nonzero"]


def test_moments_merge_equals_one_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, generator=g) * 3 + 7, torch.rand(31, generator=g) - 20]).double()
    whole = chunk_moments(x.clone())
    merged = Moments()
    for part in x.split([1, 20, 0, 45, 15]):
        merged = merged + chunk_moments(part.clone())
    for f in ("n", "mean", "m2", "m3", "m4"):
        assert getattr(merged, f) == pytest.approx(getattr(whole, f), rel=1e-11)
    d = x - x.mean()
    assert whole.m3 == pytest.approx(float((d ** 3).sum()), rel=1e-11)
    assert whole.kurtosis() == pytest.approx(float((d ** 4).mean() / (d ** 2).mean() ** 2), rel=1e-12)
    # dropping the zeros by correction equals the moments of the non-zero entries
    y = x.clone()
    y[::3] = 0
    nz = chunk_moments(y[y != 0].clone())
    fast = chunk_moments(y.clone(), zeros=int((y == 0).sum()))
    for f in ("n", "mean", "m2", "m3", "m4"):
        assert getattr(fast, f) == pytest.approx(getattr(nz, f), rel=1e-11)


def _new_thread_default() -> int:
    """torch's thread count as a thread started now sees it."""
    import threading
    seen = []
    th = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    th.start()
    th.join()
    return seen[0]


def _half_zeroed_mixtral(embedding_zeros: bool = False):
    """A tiny mixtral whose targets lost the lower half of their magnitudes (and, if asked, every
    other embedding row), with its adapter."""
    model = tiny_model("mixtral")
    ad = get_adapter(model)
    with torch.no_grad():
        if embedding_zeros:
            model.get_input_embeddings().weight[::2] = 0
        for l in range(len(ad.layers)):
            for t in ad.linear_targets(l):
                t.weight[t.weight.abs() < t.weight.abs().median()] = 0
    return model, ad


def test_the_read_does_not_depend_on_the_thread_count(engine):
    model, ad = _half_zeroed_mixtral()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weight_report(model, ad, nonzero_only=True)
        torch.set_num_threads(3)
        three = weight_report(model, ad, nonzero_only=True)
        assert torch.get_num_threads() == 3 and _new_thread_default() == 3
    finally:
        torch.set_num_threads(before)
    assert one == three          # every float equal: each weight's sums are taken by one thread


def test_an_error_in_a_worker_reaches_the_caller_and_restores_threads(monkeypatch):
    from stun_exp.analysis import weight_report as wr
    model = tiny_model("mixtral")
    ad = get_adapter(model)
    real, calls, bad = wr._scan, [], ad.linear_targets(0)[2].weight

    def failing(w, *a):
        calls.append(1)
        if w.data_ptr() == bad.data_ptr() and w.shape == bad.shape:     # the third weight
            raise RuntimeError("unreadable weight")
        return real(w, *a)
    monkeypatch.setattr(wr, "_scan", failing)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="unreadable weight"):
            weight_report(model, ad)
        assert torch.get_num_threads() == 2 and _new_thread_default() == 2
    finally:
        torch.set_num_threads(before)
    targets = sum(len(ad.linear_targets(l)) for l in range(len(ad.layers)))
    assert len(calls) < targets          # the weights not started when it failed were dropped


@pytest.mark.parametrize("task_bytes", [1, 1 << 12, 1 << 30])
def test_the_read_does_not_depend_on_how_weights_are_batched(task_bytes, engine, monkeypatch):
    """Workers take consecutive weights ``TASK_BYTES`` at a time (one weight per task, a few, all);
    the parameters outside the targets (zeros in the embedding here) are counted beside them."""
    from stun_exp.analysis import weight_report as wr
    model, ad = _half_zeroed_mixtral(embedding_zeros=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = weight_report(model, ad, nonzero_only=True)
        monkeypatch.setattr(wr, "TASK_BYTES", task_bytes)
        torch.set_num_threads(2)
        batched = weight_report(model, ad, nonzero_only=True)
    finally:
        torch.set_num_threads(before)
    assert batched == serial
    assert batched["census"] == ledger.census(model, ad)
    embedding = model.get_input_embeddings().weight
    assert batched["census"]["all_params_nonzero"] <= (batched["census"]["all_params_numel"]
                                                       - embedding.numel() // 2)
