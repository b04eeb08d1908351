"""The fast paths give the same bits as the plain computations they replace, on tiny inputs and models.

* masks: selection (numpy's on CPU) instead of a stable sort; N:M groups by pairwise ranks;
* SparseGPT: same-shape matrices stacked, against the plain one-matrix column loop below;
* observer: the fused forward's own gated hidden states instead of a per-expert recomputation,
  for the statistics and for whole pruning runs (Wanda, SparseGPT, OWL, MoE-Pruner).
"""
from functools import partial

import pytest
import torch

from stun_exp.context import RunContext
from stun_exp.models.adapter import get_adapter
from stun_exp.observe import observer as O
from stun_exp.pruning.weights import pruners as P
from stun_exp.pruning.weights.masks import kth_values, nm_mask, row_mask, threshold_mask
from stun_exp.pruning.weights.sparsegpt import sparsegpt_prune, sparsegpt_prune_many
from tests.tiny_models import tiny_input, tiny_model


def _scores():
    g = torch.Generator().manual_seed(0)
    yield torch.rand(40, 64, generator=g)
    yield torch.randint(0, 4, (30, 24), generator=g).float()          # many ties
    z = torch.zeros(8, 16)
    z[::2] = -0.0                                                       # signed zeros tie
    yield z
    yield torch.randn(9, 13, generator=g)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.93])
def test_masks_equal_the_sort_rules(s):
    for sc in _scores():
        k = int(sc.shape[1] * s)
        idx = torch.sort(sc, dim=1, stable=True).indices[:, :k]
        ref = torch.zeros_like(sc, dtype=torch.bool).scatter_(1, idx, True)
        assert torch.equal(row_mask(sc, s), ref)
        if s > 0:
            thr = torch.sort(sc.flatten()).values[int(sc.numel() * s)]
            assert torch.equal(threshold_mask(sc, s), sc <= thr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_kth_values_equal_torch_kthvalue(dtype):
    g = torch.Generator().manual_seed(1)
    odd = torch.randn(6, 33, generator=g)
    odd[0, 3], odd[1, :5], odd[2, ::2] = float("nan"), float("inf"), -0.0
    odd[3] = -float("inf")
    for sc in [*_scores(), odd, torch.rand(1, 1000, generator=g)]:
        sc = sc.to(dtype)
        for k in sorted({1, sc.shape[1] // 2, sc.shape[1]}):
            ref = torch.kthvalue(sc.float(), k, dim=1, keepdim=True).values.to(dtype)
            got = kth_values(sc, k)
            assert got.shape == (sc.shape[0], 1)
            exact = partial(torch.testing.assert_close, rtol=0, atol=0, equal_nan=True)  # checks dtype
            exact(got, ref)
            exact(kth_values(sc.t().contiguous().t(), k), got)      # strided rows


def _nm_by_sort(sc, n, m):
    g = sc.reshape(sc.shape[0], -1, m)
    idx = torch.sort(g, dim=-1, stable=True).indices[..., :n]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(sc.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16)])
def test_nm_ranks_equal_the_stable_sort(n, m):
    g = torch.Generator().manual_seed(2)
    cases = [torch.rand(512, 512, generator=g),                             # whole-matrix size
             torch.randint(0, 3, (512, 512), generator=g).float(),          # ties everywhere
             torch.rand(2048, m, generator=g),                              # SparseGPT's per-group calls
             torch.randint(0, 2, (1024, 4 * m), generator=g).float() * float("inf")]
    cases[3][::3] = -0.0                                                    # inf, signed zeros
    nan = torch.rand(256, 64, generator=g)
    nan[3, 5] = float("nan")
    for sc in cases + [nan]:
        assert torch.equal(nm_mask(sc, n, m), _nm_by_sort(sc, n, m)), (tuple(sc.shape), n, m)


def test_finite_check_by_sum_agrees_with_the_entrywise_test():
    from stun_exp.errors import DataError
    from stun_exp.pruning.weights.engine import check_finite
    big = torch.full((4, 4), 3e38)                              # finite entries, the sum overflows
    for t in (torch.randn(64, 8), big, torch.full((4, 4), 6e4, dtype=torch.float16), torch.empty(0)):
        check_finite(t, "x")
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.randn(64, 8).to(dtype)
            t[5, 3] = bad
            with pytest.raises(DataError, match="non-finite"):
                check_finite(t, "x")
    t = torch.tensor([float("inf"), -float("inf")])            # a sum of NaN from two infinities
    with pytest.raises(DataError):
        check_finite(t, "x")


def _plain_sparsegpt(w, h, s, nm, bs, percdamp=0.01):
    """One matrix, the reference's loop, sort-based block threshold."""
    w, h = w.float().clone(), h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diagonal(h)) * torch.eye(h.shape[0])
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], bs):
        i2 = min(i1 + bs, w.shape[1])
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        m1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None and s > 0:
            sc = w1 ** 2 / d[None] ** 2
            m1 = sc <= torch.sort(sc.flatten()).values[int(sc.numel() * s)]
        err1 = torch.zeros_like(w1)
        for c in range(i2 - i1):
            if nm is not None and c % nm[1] == 0:
                m1[:, c:c + nm[1]] |= nm_mask(w1[:, c:c + nm[1]] ** 2 / d[c:c + nm[1]][None] ** 2, *nm)
            col = w1[:, c]
            q = col.masked_fill(m1[:, c], 0.0)
            err = (col - q) / d[c]
            w1[:, c:] -= err[:, None] * u1[c, c:][None]
            w1[:, c] = q
            err1[:, c] = err
        w[:, i1:i2], mask[:, i1:i2] = w1, m1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w, mask


@pytest.mark.parametrize("s,nm", [(0.0, None), (0.5, None), (0.7, None), (0.5, (2, 4))])
def test_stacked_sparsegpt_equals_the_plain_loop(s, nm):
    g = torch.Generator().manual_seed(1)
    items = []
    for shape in [(24, 32), (32, 24), (24, 32), (24, 32)]:
        x = torch.randn(100, shape[1], generator=g) * torch.rand(shape[1], generator=g)
        x[:, 5] = 0
        items.append((torch.randn(*shape, generator=g), x.T @ x))
    got = sparsegpt_prune_many(items, s, nm, blocksize=8, max_numel=24 * 32 * 2)   # stacks of two
    for (w, h), (gw, gm) in zip(items, got):
        rw, rm = _plain_sparsegpt(w, h, s, nm, 8)
        assert torch.equal(gw, rw) and torch.equal(gm, rm)
        sw, sm = sparsegpt_prune(w, h, s, nm, 8)
        assert torch.equal(sw, rw) and torch.equal(sm, rm)


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("max_numel", [24 * 32 * 8, 24 * 32 * 3, 1])      # one stack; a pair split; singles
def test_shared_and_consumed_hessians_give_the_plain_loop(nm, max_numel):
    """Matrices passing the same Hessian tensor (an expert's gate and up) share one factor, also
    across stacks; consuming the Hessians (factor written into their memory) changes no bit."""
    g = torch.Generator().manual_seed(3)
    grams = []
    for _ in range(3):
        x = torch.randn(100, 32, generator=g) * torch.rand(32, generator=g)
        x[:, 7] = 0                                                          # a dead input
        grams.append(x.T @ x)
    stacked = torch.stack(grams)                                             # views, as the observer's
    ws = [torch.randn(24, 32, generator=g) for _ in range(6)]
    items = [(ws[i], stacked[i // 2]) for i in range(6)]                     # pairs share a Hessian
    ref = [_plain_sparsegpt(w, h.clone(), 0.5, nm, 8) for w, h in items]
    before = stacked.clone()
    kept = sparsegpt_prune_many(items, 0.5, nm, blocksize=8, max_numel=max_numel)
    assert torch.equal(stacked, before)                                      # not consumed: untouched
    used = sparsegpt_prune_many(items, 0.5, nm, blocksize=8, max_numel=max_numel, consume_hessians=True)
    assert not torch.equal(stacked, before)                                  # consumed: factors inside
    for (rw, rm), (kw, km), (uw, um) in zip(ref, kept, used):
        assert torch.equal(kw, rw) and torch.equal(km, rm)
        assert torch.equal(uw, rw) and torch.equal(um, rm)


FUSED = ["mixtral", "qwen3_moe", "deepseek_v2", "gpt_oss"]


@pytest.mark.parametrize("arch", FUSED)
def test_kept_hidden_rows_give_the_recomputed_statistics(arch, monkeypatch):
    model, x = tiny_model(arch), tiny_input(3, 12)
    ad = get_adapter(model)

    def observe():
        with O.ExpertObserver(ad, gram=True) as obs, torch.no_grad():
            y = model(input_ids=x).logits
        return obs, y
    fast, y_fast = observe()
    assert set(fast._rows_checked) == set(fast.stats)                   # every layer was checked
    assert any(fast._rows_checked.values())                             # and the fast path ran
    monkeypatch.setattr(O, "_ROW_ORDER", {})
    slow, y_slow = observe()
    assert not slow._rows_checked
    assert torch.equal(y_fast, y_slow)
    for l, st in fast.stats.items():
        for f in ("count", "coact", "gate_sum", "xsq", "hsq", "gxsq", "ghsq", "gram_x", "gram_h"):
            assert torch.equal(getattr(st, f), getattr(slow.stats[l], f)), (l, f)


def test_row_check_covers_every_routed_expert():
    """A fused kernel that rounds one row of a later expert differently is caught, not only the first."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 4, generator=g), torch.randn(3, 4, 5, generator=g)
    ids = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1]])
    hidden = lambda e, xs: xs @ w[e]
    rows = torch.empty(12, 5)
    for e in range(3):
        tok, pos = torch.where(ids == e)
        rows[tok * 2 + pos] = hidden(e, x[tok])
    assert O.rows_match(rows, x, ids, hidden)
    last = int(torch.where(ids.reshape(-1) == 2)[0][-1])
    rows[last, 3] = torch.nextafter(rows[last, 3], torch.tensor(float("inf")))
    assert not O.rows_match(rows, x, ids, hidden)


METHODS = [(partial(P.UnstructuredPruner, score="wanda"), {}), (partial(P.UnstructuredPruner, score=None, update="sparsegpt"), {}), (partial(P.UnstructuredPruner, score=None, update="sparsegpt"), {"nm": "2:4"}),
           (partial(P.UnstructuredPruner, score="wanda", allocation="owl"), dict(owl_m=2.0, owl_lambda=0.1)),
           (partial(P.UnstructuredPruner, score="moe_pruner"), dict(scope="experts", prune_router=False, prune_shared_experts=False,
                              prune_dense_mlp=False))]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("cls,kw", METHODS)
def test_pruned_weights_equal_with_and_without_the_fast_observer(arch, cls, kw, monkeypatch):
    def run():
        model = tiny_model(arch)
        ctx = RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model),
                         calib=tiny_input(4, 16), device=torch.device("cpu"))
        cls(name="x", **kw).prune(ctx, sparsity=0.5 if "nm" not in kw else None)
        return model.state_dict()
    fast = run()
    monkeypatch.setattr(O, "_ROW_ORDER", {})
    slow = run()
    for k in fast:
        assert torch.equal(fast[k], slow[k]), k
