"""ExpertObserver: stats equal a naive per-token loop; outputs unchanged; registry restored."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stun_exp.models.adapter import get_adapter
from stun_exp.models.surgery import remove_experts
from stun_exp.observe import ExpertObserver
from tests.tiny_models import ARCHS, tiny_input, tiny_model


def _block_inputs(m, ad, x) -> dict[int, torch.Tensor]:
    got, handles = {}, []
    for l in ad.moe_layers:
        def hook(mod, args, l=l):
            got[l] = args[0].reshape(-1, args[0].shape[-1]).clone()
        handles.append(ad.moe_block(l).register_forward_pre_hook(hook))
    with torch.no_grad():
        m(x)
    for h in handles:
        h.remove()
    return got


def _naive_hidden(arch: str, ex, e: int, x: torch.Tensor) -> torch.Tensor:
    """Input of expert e's down projection for ONE token x [H], from raw storage."""
    if arch == "arctic":
        return F.silu(ex[e].w1.weight @ x) * (ex[e].w3.weight @ x)
    if arch == "gpt_oss":
        gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        g, u = gu[::2].clamp(max=ex.limit), gu[1::2].clamp(-ex.limit, ex.limit)
        return (u + 1) * g * torch.sigmoid(g * ex.alpha)
    i = ex.gate_up_proj.shape[1] // 2
    gu = ex.gate_up_proj[e] @ x
    return F.silu(gu[:i]) * gu[i:]


def _model_routing(arch: str, ad, l: int, X: torch.Tensor):
    """(logits, ids, weights) as the model's own router module returns them."""
    out = ad.router(l)(X)
    if isinstance(out, tuple):
        return out[0].float(), out[2], out[1].float()
    p = torch.softmax(out.float(), -1)          # Arctic stand-in: softmax -> top-k -> renormalise
    w, ids = p.topk(ad.top_k, -1)
    return out.float(), ids, w / w.sum(-1, keepdim=True)


CASES = [(a, None) for a in ARCHS] + [("mixtral", "eager"), ("gpt_oss", "eager"), ("deepseek_v3", "eager")]


@pytest.mark.parametrize("arch,impl", CASES)
def test_stats_equal_naive_per_token_loop(arch: str, impl: str | None) -> None:
    """impl=None: the default grouped_mm computes outputs; "eager": the observer computes them."""
    m, x = tiny_model(arch), tiny_input(2, 6)
    if impl:
        m.set_experts_implementation(impl)
    ad = get_adapter(m)
    inputs = _block_inputs(m, ad, x)
    with torch.no_grad(), ExpertObserver(ad, gram=True) as obs:
        m(x)
    for l in ad.moe_layers:
        X = inputs[l].double()
        E, ex = ad.num_experts(l), ad.experts(l)
        with torch.no_grad():
            logits, ids, w = _model_routing(arch, ad, l, inputs[l])
        H, I = X.shape[1], ad.expert(l, 0)["gate"].shape[0]
        ref = {k: torch.zeros(E, d, dtype=torch.float64) for k, d in
               (("xsq", H), ("gxsq", H), ("hsq", I), ("ghsq", I))}
        gx, gh = torch.zeros(E, H, H, dtype=torch.float64), torch.zeros(E, I, I, dtype=torch.float64)
        count, coact, gsum = torch.zeros(E, dtype=torch.long), torch.zeros(E, E, dtype=torch.long), torch.zeros(E)
        for t in range(X.shape[0]):
            chosen = [int(e) for e in ids[t]]
            for a in chosen:
                for b in chosen:
                    coact[a, b] += int(a != b)
            for j, e in enumerate(chosen):
                g = float(w[t, j])
                with torch.no_grad():
                    h = _naive_hidden(arch, ex, e, inputs[l][t]).double()
                count[e] += 1
                gsum[e] += g
                ref["xsq"][e] += X[t] ** 2
                ref["gxsq"][e] += (g * X[t]) ** 2
                ref["hsq"][e] += h ** 2
                ref["ghsq"][e] += (g * h) ** 2
                gx[e] += torch.outer(X[t], X[t])
                gh[e] += torch.outer(h, h)
        st = obs.stats[l]
        assert st.tokens == X.shape[0] and st.logits_tokens == X.shape[0]
        assert torch.equal(st.count, count) and int(st.count.sum()) == X.shape[0] * ad.top_k
        assert torch.equal(st.coact, coact) and torch.equal(st.coact, st.coact.T)
        assert torch.allclose(st.gate_sum, gsum, atol=1e-5)
        assert torch.allclose(st.logits_sum.double(), logits.double().sum(0), atol=1e-4)
        assert torch.allclose(st.logits_sq.double(), logits.double().pow(2).sum(0), atol=1e-4)
        for k, v in ref.items():
            assert torch.allclose(getattr(st, k).double(), v, rtol=1e-4, atol=1e-6), k
        assert torch.allclose(st.gram_x.double(), gx, rtol=1e-4, atol=1e-6)
        assert torch.allclose(st.gram_h.double(), gh, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_unchanged_and_implementation_restored(arch: str) -> None:
    m, x = tiny_model(arch), tiny_input()
    ad = get_adapter(m)
    impl = m.config._experts_implementation
    with torch.no_grad():
        y0 = m(x).logits
        with ExpertObserver(ad, keep_logits=True) as obs:
            y1 = m(x).logits
        y2 = m(x).logits
    assert torch.equal(y1, y0) and torch.equal(y2, y0)
    assert m.config._experts_implementation == impl
    l = ad.moe_layers[0]
    assert obs.stats[l].logits.shape == (x.numel(), ad.num_experts(l))
    if arch != "arctic":   # the model's own router-logit outputs agree with the kept logits
        with torch.no_grad():
            rl = m(x, output_router_logits=True).router_logits
        assert torch.allclose(obs.stats[l].logits, rl[0].float(), atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_bf16_outputs_bit_identical(arch: str) -> None:
    m, x = tiny_model(arch).to(torch.bfloat16), tiny_input()
    ad = get_adapter(m)
    with torch.no_grad():
        y0 = m(x).logits
        with ExpertObserver(ad, layers=ad.moe_layers[-1:]):
            y1 = m(x).logits
    assert torch.equal(y0, y1)


def test_restored_after_exception_and_single_block_forward() -> None:
    m = tiny_model("qwen2_moe")
    ad = get_adapter(m)
    with pytest.raises(ZeroDivisionError):
        with ExpertObserver(ad):
            raise ZeroDivisionError
    assert m.config._experts_implementation == "grouped_mm"
    h = torch.randn(1, 10, 32)
    with torch.no_grad(), ExpertObserver(ad, layers=[1]) as obs:
        ad.moe_block(1)(h)           # a lone MoE block forward is observed too
        ad.moe_block(0)(h)           # a layer outside the set runs its previous implementation
    assert list(obs.stats) == [1] and obs.stats[1].tokens == 10


def test_zero_output_layer_observes_real_routing() -> None:
    m, x = tiny_model("mixtral"), tiny_input(4, 8)
    ad = get_adapter(m)
    remove_experts(ad, 1, [0, 2, 3, 4, 5, 6, 7], semantics="zero_output")
    with torch.no_grad(), ExpertObserver(ad) as obs:
        m(x)
    st = obs.stats[1]
    assert st.count[1] > 0                       # the router still sends tokens to expert 1 ...
    assert st.hsq[1].abs().sum() == 0 and st.xsq[1].sum() > 0   # ... whose h is exactly zero
    assert int(st.count.sum()) == x.numel() * 2


def test_modulelist_block_hook_counts_once() -> None:
    m, x = tiny_model("arctic"), tiny_input()
    ad = get_adapter(m)
    with torch.no_grad(), ExpertObserver(ad, layers=[0]) as obs:
        m(x)
    assert obs.stats[0].tokens == obs.stats[0].logits_tokens == x.numel()
    with pytest.raises(RuntimeError, match="keep_logits"):
        _ = obs.stats[0].logits
