"""Conformance with CerebrasResearch/reap's own functions, on tiny models of our architectures.

Skipped unless ``REAP_SRC`` names a checkout's ``src`` folder (the one holding ``reap/``):

    REAP_SRC=/path/to/reap/src pytest tests/test_reap_conformance.py

REAP's observer is replayed on our adapter exactly as its hook runs (every expert evaluated on every
token into a float32 buffer, ``topk`` of the raw logits, ``update_pruning_state``, the merging
trackers) and its ``prune()`` selection, ``hierarchical_clustering``, ``mc_smoe_clustering``,
``WeightMatchingPermuter`` and frequency-weighted merge are called as its ``main.py`` / ``prune.py``
call them. Our pruners must keep the same experts / form the same clusters / apply the same
permutations.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

REAP_SRC = os.environ.get("REAP_SRC")
pytestmark = pytest.mark.skipif(not REAP_SRC, reason="REAP_SRC (CerebrasResearch/reap src folder) not set")

from stun_exp.context import RunContext  # noqa: E402
from stun_exp.models.adapter import get_adapter  # noqa: E402
from stun_exp.models.surgery import apply_plan  # noqa: E402
from stun_exp.pruning.expert.common import calib_batches  # noqa: E402
from stun_exp.pruning.expert.merging import HcSmoePruner, MSmoePruner  # noqa: E402
from stun_exp.pruning.expert.reap import ReapPruner  # noqa: E402
from tests.tiny_models import tiny_input, tiny_model  # noqa: E402

CRITERIA = {"reap": "reap", "ean_sum": "ean_sum", "ean_mean": "ean_mean", "weighted_ean_sum": "weighted_ean_sum",
            "frequency": "expert_frequency", "weighted_frequency": "weighted_expert_frequency_sum"}


def _reap():
    if REAP_SRC not in sys.path:
        sys.path.insert(0, REAP_SRC)
    import reap.cluster as C
    import reap.merge as MG
    import reap.metrics as MT
    import reap.permute as P
    import reap.pruning_metrics as PM
    return PM, MT, C, P, MG


def reap_observe(model, calib, batch_size: int, renorm: bool) -> dict:
    """REAP's observer hook (observer.py, loop-based MoE) replayed through our adapter."""
    PM, MT, _, _, _ = _reap()
    a = get_adapter(model)
    state: dict = {}
    cos = MT.get_distance_fn("cosine")

    def hook_for(l):
        @torch.no_grad()
        def hook(module, args, kwargs):
            h = args[0] if args else next(iter(kwargs.values()))
            x = h.reshape(-1, h.shape[-1])
            E = a.num_experts(l)
            logits = a.router_logits(l, x)
            sel = torch.topk(logits, a.top_k, dim=-1)[1]
            acts = torch.zeros((E, *x.shape))
            for e in range(E):
                acts[e] = a.expert_output(l, e, a.expert_hidden(l, e, x))
            if l not in state:
                st = PM.initialize_pruning_state(E)
                st["characteristic_activation"] = MT.OnlineStatsTracker((E, x.shape[-1]), 1)
                st["router_logit_similiarity"] = MT.OnlineStatsTracker((E, E), 1)
                state[l] = st
            b = PM.update_pruning_state(state[l], activations=acts, selected_experts=sel, router_logits=logits,
                                        num_experts=E, renormalize_router_weights=renorm)
            sim = cos(b.router_logits.permute(1, 0).view(1, E, 1, -1),
                      b.router_logits.permute(1, 0).view(1, 1, E, -1)).squeeze()
            state[l]["router_logit_similiarity"].update(sim, b.num_tokens)
            state[l]["characteristic_activation"].update(b.activations.mean(dim=1), b.num_tokens)
        return hook

    hs = [a.moe_block(l).register_forward_pre_hook(hook_for(l), with_kwargs=True) for l in a.moe_layers]
    try:
        with torch.no_grad():
            for b in calib_batches(calib, batch_size):
                model(input_ids=b, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return {l: {k: v.mean if isinstance(v, MT.OnlineStatsTracker) else v for k, v in st.items()}
            for l, st in state.items()}


def _ctx(model, calib):
    return RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model), calib=calib,
                      device=torch.device("cpu"))


def _partition(labels) -> set:
    groups: dict = {}
    for e, c in enumerate(list(labels)):
        groups.setdefault(int(c), set()).add(e)
    return {frozenset(g) for g in groups.values()}


ARCHS = ["mixtral", "qwen3_moe", "olmoe"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_experts_equal_reap_prune(arch, renorm, dtype):
    model, calib = tiny_model(arch, seed=1).to(dtype), tiny_input(6, 12, seed=2)
    data = reap_observe(model, calib, 1, renorm)
    for crit, key in CRITERIA.items():
        for s in (0.25, 0.5):
            plan = ReapPruner(criterion=crit, expert_sparsity=s, renormalize=renorm).plan(_ctx(model, calib))
            for l, st in data.items():
                n = st["expert_frequency"].shape[0]
                _, drop = torch.topk(st[key], int(n * s), largest=False)
                want = [i for i in range(n) if i not in drop]
                assert plan.layers[l].kept == want, (crit, s, l)
                got = torch.tensor(plan.meta["saliency"][str(l)], dtype=torch.float64)
                assert torch.allclose(got, st[key].double(), rtol=1e-6, atol=0), (crit, l)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_clusters", [6, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_smoe_clusters_equal_reap(arch, n_clusters, dtype):
    _, MT, C, _, _ = _reap()
    model, calib = tiny_model(arch, seed=3).to(dtype), tiny_input(6, 12, seed=4)
    data = reap_observe(model, calib, 8, False)
    plan = HcSmoePruner(expert_sparsity=1 - n_clusters / 8).plan(_ctx(model, calib))
    for l, st in data.items():
        ca = st["characteristic_activation"]
        dist = MT.get_distance_fn("euclidean")(ca.unsqueeze(0), ca.unsqueeze(1))
        want = C.hierarchical_clustering(dist, "average", n_clusters)
        assert _partition(plan.meta["clusters"][str(l)]) == _partition(want), l
        assert len(plan.layers[l].groups) == n_clusters


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_clusters", [6, 4])
def test_m_smoe_clusters_bf16_equal_reap(arch, n_clusters):
    """bf16 router logits: the per-batch cosine similarities are computed in bf16 on both sides."""
    _, MT, C, _, _ = _reap()
    model, calib = tiny_model(arch, seed=5).to(torch.bfloat16), tiny_input(6, 12, seed=6)
    data = reap_observe(model, calib, 8, False)
    plan = MSmoePruner(expert_sparsity=1 - n_clusters / 8, permute="none").plan(_ctx(model, calib))
    cos = MT.get_distance_fn("cosine")
    dist = {l: cos(st["router_logit_similiarity"].unsqueeze(0), st["router_logit_similiarity"].unsqueeze(1))
            for l, st in data.items()}
    proba = {l: st["expert_frequency"] / st["total_tokens"] for l, st in data.items()}
    want = C.mc_smoe_clustering(dist, proba, total_clusters=len(dist) * n_clusters)
    for l in data:
        assert _partition(plan.meta["clusters"][str(l)]) == _partition(want[l]), l


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_clusters", [6, 4])
def test_m_smoe_clusters_permutations_and_merge_equal_reap(arch, n_clusters):
    _, MT, C, P, MG = _reap()
    model, calib = tiny_model(arch, seed=5), tiny_input(6, 12, seed=6)
    data = reap_observe(model, calib, 8, False)
    a = get_adapter(copy.deepcopy(model))          # the unmerged weights, for REAP's permuter
    plan = MSmoePruner(expert_sparsity=1 - n_clusters / 8, removal="zero_output").plan(_ctx(model, calib))
    apply_plan(get_adapter(model), plan)           # keep-all-slots: merged weights in every member slot
    merged_model = get_adapter(model)
    cos = MT.get_distance_fn("cosine")
    dist = {l: cos(st["router_logit_similiarity"].unsqueeze(0), st["router_logit_similiarity"].unsqueeze(1))
            for l, st in data.items()}
    proba = {l: st["expert_frequency"] / st["total_tokens"] for l, st in data.items()}
    want = C.mc_smoe_clustering(dist, proba, total_clusters=len(dist) * n_clusters)
    merged_groups = 0
    for l in data:
        assert _partition(plan.meta["clusters"][str(l)]) == _partition(want[l]), l
        lp = plan.layers[l]
        for gi, g in enumerate(lp.groups):
            if len(g) == 1:
                continue
            merged_groups += 1
            experts = [_Expert(a.expert(l, e)) for e in range(a.num_experts(l))]
            ids = torch.tensor(g)
            dom = int(ids[torch.argmax(proba[l][ids])])
            P.WeightMatchingPermuter(_ATTRS).permute(experts, g, dom_expert_idx=dom)
            for e, perm in zip(g, lp.permutations[gi]):
                w = a.expert(l, e)
                if perm is None:
                    assert e == dom
                    continue
                p = torch.tensor(perm)
                ours = {"up_proj": w["up"][p], "gate_proj": w["gate"][p], "down_proj": w["down"][:, p]}
                for name in ours:
                    assert torch.equal(getattr(experts[e], name).weight, ours[name]), (l, e, name)
            order = [dom] + [e for e in g if e != dom]
            for name, key in (("up_proj", "up"), ("gate_proj", "gate"), ("down_proj", "down")):
                ref = MG.MoEExpertMerger.frequency_weighted_average_merge(
                    [getattr(experts[e], name).weight.data for e in order], proba[l][torch.tensor(order)])
                for e in g:
                    assert torch.allclose(merged_model.expert(l, e)[key], ref, rtol=1e-5, atol=1e-6), (l, e, key)
    assert merged_groups > 0
    perms = [p for lp in plan.layers.values() for g in lp.permutations or [] for p in g or [] if p is not None]
    assert any(p != sorted(p) for p in perms)      # the alignment actually reorders neurons


_ATTRS = {"up_proj": "up_proj", "gate_proj": "gate_proj", "down_proj": "down_proj", "fused": False}


class _Expert(nn.Module):
    """A ModuleList-style expert holding copies of our adapter's gate/up/down (REAP's permuter input)."""

    def __init__(self, w: dict) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(w["gate"].shape[1], w["gate"].shape[0], bias=False)
        self.up_proj = nn.Linear(w["up"].shape[1], w["up"].shape[0], bias=False)
        self.down_proj = nn.Linear(w["down"].shape[1], w["down"].shape[0], bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(w["gate"])
            self.up_proj.weight.copy_(w["up"])
            self.down_proj.weight.copy_(w["down"])

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
