"""Expert surgery: remove / merge / apply_plan, both semantics, exact save -> reload, clear errors."""
from __future__ import annotations

import time

import pytest
import torch

from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.models.loading import load_pretrained, save_pretrained
from stun_exp.models.surgery import apply_plan, merge_experts, remove_experts
from stun_exp.models.plan import ExpertPlan, LayerPlan
from tests.arctic_like import register_auto
from tests.tiny_models import ARCHS, tiny_input, tiny_model

register_auto()   # what trust_remote_code does for the real Arctic

RENORM_SOFTMAX = ["mixtral", "qwen3_moe", "granitemoe", "gpt_oss", "arctic"]
NON_RENORM_SOFTMAX = ["olmoe", "qwen3_moe_nonorm", "qwen2_moe", "deepseek_v2"]


def _keep(arch: str, n: int, i: int) -> list[int]:
    """Non-uniform keep lists per MoE layer; DeepSeek keeps 2 per routing group (n_group=2)."""
    if arch.startswith("deepseek"):
        return [0, 3, 5, 6]
    return [e for e in range(n) if e not in ({1} if i == 0 else {0, 2})]


def _logits(m, x) -> torch.Tensor:
    with torch.no_grad():
        return m(x).logits


def _roundtrip(m, tmp_path) -> torch.Tensor:
    save_pretrained(m, None, tmp_path / "ckpt")
    m2, tok = load_pretrained(str(tmp_path / "ckpt"))
    assert tok is None
    return m2


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_save_reload_identical(arch: str, tmp_path) -> None:
    m, x = tiny_model(arch), tiny_input()
    ad = get_adapter(m)
    before = {l: ad.num_experts(l) for l in ad.moe_layers}
    for i, l in enumerate(ad.moe_layers):
        remove_experts(ad, l, _keep(arch, before[l], i))
    y = _logits(m, x)
    assert torch.isfinite(y).all()
    counts = [ad.num_experts(l) for l in ad.moe_layers]
    assert counts == [len(_keep(arch, before[l], i)) for i, l in enumerate(ad.moe_layers)]
    assert [c for c in m.config.num_experts_per_layer if c is not None] == counts
    m2 = _roundtrip(m, tmp_path)
    assert [get_adapter(m2).num_experts(l) for l in ad.moe_layers] == counts
    assert torch.equal(_logits(m2, x), y)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_save_reload_identical(arch: str, tmp_path) -> None:
    m, x = tiny_model(arch), tiny_input()
    ad = get_adapter(m)
    l = ad.moe_layers[-1]
    n = ad.num_experts(l)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]] if n == 8 else [[0, 1], [2], [3]]
    weights = [[3.0, 1.0]] + [None] * (len(groups) - 1)
    orig = {e: {k: v.clone() for k, v in ad.expert(l, e).items()} for e in range(n)}
    router = ad.router_weight(l).clone()
    merge_experts(ad, l, groups, weights)
    assert ad.num_experts(l) == len(groups)
    for k in ("gate", "up", "down"):   # weighted average for group 0, uniform for group 1
        assert torch.allclose(ad.expert(l, 0)[k], 0.75 * orig[0][k] + 0.25 * orig[1][k], atol=1e-6)
        g1 = groups[1]
        assert torch.allclose(ad.expert(l, 1)[k], sum(orig[e][k] for e in g1) / len(g1), atol=1e-6)
    assert torch.allclose(ad.router_weight(l)[0], 0.75 * router[0] + 0.25 * router[1], atol=1e-6)
    y = _logits(m, x)
    assert torch.equal(_logits(_roundtrip(m, tmp_path), x), y)


def _last_layer_routes(m, ad, x) -> torch.Tensor:
    """Ids the LAST MoE layer routes each token to (captured from the router module's own output)."""
    l, got = ad.moe_layers[-1], {}

    def hook(mod, args):
        got["h"] = args[0]
    handle = ad.moe_block(l).register_forward_pre_hook(hook)
    with torch.no_grad():
        m(x)
        handle.remove()
        return ad.route(l, ad.router_logits(l, got["h"]))[0]


@pytest.mark.parametrize("arch", RENORM_SOFTMAX)
def test_renormalised_untouched_tokens_keep_logits(arch: str) -> None:
    m, x = tiny_model(arch), tiny_input(4, 8)
    ad = get_adapter(m)
    l = ad.moe_layers[-1]
    y0, ids = _logits(m, x).reshape(-1, 64), _last_layer_routes(m, ad, x)
    drop = [1, 2] if ad.num_experts(l) == 8 else [1]
    untouched = ~torch.isin(ids, torch.tensor(drop)).any(-1)
    assert 0 < untouched.sum() < len(untouched)
    remove_experts(ad, l, [e for e in range(ad.num_experts(l)) if e not in drop])
    y1 = _logits(m, x).reshape(-1, 64)
    assert (y1[untouched] - y0[untouched]).abs().max() <= 1e-5
    assert (y1[~untouched] - y0[~untouched]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", NON_RENORM_SOFTMAX)
def test_non_renormalised_softmax_documented_exception(arch: str) -> None:
    """slice_router changes the softmax denominator: even untouched tokens move (documented)."""
    m, x = tiny_model(arch), tiny_input(4, 8)
    ad = get_adapter(m)
    l = ad.moe_layers[-1]
    y0, ids = _logits(m, x).reshape(-1, 64), _last_layer_routes(m, ad, x)
    keep = [2, 3, 6, 7] if arch.startswith("deepseek") else [0, 3, 4, 5, 6, 7]   # DeepSeek: 2 per group
    drop = [e for e in range(8) if e not in keep]
    untouched = ~torch.isin(ids, torch.tensor(drop)).any(-1)
    assert untouched.sum() > 0
    remove_experts(ad, l, keep)
    y1 = _logits(m, x).reshape(-1, 64)
    assert (y1[untouched] - y0[untouched]).abs().max() > 1e-5


@pytest.mark.parametrize("arch", RENORM_SOFTMAX + NON_RENORM_SOFTMAX)
def test_drop_mask_equals_slicing(arch: str) -> None:
    """moe_forward(drop=...) on the full layer == the sliced layer (softmax routers)."""
    m = tiny_model(arch)
    ad, h = get_adapter(m), torch.randn(24, 32)
    l = ad.moe_layers[-1]
    n = ad.num_experts(l)
    drop = [0, 1, 4, 5] if arch.startswith("deepseek") else [1]
    keep = [e for e in range(n) if e not in drop]
    if arch.startswith("deepseek"):
        ad.router(l).topk_method = "greedy"   # group membership changes under slicing; test plain top-k
    with torch.no_grad():
        masked = ad.moe_forward(l, h, drop=drop)
        remove_experts(ad, l, keep)
        assert torch.allclose(ad.moe_forward(l, h), masked, atol=1e-6)


def _naive_block_with_zeroed(ad, l: int, h: torch.Tensor, pruned: list[int]) -> torch.Tensor:
    """Original routing; pruned experts' outputs masked to zero; no renormalisation."""
    ids, w = ad.route(l, ad.router_logits(l, h))
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e not in pruned:
                out[t] += w[t, j] * ad.expert_output(l, e, ad.expert_hidden(l, e, h[t:t + 1]))[0]
    shared = ad.shared_output(l, h)
    return out if shared is None else out + shared


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_output_equals_masking_and_reloads(arch: str, tmp_path) -> None:
    m, x = tiny_model(arch), tiny_input()
    ad, h = get_adapter(m), torch.randn(12, 32)
    l = ad.moe_layers[-1]
    pruned = [1, 3]
    with torch.no_grad():
        ref = _naive_block_with_zeroed(ad, l, h, pruned)
        remove_experts(ad, l, [e for e in range(ad.num_experts(l)) if e not in pruned], semantics="zero_output")
        assert ad.num_experts(l) in (4, 8) and ad.pruned_experts(l) == pruned
        assert torch.allclose(ad.moe_forward(l, h), ref, atol=1e-5)
    y = _logits(m, x)
    from transformers import AutoModelForCausalLM   # zero_output needs no special loader
    save_pretrained(m, None, tmp_path / "z")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "z").eval()
    assert torch.equal(_logits(m2, x), y)
    assert m2.config.pruned_experts_per_layer == {str(l): pruned}


def test_apply_plan_slice_and_zero_output(tmp_path) -> None:
    for removal in ("slice_router", "zero_output"):
        m, x = tiny_model("mixtral"), tiny_input()
        ad = get_adapter(m)
        orig = {e: {k: v.clone() for k, v in ad.expert(1, e).items()} for e in range(8)}
        plan = ExpertPlan("test", 16, {1: LayerPlan([[0, 4], [1], [2, 3, 7]], [4, 1, None])}, removal=removal)
        apply_plan(ad, plan)
        avg = {k: (orig[2][k] + orig[3][k] + orig[7][k]) / 3 for k in ("gate", "up", "down")}
        if removal == "slice_router":
            assert ad.num_experts(1) == 3 and ad.num_experts(0) == 8
            assert all(torch.equal(ad.expert(1, 0)[k], orig[4][k]) for k in avg)
            assert all(torch.equal(ad.expert(1, 1)[k], orig[1][k]) for k in avg)
            assert all(torch.allclose(ad.expert(1, 2)[k], avg[k], atol=1e-6) for k in avg)
        else:
            assert ad.num_experts(1) == 8 and ad.pruned_experts(1) == [0, 5, 6]
            assert all(torch.equal(ad.expert(1, 4)[k], orig[4][k]) for k in avg)
            assert all(ad.expert(1, 0)[k].abs().sum() == 0 for k in avg)
            assert all(torch.allclose(ad.expert(1, e)[k], avg[k], atol=1e-6) for e in (2, 3, 7) for k in avg)
        y = _logits(m, x)
        assert torch.equal(_logits(_roundtrip(m, tmp_path / removal), x), y)


def test_surgery_errors() -> None:
    m = tiny_model("mixtral")
    ad = get_adapter(m)
    with pytest.raises(ConfigError, match="top_k"):
        remove_experts(ad, 0, [3])
    with pytest.raises(ConfigError, match=r"\[0, 8\)"):
        remove_experts(ad, 0, [0, 9])
    with pytest.raises(ConfigError, match="slice_router"):
        remove_experts(ad, 0, [0, 1], semantics="renormalise")
    ds = get_adapter(tiny_model("deepseek_v3"))
    with pytest.raises(ConfigError, match="n_group"):
        remove_experts(ds, 1, [0, 1, 2, 4, 5])          # 3 + 2 experts in the 2 routing groups
    with pytest.raises(ConfigError, match="routing group"):
        merge_experts(ds, 1, [[3, 4], [0], [1], [5]])   # a merge across groups
    remove_experts(ds, 1, [7, 0, 5, 2])                 # 2 per group: survivors ordered by group
    assert ds.num_experts(1) == 4


def test_plain_auto_loader_uniform_yes_nonuniform_no(tmp_path) -> None:
    from transformers import AutoModelForCausalLM
    m, x = tiny_model("qwen3_moe"), tiny_input()
    ad = get_adapter(m)
    for l in ad.moe_layers:
        remove_experts(ad, l, [0, 2, 4, 6])
    save_pretrained(m, None, tmp_path / "u")
    assert m.config.num_experts == 4
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "u"), x), _logits(m, x))
    remove_experts(ad, 1, [0, 1, 2])
    save_pretrained(m, None, tmp_path / "u")          # atomic overwrite of an existing folder
    with pytest.raises(Exception):  # noqa: B017 — any loader error: stock loaders cannot read per-layer counts
        AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    m2, _ = load_pretrained(str(tmp_path / "u"))
    assert torch.equal(_logits(m2, x), _logits(m, x))
    from stun_exp.models.adapter import model_info_from_config
    from stun_exp.models.loading import config_for
    assert model_info_from_config(config_for(str(tmp_path / "u"))).experts_per_layer == {0: 4, 1: 3}


def test_uncached_hub_id_fails_fast(monkeypatch) -> None:
    from stun_exp.models.loading import config_for
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ConfigError, match="huggingface-cli download"):
        load_pretrained("no-such-org/no-such-moe-model")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        config_for("no-such-org/no-such-moe-model")
    with pytest.raises(ConfigError, match="no such directory"):
        config_for("/no/such/dir")
    assert time.time() - t < 2.0


def test_arctic_remote_code_pruned_roundtrip(tmp_path) -> None:
    """The stand-in saved WITH its code reloads via trust_remote_code, per-layer counts included."""
    from tests.tiny_models import save_tiny_checkpoint
    src = save_tiny_checkpoint("arctic", str(tmp_path / "src"))
    m, _ = load_pretrained(src, trust_remote_code=True)
    assert type(m).__module__.startswith("transformers_modules")
    ad, x = get_adapter(m), tiny_input()
    remove_experts(ad, 0, [0, 2, 3])
    merge_experts(ad, 1, [[0, 1], [2, 3]])
    y = _logits(m, x)
    save_pretrained(m, None, tmp_path / "pruned")
    m2, _ = load_pretrained(str(tmp_path / "pruned"), trust_remote_code=True)
    assert [get_adapter(m2).num_experts(l) for l in (0, 1)] == [3, 2]
    assert torch.equal(_logits(m2, x), y)


def test_deepseek_v3_nonuniform_groups_reload(tmp_path) -> None:
    """Group routing survives per-layer counts: 2+2 and 3+3 experts per routing group."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from tests.tiny_models import COMMON
    cfg = DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=24, moe_intermediate_size=16,
                           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                           n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                           kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                           v_head_dim=8, head_dim=4)
    m, x = DeepseekV3ForCausalLM(cfg).eval(), tiny_input()
    ad = get_adapter(m)
    remove_experts(ad, 1, [0, 1, 4, 5])
    remove_experts(ad, 2, [0, 1, 2, 4, 5, 6])
    assert m.config.num_experts_per_layer == [None, 4, 6]
    assert torch.equal(_logits(_roundtrip(m, tmp_path), x), _logits(m, x))
