"""HC-SMoE / M-SMoE: distances and clustering on planted groups (REAP's exact labels), weight
matching (the float16 rounding of the cost included), merge math through surgery (weighted average,
zero weights, permutation invariance), keep-all-slots vs collapse, the plan contract's optional
fields, save -> reload round trips, and both pruners through the runner on every architecture."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stun_exp.context import RunContext
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.models.loading import load_pretrained, save_pretrained
from stun_exp.models.surgery import apply_plan, permute_expert
from stun_exp.pruning.expert import merge_clustering as M
from stun_exp.pruning.expert.configs import HcSmoeConfig, MSmoeConfig
from stun_exp.pruning.expert.merging import HcSmoePruner, MSmoePruner
from stun_exp.models.plan import ExpertPlan, LayerPlan
from stun_exp.observe.reap_metrics import ReapStats, RunningMean
from tests.arctic_like import register_auto
from tests.test_expert_reap import run_cli
from tests.tiny_models import ARCHS, tiny_input, tiny_model

register_auto()
GROUPED = {"deepseek_v2", "deepseek_v3"}


def _ctx(model, calib=None):
    return RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model),
                      calib=tiny_input(4, 8) if calib is None else calib, device=torch.device("cpu"))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ---- distances and clustering -------------------------------------------------------------------------
def test_distances_match_naive_loops():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    for measure in ("euclidean", "cosine", "angular"):
        d = M.pairwise_distance(x, measure)
        for i in range(5):
            for j in range(5):
                if measure == "angular" and i == j:
                    continue                           # acos is ill-conditioned at cos = 1
                c = float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))
                want = {"euclidean": float((x[i] - x[j]).norm()), "cosine": 1 - c,
                        "angular": math.acos(max(-1.0, min(1.0, c))) / math.pi}[measure]
                assert d[i, j].item() == pytest.approx(want, abs=1e-5), (measure, i, j)


def test_linkage_replay_labels_are_reaps():
    # 4 points: merge (0,1) -> 4, (2,3) -> 5, (4,5) -> 6
    Z = np.array([[0, 1, 0.1, 2], [2, 3, 0.2, 2], [4, 5, 0.9, 4]], dtype=float)
    assert M.linkage_to_labels(Z, 4) == [0, 1, 2, 3]
    assert M.linkage_to_labels(Z, 3) == [2, 2, 0, 1]      # labels ordered by final cluster id
    assert M.linkage_to_labels(Z, 2) == [0, 0, 1, 1]
    assert M.linkage_to_labels(Z, 1) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        M.linkage_to_labels(Z, 5)


def test_hierarchical_clustering_recovers_planted_groups():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 16, generator=g) * 10
    planted = [0, 1, 0, 2, 1, 2, 0, 1]
    x = centers[planted] + 0.01 * torch.randn(8, 16, generator=g)
    labels = M.hierarchical_labels(M.pairwise_distance(x, "euclidean"), "average", 3)
    assert M.groups_from_labels(labels) == [[0, 2, 6], [1, 4, 7], [3, 5]]


def test_mc_smoe_grouping_is_reaps():
    proba = {0: torch.tensor([0.5, 0.3, 0.1, 0.1]), 1: torch.tensor([0.2, 0.2, 0.4, 0.2])}
    # dominant: argmax per layer (0,0) (1,2); then the 2 most frequent others globally:
    # (0,1)=0.3, then the 0.2 tie -> layer 1 expert 0 (stable: layer order, then id)
    assert M.dominant_experts(proba, 4) == {(0, 0), (0, 1), (1, 2), (1, 0)}
    d0 = torch.tensor([[0, .9, .2, .8], [.9, 0, .7, .1], [.2, .7, 0, .5], [.8, .1, .5, 0]])
    d1 = torch.tensor([[0, .3, .9, .4], [.3, 0, .3, .5], [.9, .3, 0, .6], [.4, .5, .6, 0]])
    labels = M.mc_smoe_labels({0: d0, 1: d1}, proba, 4)
    # layer 0: 2 -> 0 (0.2 < 0.7), 3 -> 1 (0.1); layer 1: 1 tie 0.3/0.3 -> first dominant (0), 3 -> 0
    assert labels == {0: [0, 1, 0, 1], 1: [0, 0, 1, 0]}
    with pytest.raises(ValueError, match="number of layers"):
        M.dominant_experts(proba, 1)


def test_dominant_is_first_most_frequent():
    assert M.dominant_of([1, 3, 5], torch.tensor([0.0, 0.2, 0.0, 0.4, 0.0, 0.4])) == 3
    assert M.groups_from_labels([2, 0, 2, 1]) == [[0, 2], [1], [3]]


# ---- weight matching ------------------------------------------------------------------------------------
def _expert(g, I=6, H=4):
    return {"gate": torch.randn(I, H, generator=g), "up": torch.randn(I, H, generator=g),
            "down": torch.randn(H, I, generator=g)}


def _ffn(w, x):
    return (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def test_weight_matching_recovers_a_planted_permutation():
    g = torch.Generator().manual_seed(2)
    dom = _expert(g)
    shuffle = torch.randperm(6, generator=g)
    other = {k: (v[shuffle] if k != "down" else v[:, shuffle]) + 0.01 * torch.randn(v.shape, generator=g)
             for k, v in dom.items()}
    p = M.weight_matching_permutation(other, dom)
    aligned = M.permute_weights(other, p)
    assert torch.equal(torch.tensor(p)[shuffle.argsort()], torch.arange(6)) or \
        torch.allclose(aligned["up"], dom["up"], atol=0.1)
    assert torch.allclose(aligned["up"], dom["up"], atol=0.1)
    x = torch.randn(3, 4, generator=g)
    assert torch.allclose(_ffn(aligned, x), _ffn(other, x), atol=1e-5)   # function unchanged


def test_cost_is_rounded_to_float16_before_matching():
    """float32 prefers swapping (2.0 < 2.0003); in float16 all four costs are 1.0 and the
    assignment is the identity, which is what REAP's permuter returns."""
    from scipy.optimize import linear_sum_assignment
    cost = torch.tensor([[1.0, 1.0], [1.0, 1.0003]])
    assert linear_sum_assignment(cost.numpy())[1].tolist() == [1, 0]
    assert M.matching_permutation(cost) == [0, 1]


def test_matching_cost_matches_loop():
    g = torch.Generator().manual_seed(3)
    a, b = _expert(g, I=3), _expert(g, I=3)
    c = M.matching_cost(a, b)
    for i in range(3):
        for j in range(3):
            want = sum(float(((a[k][i] - b[k][j]) ** 2).sum()) for k in ("gate", "up")) + \
                float(((a["down"][:, i] - b["down"][:, j]) ** 2).sum())
            assert c[i, j].item() == pytest.approx(want, rel=1e-4)


# ---- surgery: permutation, weighted average, router rule ----------------------------------------------------
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "arctic", "qwen2_moe"])
def test_permute_expert_keeps_the_function(arch):
    model = tiny_model(arch)
    a, x = get_adapter(model), tiny_input(2, 8)
    before = _logits(model, x)
    l = a.moe_layers[-1]
    I = a.expert(l, 1)["gate"].shape[0]
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(0)).tolist()
    old = {k: v.clone() for k, v in a.expert(l, 1).items()}
    permute_expert(a, l, 1, perm)
    assert torch.equal(a.expert(l, 1)["gate"], old["gate"][perm])
    assert torch.allclose(_logits(model, x), before, atol=1e-5)
    with pytest.raises(ConfigError, match="reordering"):
        permute_expert(a, l, 1, perm[:-1])


def _merge_plan(l, groups, weights, perms=None, removal="slice_router"):
    reps = [g[0] if len(g) == 1 else None for g in groups]
    return ExpertPlan("hc_smoe", 0, {l: LayerPlan(groups, reps, weights, perms)}, removal)


def test_collapse_is_the_weighted_average_of_experts_and_router_rows():
    model = tiny_model("mixtral")
    a = get_adapter(model)
    l = a.moe_layers[0]
    old = {e: {k: v.clone() for k, v in a.expert(l, e).items()} for e in range(8)}
    rows = a.router_weight(l).clone()
    groups = [[0, 3, 5], [1], [2, 4], [6], [7]]
    w = [[0.5, 0.25, 0.25], None, [0.0, 0.0], None, None]       # [2, 4] never routed: zero expert
    apply_plan(a, _merge_plan(l, groups, w))
    assert a.num_experts(l) == 5
    for k in ("gate", "up", "down"):
        want = 0.5 * old[0][k] + 0.25 * old[3][k] + 0.25 * old[5][k]
        assert torch.allclose(a.expert(l, 0)[k], want, atol=1e-6)
        assert torch.equal(a.expert(l, 1)[k], old[1][k])
        assert torch.count_nonzero(a.expert(l, 2)[k]) == 0
    assert torch.allclose(a.router_weight(l)[0], 0.5 * rows[0] + 0.25 * rows[3] + 0.25 * rows[5], atol=1e-6)
    assert torch.equal(a.router_weight(l)[4], rows[7])
    assert torch.isfinite(_logits(model, tiny_input(1, 4))).all()


def test_merged_function_is_invariant_to_a_shared_permutation():
    """Permuting every member of a group by the same p before averaging leaves the merged expert's
    function (and so the model's logits) unchanged."""
    x = tiny_input(2, 8)
    outs = []
    for perms in (None, "shared"):
        model = tiny_model("qwen3_moe")
        a = get_adapter(model)
        l = a.moe_layers[0]
        I = a.expert(l, 0)["gate"].shape[0]
        p = torch.randperm(I, generator=torch.Generator().manual_seed(4)).tolist()
        groups = [[0, 1, 2], [3], [4], [5], [6], [7]]
        per = None if perms is None else [[p, p, p]] + [None] * 5
        apply_plan(a, _merge_plan(l, groups, [[0.2, 0.3, 0.5]] + [None] * 5, per))
        outs.append(_logits(model, x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_keep_all_slots_writes_the_merge_into_every_member():
    model = tiny_model("mixtral")
    a = get_adapter(model)
    l = a.moe_layers[0]
    rows = a.router_weight(l).clone()
    old = {e: a.expert(l, e)["up"].clone() for e in range(8)}
    groups = [[0, 3], [1], [2], [4], [5], [6], [7]]
    apply_plan(a, _merge_plan(l, groups, [[3.0, 1.0]] + [None] * 6, removal="zero_output"))
    want = 0.75 * old[0] + 0.25 * old[3]
    assert a.num_experts(l) == 8 and torch.equal(a.router_weight(l), rows)
    assert torch.allclose(a.expert(l, 0)["up"], want) and torch.allclose(a.expert(l, 3)["up"], want)
    assert torch.equal(a.expert(l, 1)["up"], old[1])


# ---- plan contract -------------------------------------------------------------------------------------------
def test_plan_optional_fields_round_trip_and_old_plans_load():
    lp = LayerPlan([[0, 2], [1]], [None, 1], [[0.7, 0.3], None], [[None, [1, 0, 2]], None])
    plan = ExpertPlan("m_smoe", 3, {0: lp}, "slice_router", {"x": 1})
    back = ExpertPlan.from_dict(json.loads(plan.to_json()))
    assert back.layers[0] == lp
    old = {"method": "stun", "experts_before": 3, "layers": {"0": {"groups": [[0], [1, 2]],
                                                               "representatives": [0, None]}}}
    loaded = ExpertPlan.from_dict(old)
    assert loaded.layers[0].merge_weights is None and "merge_weights" not in loaded.to_dict()["layers"]["0"]
    for bad in (dict(merge_weights=[[-1.0, 1.0], None]), dict(merge_weights=[[math.nan, 1.0], None]),
                dict(merge_weights=[[1.0], None]), dict(merge_weights=[None, [1.0]]),
                dict(permutations=[[None, [0, 0, 1]], None]), dict(permutations=[None])):
        with pytest.raises(ValueError):
            LayerPlan([[0, 2], [1]], [None, 1], **bad)


# ---- save -> reload ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pruner,removal", [(MSmoePruner, "slice_router"), (HcSmoePruner, "zero_output"),
                                            (MSmoePruner, "zero_output")])
def test_merged_model_save_reload_identical(pruner, removal, tmp_path):
    model = tiny_model("mixtral")
    plan = pruner(expert_sparsity=0.5, removal=removal).plan(_ctx(model))
    assert any(r is None for lp in plan.layers.values() for r in lp.representatives)
    apply_plan(get_adapter(model), plan)
    x = tiny_input(2, 8)
    save_pretrained(model, None, tmp_path / "ckpt")
    m2, _ = load_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(_logits(model, x), _logits(m2, x))
    n_after = [get_adapter(m2).num_experts(l) for l in get_adapter(m2).moe_layers]
    assert n_after == ([8, 8] if removal == "zero_output" else [len(lp.groups) for lp in plan.layers.values()])


# ---- pruners on planted statistics (plan_from_stats) ------------------------------------------------------------
def _planted_stats(a, freqs: dict[int, list[int]], tokens: int = 100) -> dict[int, ReapStats]:
    out = {}
    for l in a.moe_layers:
        st = ReapStats(8)
        st.total_tokens = tokens
        st.expert_frequency = torch.tensor(freqs[l])
        ca = torch.zeros(8, 32)
        for e, c in enumerate([0, 0, 1, 1, 2, 2, 3, 3]):          # planted HC-SMoE pairs
            ca[e, c] = 10.0
            ca[e, 31] = 0.01 * e
        st.characteristic_activation = RunningMean((8, 32))
        st.characteristic_activation.update(ca, 1)
        sim = torch.full((8, 8), 1.0)
        st.router_logit_similarity = RunningMean((8, 8))
        st.router_logit_similarity.update(sim - torch.eye(8), 1)
        out[l] = st
    return out


def test_hc_smoe_from_planted_stats():
    model = tiny_model("mixtral")
    a = get_adapter(model)
    stats = _planted_stats(a, {l: [10, 30, 20, 20, 5, 5, 0, 10] for l in a.moe_layers})
    plan = HcSmoePruner(expert_sparsity=0.5).plan_from_stats(stats, a, None)
    lp = plan.layers[a.moe_layers[0]]
    assert lp.groups == [[0, 1], [2, 3], [4, 5], [6, 7]] and lp.representatives == [None] * 4
    want = [[0.1, 0.3], [0.2, 0.2], [0.05, 0.05], [0.0, 0.1]]      # frequency / tokens (float32)
    assert [w == pytest.approx(v) for w, v in zip(lp.merge_weights, want)] == [True] * 4
    assert lp.permutations is None
    assert plan.meta["dominant"][str(a.moe_layers[0])] == [1, 2, 4, 7]


def test_m_smoe_uneven_layers_need_keep_all_slots():
    model = tiny_model("mixtral")
    a = get_adapter(model)
    l0, l1 = a.moe_layers
    stats = _planted_stats(a, {l0: [30, 29, 28, 1, 1, 1, 1, 1], l1: [2, 1, 1, 1, 1, 1, 1, 1]})
    # 2 clusters per layer on average -> 4 dominant: (l0: 0, 1, 2), (l1: 0): layer 1 < top_k
    with pytest.raises(ConfigError, match="zero_output"):
        MSmoePruner(expert_sparsity=0.75).plan_from_stats(stats, a, None)
    plan = MSmoePruner(expert_sparsity=0.75, removal="zero_output").plan_from_stats(stats, a, None)
    assert [len(plan.layers[l].groups) for l in (l0, l1)] == [3, 1]
    assert plan.meta["total_clusters"] == 4


def test_merge_config_validation():
    info = get_adapter(tiny_model("mixtral")).model_info()
    with pytest.raises(ConfigError, match="top_k=2"):
        HcSmoeConfig(expert_sparsity=0.8).validate(info)         # int(8 * 0.2) = 1 cluster
    with pytest.raises(ConfigError, match="did you mean 'average'"):
        HcSmoeConfig(linkage="averag").validate(info)
    with pytest.raises(ConfigError, match="did you mean 'zero_output'"):
        MSmoeConfig(removal="zero_outpt").validate(info)
    with pytest.raises(ConfigError, match="permute"):
        MSmoeConfig(permute="direct").validate(info)
    with pytest.raises(ConfigError, match="expert_sparsity"):
        MSmoeConfig(expert_sparsity=float("nan")).validate(info)
    grouped = get_adapter(tiny_model("deepseek_v3")).model_info()
    with pytest.raises(ConfigError, match="routing groups"):
        HcSmoeConfig().validate(grouped)
    HcSmoeConfig(removal="zero_output").validate(grouped)


# ---- through the runner, every architecture -------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["hc_smoe", "m_smoe"])
def test_merging_runs_on_every_architecture(arch, name, tmp_path):
    removal = "zero_output" if arch in GROUPED else "slice_router"
    res, plan = run_cli(arch, tmp_path, [f"expert_pruner={name}", "expert_pruner.expert_sparsity=0.25",
                                         f"expert_pruner.removal={removal}"])
    assert res["complete"] and plan["method"] == name and plan["removal"] == removal
    assert plan["experts_after"] < plan["experts_before"]
    merged = [i for lp in plan["layers"].values() for i, r in enumerate(lp["representatives"]) if r is None]
    assert merged and all("merge_weights" in lp for lp in plan["layers"].values())
    assert res["sparsity"]["decoder_linear"] == pytest.approx(0.3, abs=0.03)
    assert res["expert_pruning"]["meta"]["forward_passes"]["full_model_forwards"] == 1
