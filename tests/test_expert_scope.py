"""``scope: layer`` keeps the same expert count in every MoE layer: STUN's per-layer τ rule, the others."""
from __future__ import annotations

import math

import pytest
import torch

from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.models.surgery import apply_plan
from stun_exp.pruning.expert import baselines as B
from stun_exp.pruning.expert import clustering as C
from stun_exp.pruning.expert.configs import StunConfig
from stun_exp.pruning.expert.counts import n_kept
from stun_exp.pruning.expert.lu import LuCombinatorialPruner
from stun_exp.pruning.expert.router_change import RouterChangePruner
from stun_exp.pruning.expert.stun import StunPruner
from stun_exp.pruning.expert.stun_layer import cell_clusters, layer_clusters
from tests.test_expert_baselines import ctx_for
from tests.tiny_models import ARCHS, tiny_input, tiny_model


def _counts(plan) -> dict[int, int]:
    return {l: len(lp.groups) for l, lp in plan.layers.items()}


# ---- the per-layer τ rule on hand-built distances ------------------------------------------------
def _two_pairs() -> torch.Tensor:
    """4 experts: (0,1) and (2,3) at distance 1, everything else at 5 -> counts jump 4 -> 2 at τ = 1."""
    d = torch.full((4, 4), 5.0)
    d[0, 1] = d[1, 0] = d[2, 3] = d[3, 2] = 1.0
    d.fill_diagonal_(math.inf)
    return d


def test_cell_hits_trims_and_stops_at_target():
    d = _two_pairs()
    cl, meta = cell_clusters(d, 2, 1, 0.5, 0.1, 100)                 # τ in (1, 5] gives 2 clusters
    assert cl == [[0, 1], [2, 3]] and meta["rule"] == "hit" and 1.0 < meta["threshold"] <= 5.0
    cl, meta = cell_clusters(d, 3, 1, 0.5, 0.1, 100)                 # no τ gives 3: trim from 2
    assert meta["rule"] == "trim" and meta["merges_undone"] == 1 and 1.0 < meta["threshold"] <= 5.0
    assert cl == [[0, 1], [2], [3]]                                   # the tie keeps the first merge
    cl, meta = cell_clusters(d, 3, 1, 0.5, 0.1, 1)                   # one trial, never below 3
    assert meta["rule"] == "stop_at_target" and cl == [[0, 1], [2], [3]]
    cl, meta = cell_clusters(d, 2, 2, 0.5, 0.1, 100)                 # floor 2: at most 2 merges
    assert cl == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="at least 2"):
        cell_clusters(d, 1, 2, 0.5, 0.1, 100)


def test_cell_matches_the_greedy_at_its_threshold():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=g)
    d = C.router_distance(w)
    for target in range(2, 8):
        cl, meta = cell_clusters(d, target, 2, 0.5, 0.1, 100)
        assert len(cl) == target
        if meta["rule"] == "hit":
            assert cl == C.greedy_clusters(d, meta["threshold"], 6)
        else:                                                         # a prefix of the greedy merge log
            log = C.greedy_merges(d, meta["threshold"], 6)
            assert cl == C.clusters_from_merges(8, log[:8 - target])


def test_grouped_layer_is_searched_per_routing_group():
    g = torch.Generator().manual_seed(4)
    d = C.router_distance(torch.randn(8, 16, generator=g))
    gid = torch.arange(8) // 4
    d = d.masked_fill(gid[:, None] != gid[None, :], math.inf)
    cl, meta = layer_clusters(d, 4, 2, 2, "top2sum", 0.5, 0.1, 100)
    assert [sum(1 for c in cl if c[0] // 4 == grp) for grp in (0, 1)] == [2, 2]
    assert all(len({e // 4 for e in c}) == 1 for c in cl)           # no cluster crosses a group
    left, _ = cell_clusters(d[:4, :4], 2, 2, 0.5, 0.1, 100)
    assert [c for c in cl if c[0] < 4] == left
    assert len(meta["groups"]) == 2


# ---- STUN scope=layer on tiny models ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_stun_layer_scope_keeps_exact_count_per_layer(arch):
    model = tiny_model(arch)
    ctx = ctx_for(model)
    a = ctx.adapter
    for s in (0.25, 0.5):
        try:
            StunConfig(expert_sparsity=s, scope="layer").validate(a.model_info())
        except ConfigError:
            continue
        plan = StunPruner(expert_sparsity=s, scope="layer", reconstruct_max_clusters=4).plan(ctx)
        want = {l: n_kept(s, a.num_experts(l)) for l in a.moe_layers}
        assert _counts(plan) == want
        assert plan.meta["scope"] == "layer" and set(plan.meta["search"]["per_layer"]) == {str(l) for l in want}
        assert plan.meta["search"]["achieved_experts"] == sum(want.values())
    m2 = tiny_model(arch)
    a2 = get_adapter(m2)
    plan = StunPruner(expert_sparsity=0.25, scope="layer").plan(ctx_for(m2))
    apply_plan(a2, plan)
    assert {l: a2.num_experts(l) for l in a2.moe_layers} == {l: n_kept(0.25, n) for l, n in
                                                            a.model_info().experts_per_layer.items()}
    with torch.no_grad():
        assert torch.isfinite(m2(tiny_input(1, 8)).logits).all()


def _uniform_cases():
    """(arch, seed, s) where the authors' global τ hits a total at which every layer has its count."""
    out = []
    for arch in ("mixtral", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "arctic"):
        for seed in range(4):
            ctx = ctx_for(tiny_model(arch, seed))
            for s in (0.25, 0.5):
                plan = StunPruner(expert_sparsity=s).plan(ctx)
                want = {l: n_kept(s, ctx.adapter.num_experts(l)) for l in ctx.adapter.moe_layers}
                if plan.meta["search"]["hit"] and _counts(plan) == want:
                    out.append((arch, seed, s, plan))
    return out


def test_layer_scope_equals_global_when_the_global_solution_is_uniform():
    cases = _uniform_cases()
    assert len(cases) >= 5, "too few uniform global solutions to compare"
    for arch, seed, s, glob in cases:
        layer = StunPruner(expert_sparsity=s, scope="layer").plan(ctx_for(tiny_model(arch, seed)))
        assert layer.to_dict()["layers"] == glob.to_dict()["layers"], (arch, seed, s)
        assert all(m["rule"] == "hit" and m["trials"] == 1 for m in layer.meta["search"]["per_layer"].values())


def test_layer_scope_reaches_counts_the_global_tau_misses():
    """A model whose global solution is not uniform still gets the per-layer count in every layer."""
    from tests.test_expert_stun import PLANTED, ctx_for as stun_ctx, planted_model
    model, a = planted_model()
    glob = StunPruner(target_experts=9).plan(stun_ctx(model, a))
    assert _counts(glob) == {l: len(g) for l, g in PLANTED.items()} == {0: 5, 1: 4}
    layer = StunPruner(expert_sparsity=0.5, scope="layer").plan(stun_ctx(model, a))
    assert _counts(layer) == {0: 4, 1: 4}
    assert layer.layers[1].groups == PLANTED[1]                     # layer 1 is right at the global τ
    assert all(any(set(g) <= set(c) for c in layer.layers[0].groups) for g in PLANTED[0])   # plus one merge


def test_layer_scope_validation():
    info = get_adapter(tiny_model("mixtral")).model_info()
    for kw, key in (({"target_experts": 12}, "target_experts"), ({}, "expert_sparsity"),
                    ({"expert_sparsity": 0.25, "threshold": 0.3}, "threshold"),
                    ({"expert_sparsity": 0.25, "max_merges_per_layer": 2}, "max_merges_per_layer"),
                    ({"expert_sparsity": 0.25, "search_fallback": "nearest"}, "search_fallback"),
                    ({"expert_sparsity": 0.9}, "top_k"), ({"expert_sparsity": 0.25, "scope": "model"}, "scope")):
        with pytest.raises(ConfigError, match=key):
            StunConfig(**{"scope": "layer", **kw}).validate(info)
    ds = get_adapter(tiny_model("deepseek_v3")).model_info()
    with pytest.raises(ConfigError, match="divisible by n_group"):
        StunConfig(expert_sparsity=0.125, scope="layer").validate(ds)   # keeps 7 of 8 in 2 groups
    with pytest.raises(ConfigError, match="per routing group"):
        StunConfig(expert_sparsity=0.75, scope="layer").validate(ds)    # 1 per group < 2 (top-2-sum)
    StunConfig(expert_sparsity=0.25, scope="layer").validate(ds)
    assert StunConfig().scope == "global"


# ---- the other expert pruners honour scope=layer exactly -------------------------------------------
def _router_change(tmp_path, model):
    a = get_adapter(model)
    path = tmp_path / "pre.pt"
    g = torch.Generator().manual_seed(5)
    torch.save({str(l): a.router_weight(l) + 0.1 * torch.randn(a.router_weight(l).shape, generator=g)
                for l in a.moe_layers}, path)
    return RouterChangePruner(pretrained_path=str(path), removal="slice_router")


@pytest.mark.parametrize("s", [0.25, 0.375])
def test_every_scored_pruner_keeps_exact_count_per_layer(s, tmp_path):
    makers = {"frequency": lambda m: B.FrequencyPruner(expert_sparsity=s),
              "routing_score": lambda m: B.RoutingScorePruner(expert_sparsity=s, variant="soft_full_mean"),
              "random": lambda m: B.RandomPruner(expert_sparsity=s, seed=3),
              "router_change": lambda m: _router_change(tmp_path, m),
              "lu_combinatorial": lambda m: LuCombinatorialPruner(expert_sparsity=s)}
    for name, make in makers.items():
        model = tiny_model("mixtral")
        pruner = make(model)
        pruner.cfg.expert_sparsity, pruner.cfg.scope = s, "layer"
        plan = pruner.plan(ctx_for(model))
        assert _counts(plan) == {0: n_kept(s, 8), 1: n_kept(s, 8)}, name
        assert plan.meta.get("scope", "layer") == "layer"
