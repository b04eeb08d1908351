"""STUN on a tiny Mixtral with planted groups of near-identical experts; config validation."""
from __future__ import annotations

import pytest
import torch

from stun_exp.context import RunContext
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.models.surgery import apply_plan
from stun_exp.pruning.expert.configs import StunConfig
from stun_exp.pruning.expert.stun import StunPruner
from tests.tiny_models import tiny_input, tiny_model

# layer -> planted groups (the model has 8 experts per layer, top-2)
PLANTED = {0: [[0, 3, 5], [1, 6], [2], [4], [7]], 1: [[0, 1], [2, 3], [4, 5], [6, 7]]}
TARGET = sum(len(g) for g in PLANTED.values())                  # 9 of 16


def planted_model():
    """Members of a group: router rows and expert weights = the group's base + tiny noise."""
    model = tiny_model("mixtral")
    a = get_adapter(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for l, groups in PLANTED.items():
            w = a.router_weight(l)
            for grp in groups:
                base_row = torch.randn(w.shape[1], generator=g)
                base = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in a.expert(l, grp[0]).items()}
                for e in grp:
                    w[e] = base_row + 1e-3 * torch.randn(w.shape[1], generator=g)
                    a.set_expert(l, e, **{k: b + 1e-3 * torch.randn(b.shape, generator=g)
                                          for k, b in base.items()})
    return model, a


def ctx_for(model, a) -> RunContext:
    return RunContext(cfg=None, model=model, tokenizer=None, adapter=a, calib=tiny_input(4, 8),
                      device=torch.device("cpu"))


def naive_representative(a, l, members):
    flat = {e: torch.cat([a.expert(l, e)[k].flatten().double() for k in ("gate", "up", "down")])
            for e in members}
    mean = torch.stack(list(flat.values())).mean(0)
    return min(members, key=lambda e: (float((flat[e] - mean).norm()), e))


@pytest.mark.parametrize("how", [{"target_experts": TARGET}, {"expert_sparsity": 7 / 16}])
def test_router_mode_keeps_one_expert_per_planted_group(how):
    model, a = planted_model()
    ctx = ctx_for(model, a)
    plan = StunPruner(**how).plan(ctx)
    assert plan.experts_after == TARGET and plan.meta["search"]["hit"]
    for l, groups in PLANTED.items():
        assert plan.layers[l].groups == groups
        assert plan.layers[l].representatives == [naive_representative(a, l, g) for g in groups]
    assert ctx.counters.full_model_forwards == 0 and ctx.counters.moe_block_forwards == 0
    rows = {l: a.router_weight(l)[plan.layers[l].representatives].clone() for l in PLANTED}
    apply_plan(a, plan)
    for l, groups in PLANTED.items():
        assert a.num_experts(l) == len(groups)
        assert torch.equal(a.router_weight(l), rows[l])
    model(tiny_input(1, 8))                                       # still runs


def test_coactivation_file_and_reconstruction(tmp_path):
    model, a = planted_model()
    coact = {}
    for l, groups in PLANTED.items():                            # members co-fire a lot
        c = torch.ones(8, 8)
        for grp in groups:
            for i in grp:
                for j in grp:
                    c[i, j] = 50.0
        c.fill_diagonal_(0.0)
        coact[str(l)] = c
    path = tmp_path / "coact.pt"
    torch.save(coact, path)
    ctx = ctx_for(model, a)
    plan = StunPruner(distance="coactivation", coactivation_path=str(path), target_experts=TARGET,
                      reconstruct_max_clusters=4).plan(ctx)
    assert ctx.counters.full_model_forwards == 0
    assert plan.layers[0].groups == PLANTED[0] and plan.layers[1].groups == PLANTED[1]
    assert plan.meta["search"]["threshold"] < 0                  # co-activation distances are <= 0
    assert plan.layers[0].representatives == [naive_representative(a, 0, g) for g in PLANTED[0]]
    assert plan.layers[1].representatives == [None] * 4        # 4 clusters <= 4: averaged


def test_single_pass_default_merges_closest_pair_per_layer():
    model, a = planted_model()
    plan = StunPruner().plan(ctx_for(model, a))                  # τ = inf, one merge per layer
    assert plan.experts_after == 14
    for l in PLANTED:
        merged = [g for g in plan.layers[l].groups if len(g) > 1]
        assert len(merged) == 1 and any(set(merged[0]) <= set(g) for g in PLANTED[l])


def test_unreachable_target_fallbacks():
    from stun_exp.pruning.expert import clustering as C
    model, a = planted_model()
    with torch.no_grad():
        a.router_weight(1).copy_(a.router_weight(0))            # both layers merge in lockstep: even totals
    plan = StunPruner(target_experts=13, search_fallback="nearest").plan(ctx_for(model, a))
    s = plan.meta["search"]
    assert not s["hit"] and s["stop_reason"] in ("stalled", "step_underflow", "max_iters")
    assert plan.experts_after == s["achieved_experts"] == 14   # |14-13| = |12-13|: keep more
    assert plan.layers[0].groups == plan.layers[1].groups
    # trim (default): τ with total 12, undo the single largest-distance merge; the tie between the two
    # identical layers goes to the higher layer index (layer 0's merge sorts first and is kept).
    plan = StunPruner(target_experts=13).plan(ctx_for(model, a))
    s = plan.meta["search"]
    assert not s["hit"] and plan.experts_after == s["achieved_experts"] == 13 and s["merges_undone"] == 1
    d = C.router_distance(a.router_weight(0))
    log = C.greedy_merges(d, s["threshold"], 6)
    assert len(log) == 2                                          # total 12 = 2 x (8 - 2)
    assert plan.layers[0].groups == C.clusters_from_merges(8, log)
    assert plan.layers[1].groups == C.clusters_from_merges(8, log[:1])


def test_validation_errors():
    info = get_adapter(tiny_model("mixtral")).model_info()
    with pytest.raises(ConfigError, match="distance"):
        StunConfig(distance="cosine").validate(info)
    with pytest.raises(ConfigError, match="mix_weight"):
        StunConfig(distance="mixed").validate(info)
    with pytest.raises(ConfigError, match="between 14 and 16"):
        StunConfig(target_experts=12, max_merges_per_layer=1).validate(info)
    with pytest.raises(ConfigError, match="between 4 and 16"):
        StunConfig(target_experts=17).validate(info)
    with pytest.raises(ConfigError, match="expert_sparsity"):
        StunConfig(expert_sparsity=1.0).validate(info)
    with pytest.raises(ConfigError, match="target_experts"):
        StunConfig(expert_sparsity=0.25, target_experts=12).validate(info)
    StunConfig(expert_sparsity=0.25).validate(info)


def test_coactivation_live_pass_counts_and_matches_naive_top2_pairs():
    from stun_exp.pruning.expert import clustering as C
    model = tiny_model("mixtral")
    a = get_adapter(model)
    ctx = ctx_for(model, a)
    plan = StunPruner(distance="coactivation", expert_sparsity=0.25, calib_batch_size=2).plan(ctx)
    assert ctx.counters.full_model_forwards == 2 and ctx.counters.moe_block_forwards == 0
    logits = {l: [] for l in a.moe_layers}
    hooks = [a.router(l).register_forward_hook(lambda m, i, o, l=l: logits[l].append(
        (o[0] if isinstance(o, tuple) else o).detach())) for l in a.moe_layers]
    with torch.no_grad():
        model(input_ids=ctx.calib)
    for h in hooks:
        h.remove()
    tau = plan.meta["search"]["threshold"]
    for l in a.moe_layers:
        top2 = torch.softmax(torch.cat(logits[l]), -1).topk(2, dim=-1).indices
        c = torch.zeros(8, 8)
        for i, j in top2.tolist():
            c[i, j] += 1
            c[j, i] += 1
        want = C.greedy_clusters(C.coactivation_distance(c), tau, 6)
        assert plan.layers[l].groups == want
    assert plan.experts_after == plan.meta["search"]["achieved_experts"]
