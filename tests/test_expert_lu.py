"""Lu et al. combinatorial expert pruning vs a brute-force loop written here; the C(n, r) budget."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from stun_exp.context import RunContext
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.pruning.expert.lu import LuCombinatorialPruner
from tests.tiny_models import COMMON, tiny_input


def mixtral4(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                        router_jitter_noise=0.0)
    model = MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_()
    return model


def naive_moe(a, l, x, dropped):
    """Mixtral MoE by hand: mask dropped logits, softmax, top-2, renormalise, Σ w·down(silu(gate)·up)."""
    logits = x @ a.router_weight(l).T
    logits[:, list(dropped)] = -float("inf")
    p = torch.softmax(logits, dim=-1)
    w, ids = p.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(2):
            ex = a.expert(l, int(ids[t, j]))
            h = F.silu(ex["gate"] @ x[t]) * (ex["up"] @ x[t])
            out[t] += w[t, j] * (ex["down"] @ h)
    return out


def captured_inputs(model, a, batches):
    store = {l: [] for l in a.moe_layers}
    hooks = [a.moe_block(l).register_forward_pre_hook(
        lambda m, args, l=l: store[l].append(args[0].reshape(-1, args[0].shape[-1]).detach().clone()))
        for l in a.moe_layers]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return store


def brute_force(model, a, calib, batch, r):
    batches = [calib[i:i + batch] for i in range(0, len(calib), batch)]
    xs = captured_inputs(model, a, batches)
    best, losses = {}, {}
    for l in a.moe_layers:
        zs = [naive_moe(a, l, x, ()) for x in xs[l]]
        losses[l] = {}
        for dropped in itertools.combinations(range(4), 4 - r):
            losses[l][dropped] = sum(float((z.double() - naive_moe(a, l, x, dropped).double()).norm())
                                     for x, z in zip(xs[l], zs))
        best[l] = min(losses[l], key=losses[l].get)
    return best, losses


def ctx_for(model, calib):
    return RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model), calib=calib,
                      device=torch.device("cpu"))


@pytest.mark.parametrize("sparsity,r", [(0.25, 3), (0.5, 2)])
def test_layerwise_equals_brute_force(sparsity, r):
    model = mixtral4()
    calib = tiny_input(4, 8, seed=3)
    ctx = ctx_for(model, calib)
    with torch.no_grad():
        best, losses = brute_force(model, ctx.adapter, calib, 2, r)
    plan = LuCombinatorialPruner(expert_sparsity=sparsity, calib_batch_size=2).plan(ctx)
    for l in ctx.adapter.moe_layers:
        assert plan.layers[l].kept == [e for e in range(4) if e not in best[l]]
        got = plan.meta["best_losses"][str(l)]
        for key, v in got.items():
            assert v == pytest.approx(losses[l][tuple(int(i) for i in key.split(","))], rel=1e-5)
    n_cand = len(losses[0])
    assert ctx.counters.full_model_forwards == 2                        # one pass, 2 batches
    assert ctx.counters.moe_block_forwards == 2 * 2 * (1 + n_cand)     # layers × batches × (Z + cands)


def test_progressive_first_layer_matches_and_counts_passes():
    model = mixtral4(1)
    calib = tiny_input(4, 8, seed=5)
    lw = LuCombinatorialPruner(expert_sparsity=0.5, calib_batch_size=4).plan(ctx_for(model, calib))
    ctx = ctx_for(model, calib)
    pg = LuCombinatorialPruner(expert_sparsity=0.5, calib_batch_size=4, variant="progressive").plan(ctx)
    assert pg.layers[0].kept == lw.layers[0].kept
    assert ctx.counters.full_model_forwards == 1 + 2                     # Z pass + one per layer
    # layer 1 inputs come from the model with layer 0 pruned: brute force on that model
    a = ctx.adapter
    drop0 = [e for e in range(4) if e not in pg.layers[0].kept]
    hook = a.moe_block(0).register_forward_hook(lambda m, i, o: naive_moe(a, 0, i[0].reshape(-1, 32),
                                                                           drop0).reshape(i[0].shape))
    with torch.no_grad():
        xs = captured_inputs(model, a, [calib])[1]
    hook.remove()
    with torch.no_grad():
        z = captured_inputs(model, a, [calib])[1]                       # original inputs -> Z
        zs = [naive_moe(a, 1, x, ()) for x in z]
        loss = {d: sum(float((t.double() - naive_moe(a, 1, x, d).double()).norm()) for x, t in zip(xs, zs))
                for d in itertools.combinations(range(4), 2)}
    assert pg.layers[1].kept == [e for e in range(4) if e not in min(loss, key=loss.get)]


def test_budget_refused_before_any_pass():
    model = mixtral4()
    ctx = ctx_for(model, tiny_input(2, 8))
    with pytest.raises(ConfigError, match=r"C\(4,2\) = 6"):
        LuCombinatorialPruner(expert_sparsity=0.5, max_candidates=5).plan(ctx)
    assert ctx.counters.full_model_forwards == 0 and ctx.counters.moe_block_forwards == 0
    with pytest.raises(ConfigError, match="scope"):
        LuCombinatorialPruner(scope="global").plan(ctx)
