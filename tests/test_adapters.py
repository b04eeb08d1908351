"""MoE adapter: routing equals the model's own router, views write through, targets, info, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter, model_info_from_config
from tests.tiny_models import ARCHS, tiny_input, tiny_model


def _h(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def _naive_softmax_renorm(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.softmax(logits.float(), -1)
    w, ids = p.topk(k, -1)
    return ids, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_route_matches_model_router(arch: str) -> None:
    m = tiny_model(arch)
    ad = get_adapter(m)
    if arch == "phimoe":   # widen sparsemixer's threshold so that it actually masks experts
        for l in ad.moe_layers:
            ad.router(l).router_jitter_noise = 0.3
    h = _h()
    with torch.no_grad():
        for l in ad.moe_layers:
            logits = ad.router_logits(l, h)
            ids, w = ad.route(l, logits)
            assert ids.shape == w.shape == (h.shape[0], ad.top_k) and w.dtype == torch.float32
            out = ad.router(l)(h)
            if isinstance(out, tuple):          # transformers routers return (logits, weights, ids)
                assert torch.equal(out[0], logits)
                assert torch.equal(ids, out[2]) and torch.equal(w, out[1].float())
            else:                               # Arctic stand-in: Linear gate, softmax-topk-renorm rule
                nid, nw = _naive_softmax_renorm(logits, ad.top_k)
                assert torch.equal(ids, nid) and torch.allclose(w, nw, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_forward_matches_block(arch: str) -> None:
    m = tiny_model(arch)
    ad = get_adapter(m)
    h = _h(16)
    with torch.no_grad():
        for l in ad.moe_layers:
            blk = ad.moe_block(l)(h[None])
            blk = blk[0] if isinstance(blk, tuple) else blk
            assert torch.allclose(ad.moe_forward(l, h), blk[0], atol=1e-6)


def _naive_expert(arch: str, ad, l: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert output computed from the raw storage, independent of the adapter's views."""
    ex = ad.experts(l)
    if arch == "arctic":
        m = ex[e]
        return (F.silu(x @ m.w1.weight.T) * (x @ m.w3.weight.T)) @ m.w2.weight.T
    if arch == "gpt_oss":
        gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        g, u = gu[:, ::2].clamp(max=ex.limit), gu[:, 1::2].clamp(-ex.limit, ex.limit)
        return ((u + 1) * g * torch.sigmoid(g * ex.alpha)) @ ex.down_proj[e] + ex.down_proj_bias[e]
    i = ex.gate_up_proj.shape[1] // 2
    gu = x @ ex.gate_up_proj[e].T
    return (F.silu(gu[:, :i]) * gu[:, i:]) @ ex.down_proj[e].T


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_views_shapes_and_math(arch: str) -> None:
    m = tiny_model(arch)
    ad = get_adapter(m)
    l, x = ad.moe_layers[-1], _h(5)
    with torch.no_grad():
        for e in range(ad.num_experts(l)):
            v = ad.expert(l, e)
            inter = v["gate"].shape[0]
            assert v["gate"].shape == v["up"].shape == (inter, 32) and v["down"].shape == (32, inter)
            y = ad.expert_output(l, e, ad.expert_hidden(l, e, x))
            assert torch.allclose(y, _naive_expert(arch, ad, l, e, x), atol=1e-5)
            if arch not in ("gpt_oss",):   # plain SiLU-GLU: the views alone reproduce the expert
                ref = (F.silu(x @ v["gate"].T) * (x @ v["up"].T)) @ v["down"].T
                assert torch.allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "arctic"])   # fused, transposed-interleaved, ModuleList
def test_expert_views_write_through(arch: str) -> None:
    m = tiny_model(arch)
    ad = get_adapter(m)
    x = tiny_input()
    with torch.no_grad():
        y0 = m(x).logits.clone()
        l = ad.moe_layers[-1]
        for e in range(ad.num_experts(l)):       # every expert, so some routed token is affected
            for w in ad.expert(l, e).values():
                w.mul_(0.5)
        y1 = m(x).logits
        assert (y1 - y0).abs().max() > 1e-4
        # set_expert copies back into the storage
        v = {k: t.clone() * 2.0 for k, t in ad.expert(l, 0).items()}
        ad.set_expert(l, 0, **v)
        for k, t in ad.expert(l, 0).items():
            assert torch.equal(t, v[k])


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_targets_and_info(arch: str) -> None:
    m = tiny_model(arch)
    ad = get_adapter(m)
    info = ad.model_info()
    cfg_info = model_info_from_config(m.config)
    assert cfg_info.moe_layers == info.moe_layers == ad.moe_layers
    assert cfg_info.experts_per_layer == info.experts_per_layer
    assert cfg_info.top_k == info.top_k == ad.top_k == 2
    for l in range(len(ad.layers)):
        ts = ad.linear_targets(l)
        kinds = [t.kind for t in ts]
        assert kinds.count("attention") >= 4
        assert all(t.weight.dim() == 2 for t in ts)
        if l not in ad.moe_layers:
            assert kinds.count("dense_mlp") == 3 and "expert" not in kinds
            continue
        assert kinds.count("router") == 1
        assert kinds.count("expert") == 3 * ad.num_experts(l)
        shared = {"qwen2_moe": 4, "deepseek_v2": 3, "deepseek_v3": 3}.get(arch, 0)   # Qwen2: MLP + its gate
        assert kinds.count("shared_expert") == shared
        assert kinds.count("dense_mlp") == (3 if arch == "arctic" else 0)
        ex = [t for t in ts if t.kind == "expert" and t.expert == 1 and t.matrix == "down"][0]
        assert ex.weight.data_ptr() == ad.expert(l, 1)["down"].data_ptr()


def test_unknown_arch_names_supported_and_where_to_add() -> None:
    class FooForCausalLM(nn.Module):
        config = None

    with pytest.raises(ConfigError) as ei:
        get_adapter(FooForCausalLM())
    msg = str(ei.value)
    assert "MixtralForCausalLM" in msg and "ArcticForCausalLM" in msg and "arch_table.py" in msg

    from transformers import LlamaConfig
    unknown_moe = LlamaConfig(num_hidden_layers=2, hidden_size=32)
    unknown_moe.num_local_experts = 8                 # an MoE config of a class we have no entry for
    with pytest.raises(ConfigError, match="arch_table.py"):
        model_info_from_config(unknown_moe)
    dense = model_info_from_config(LlamaConfig(num_hidden_layers=2, hidden_size=32))
    assert dense.moe_layers == [] and dense.top_k == 0 and dense.num_layers == 2


def test_model_info_from_config_without_weights() -> None:
    from transformers import DeepseekV3Config
    cfg = DeepseekV3Config(num_hidden_layers=5, first_k_dense_replace=2, n_routed_experts=16,
                           num_experts_per_tok=4, n_group=4, topk_group=2, hidden_size=64)
    info = model_info_from_config(cfg)
    assert info.arch == "deepseek_v3" and info.moe_layers == [2, 3, 4]
    assert info.experts_per_layer == {2: 16, 3: 16, 4: 16} and info.top_k == 4 and info.n_group == 4
    cfg.num_experts_per_layer = [None, None, 12, 8, 16]
    assert model_info_from_config(cfg).experts_per_layer == {2: 12, 3: 8, 4: 16}


def test_arctic_layout_with_dense_layers() -> None:
    """Arctic: (i+1) % moe_layer_frequency selects MoE layers; others hold block_sparse_moe.mlp."""
    from tests.arctic_like import ArcticConfig, ArcticForCausalLM
    m = ArcticForCausalLM(ArcticConfig(num_hidden_layers=4, moe_layer_frequency=2)).eval()
    ad = get_adapter(m)
    assert ad.moe_layers == [1, 3] == model_info_from_config(m.config).moe_layers
    kinds = [t.kind for t in ad.linear_targets(0)]
    assert kinds.count("dense_mlp") == 3 and "router" not in kinds
    kinds = [t.kind for t in ad.linear_targets(1)]
    assert kinds.count("dense_mlp") == 3 and kinds.count("expert") == 12   # residual_mlp + 4 experts
