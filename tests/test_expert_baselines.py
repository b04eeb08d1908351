"""Frequency / routing-score / random / router-change baselines and the shared selection rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stun_exp.context import RunContext
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.models.surgery import apply_plan
from stun_exp.observe.observer import ExpertObserver
from stun_exp.pruning.expert import baselines as B
from stun_exp.pruning.expert.configs import FrequencyConfig
from stun_exp.pruning.expert.router_change import RouterChangePruner, router_delta
from stun_exp.pruning.expert.selection import keep_global, keep_layerwise, n_removed
from tests.tiny_models import tiny_input, tiny_model


def ctx_for(model, calib=None):
    return RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model),
                      calib=tiny_input(4, 8) if calib is None else calib, device=torch.device("cpu"))


# ---- selection rules -------------------------------------------------------------------------------
def test_rounding_half_up():
    assert [n_removed(s, 8) for s in (0.0, 0.1, 0.25, 0.3, 0.5, 0.3125)] == [0, 1, 2, 2, 4, 3]
    assert n_removed(0.3, 10) == 3 and n_removed(0.05, 10) == 1


def test_layerwise_ties_drop_lower_id_and_top_k_guard():
    assert keep_layerwise([3, 1, 1, 2], 0.5, 2) == [0, 3]
    with pytest.raises(ValueError, match="top_k"):
        keep_layerwise([3, 1, 1, 2], 0.75, 2)


def test_global_keeps_top_k_per_layer():
    scores = {0: [0.1, 0.2, 0.3, 0.9], 1: [0.5, 0.6, 0.7, 0.8]}
    # 3 of 8 removed: the three lowest are all in layer 0, but layer 0 must keep 2 -> skip 0.3, take 0.5
    assert keep_global(scores, 0.375, 2) == {0: [2, 3], 1: [1, 2, 3]}


def test_sparsity_validation_needs_top_k():
    info = get_adapter(tiny_model("mixtral")).model_info()
    with pytest.raises(ConfigError, match="top_k=2"):
        FrequencyConfig(expert_sparsity=0.9).validate(info)
    with pytest.raises(ConfigError, match="scope"):
        FrequencyConfig(scope="model").validate(info)
    FrequencyConfig(expert_sparsity=0.75).validate(info)


# ---- scores on hand-built statistics -----------------------------------------------------------------
def test_routing_score_variants():
    gate_sum = torch.tensor([2.0, 0.0, 3.0, 1.0])
    count = torch.tensor([4, 0, 3, 1])
    assert B.frequency_scores(count, 10).tolist() == pytest.approx([0.4, 0.0, 0.3, 0.1])
    assert B.routing_scores("soft_topk_mean", gate_sum=gate_sum, tokens=10).tolist() == \
        pytest.approx([0.2, 0.0, 0.3, 0.1])
    assert B.routing_scores("conditional_mean", gate_sum=gate_sum, count=count).tolist() == \
        pytest.approx([0.5, 0.0, 1.0, 1.0])
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    p1 = np.exp(2) / (np.exp(2) + 3)
    want = [(0.25 + p1) / 2] + [(0.25 + (1 - p1) / 3) / 2] * 3
    assert B.routing_scores("soft_full_mean", logits=logits).tolist() == pytest.approx(want)
    # the three variants rank differently: kept sets at 50 %
    assert keep_layerwise(B.routing_scores("conditional_mean", gate_sum=gate_sum, count=count), 0.5, 2) == [2, 3]
    assert keep_layerwise(B.routing_scores("soft_topk_mean", gate_sum=gate_sum, tokens=10), 0.5, 2) == [0, 2]


def test_random_is_seeded_permutation():
    n = {0: 8, 1: 8}
    keep = B.select(B.random_scores(n, 3, "layer", 0.25), 0.25, 2, "layer")
    rng = np.random.default_rng(3)
    for l in (0, 1):
        drop = rng.permutation(8)[:2].tolist()
        assert keep[l] == sorted(set(range(8)) - set(drop))
    assert keep == B.select(B.random_scores(n, 3, "layer", 0.25), 0.25, 2, "layer")
    assert keep != B.select(B.random_scores(n, 4, "layer", 0.25), 0.25, 2, "layer")


# ---- pruners on the tiny Mixtral -----------------------------------------------------------------------
def test_frequency_and_routing_score_plans_match_observer_counts():
    model = tiny_model("mixtral")
    ctx = ctx_for(model)
    a = ctx.adapter
    with ExpertObserver(a, keep_logits=True) as obs, torch.no_grad():
        model(input_ids=ctx.calib)
    plan = B.FrequencyPruner(expert_sparsity=0.25, calib_batch_size=2).plan(ctx)
    assert ctx.counters.full_model_forwards == 2
    for l in a.moe_layers:
        c = obs.stats[l].count.tolist()
        want = sorted(sorted(range(8), key=lambda e: (c[e], e))[2:])
        assert plan.layers[l].kept == want
    plan = B.RoutingScorePruner(expert_sparsity=0.5, variant="soft_full_mean").plan(ctx)
    for l in a.moe_layers:
        p = torch.softmax(obs.stats[l].logits.double(), -1).mean(0).tolist()
        assert plan.layers[l].kept == sorted(sorted(range(8), key=lambda e: (p[e], e))[4:])
    apply_plan(a, plan)
    assert [a.num_experts(l) for l in a.moe_layers] == [4, 4]


def test_router_change_hand_built(tmp_path):
    model = tiny_model("mixtral")
    a = get_adapter(model)
    scale = torch.tensor([1.5, 0.5, 1.2, 0.9, 2.0, 1.0, 0.7, 1.15])
    pre = {}
    with torch.no_grad():
        for l in a.moe_layers:
            p = torch.randn(8, 32)
            p = p / p.norm(dim=1, keepdim=True)
            pre[l] = p.clone()
            a.router_weight(l).copy_(p * scale[:, None])          # Δ_norm = s - 1, ‖w_T - w_0‖ = |s - 1|
    path = tmp_path / "pre.pt"
    torch.save({str(l): w for l, w in pre.items()}, path)
    ctx = ctx_for(model)
    plan = RouterChangePruner(pretrained_path=str(path)).plan(ctx)
    assert plan.removal == "zero_output" and ctx.counters.full_model_forwards == 0
    assert all(plan.layers[l].kept == [0, 2, 3, 4, 5, 7] for l in a.moe_layers)   # drop Δ=-0.5, -0.3
    plan = RouterChangePruner(pretrained_path=str(path), delta="diff_norm", removal="slice_router").plan(ctx)
    assert all(plan.layers[l].kept == [0, 1, 2, 4, 6, 7] for l in a.moe_layers)   # drop |Δ|=0, 0.1
    assert router_delta(pre[0] * 2, pre[0]).tolist() == pytest.approx([1.0] * 8)
    torch.save({str(l): w[:, :16] for l, w in pre.items()}, path)
    with pytest.raises(ConfigError, match="same architecture"):
        RouterChangePruner(pretrained_path=str(path)).plan(ctx)
    with pytest.raises(ConfigError, match="pretrained_path"):
        RouterChangePruner().plan(ctx)


def test_grouped_selection_balances_routing_groups():
    from stun_exp.pruning.expert.selection import keep_grouped, select
    scores = [0.1, 0.2, 0.9, 0.8, 0.05, 0.7, 0.6, 0.5]             # groups {0..3}, {4..7}
    assert keep_grouped(scores, 0.5, 2, 2) == [2, 3, 5, 6]          # 2 lowest inside each group
    with pytest.raises(ConfigError, match="divisible"):
        keep_grouped(scores, 0.125, 2, 2)
    with pytest.raises(ConfigError, match="scope"):
        select({0: scores}, 0.5, 2, "global", {0: 2})


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "gpt_oss", "arctic"])
def test_pruners_apply_on_other_architectures(arch):
    from stun_exp.pruning.expert.lu import LuCombinatorialPruner
    from stun_exp.pruning.expert.stun import StunPruner
    for make in (lambda: StunPruner(expert_sparsity=0.25), lambda: B.FrequencyPruner(expert_sparsity=0.5),
                 lambda: LuCombinatorialPruner(expert_sparsity=0.5)):
        model = tiny_model(arch)
        ctx = ctx_for(model)
        plan = make().plan(ctx)
        apply_plan(ctx.adapter, plan)
        assert [ctx.adapter.num_experts(l) for l in ctx.adapter.moe_layers] == \
            [len(plan.layers[l].groups) for l in ctx.adapter.moe_layers]
        with torch.no_grad():
            assert torch.isfinite(model(tiny_input(1, 8)).logits).all()
