"""Pruner classes on tiny models: sparsity, scope, policies, OWL plan, config contract, fused == ModuleList."""
import copy
import dataclasses
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from stun_exp.analysis.sparsity import targeted_counts
from stun_exp.context import RunContext
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import MoEAdapter, get_adapter
from stun_exp.pruning.weights import configs as C
from stun_exp.pruning.weights import pruners as P
from tests.tiny_models import tiny_input, tiny_model


def _preset(**base):
    """A pruner composed like a preset (score x allocation x update), extra fields on top."""
    return lambda **kw: P.UnstructuredPruner(**{"name": "x", **base, **kw})


MAGNITUDE = _preset(score="magnitude")
WANDA = _preset(score="wanda")
MOE_PRUNER = _preset(score="moe_pruner")
OWL = _preset(score="wanda", allocation="owl")
SPARSEGPT = _preset(score=None, update="sparsegpt")

CONF = Path(__file__).resolve().parents[1] / "conf" / "unstructured_pruner"
OWL_KW = dict(owl_m=3.0, owl_lambda=0.08)
EXPERTS_ONLY = dict(scope="experts", prune_router=False, prune_shared_experts=False, prune_dense_mlp=False)


def _ctx(model, adapter=None, n=4, t=16):
    return RunContext(cfg=None, model=model, tokenizer=None, adapter=adapter or get_adapter(model),
                      calib=tiny_input(n, t), device=torch.device("cpu"))


@pytest.mark.parametrize("cls,kw", [(MAGNITUDE, {}), (WANDA, {}), (SPARSEGPT, {}),
                                    (MOE_PRUNER, EXPERTS_ONLY), (WANDA, {"nm": "2:4"}),
                                    (SPARSEGPT, {"nm": "4:8"})])
def test_achieved_sparsity_on_targets_within_half_percent(cls, kw):
    model = tiny_model("qwen2_moe")
    ctx = _ctx(model)
    pruner = cls(name="x", **kw)
    rep = pruner.prune(ctx, sparsity=0.5)
    numel, zeros = targeted_counts(ctx.adapter, pruner.is_targeted)
    assert abs(zeros / numel - 0.5) < 0.005
    assert rep["achieved_sparsity"] == pytest.approx(zeros / numel)
    assert rep["layer_forwards"] == (0 if cls is MAGNITUDE else (2 * 2 - 1) * 4)   # no re-run after the last layer
    assert ctx.counters.layer_forwards == rep["layer_forwards"]


def test_scope_flags_and_override_sparsity():
    model = tiny_model("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = WANDA(name="wanda", prune_router=False, prune_shared_experts=False)
    rep = pruner.prune(_ctx(model), sparsity=0.25)
    assert rep["sparsity"] == 0.25 and rep["kinds"] == ["attention", "dense_mlp", "expert"]
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if ".gate.weight" in k or "shared_expert" in k or "norm" in k or "embed" in k or "lm_head" in k:
            assert not changed, k
        if ("q_proj" in k or "experts" in k) and k.endswith("weight"):
            assert changed, k
    moe = MOE_PRUNER(name="moe_pruner", **EXPERTS_ONLY)
    assert moe.kinds == {"expert"}


def _block_expert0(model):
    """Make expert 0 of every layer unreachable (Arctic stand-in: its router is a plain Linear)."""
    for layer in model.model.layers:
        layer.block_sparse_moe.gate.register_forward_hook(
            lambda m, a, out: out - 1e4 * F.one_hot(torch.tensor(0), out.shape[-1]).to(out.dtype))


@pytest.mark.parametrize("cls", [WANDA, SPARSEGPT, MOE_PRUNER])
def test_zero_token_experts_leave_dense_vs_magnitude(cls):
    for policy in ("leave_dense", "magnitude"):
        model = tiny_model("arctic")
        _block_expert0(model)
        w0 = model.model.layers[1].block_sparse_moe.experts[0].w1.weight.detach().clone()
        rep = cls(name="x", zero_token_experts=policy).prune(_ctx(model), sparsity=0.5)
        assert rep["zero_token_expert_count"] == 2
        assert rep["zero_token_experts_by_layer"] == {"0": [0], "1": [0]}
        w = model.model.layers[1].block_sparse_moe.experts[0].w1.weight
        if policy == "leave_dense":
            assert torch.equal(w, w0)
            assert len(rep["skipped"]) == 6
        else:
            k = int(w.shape[1] * 0.5)
            keep = torch.sort(w0.abs(), dim=1, stable=True).indices[:, k:]
            assert torch.equal(w != 0, torch.zeros_like(w, dtype=torch.bool).scatter_(1, keep, True))
        other = model.model.layers[1].block_sparse_moe.experts[1].w1.weight
        assert float((other == 0).float().mean()) == pytest.approx(0.5, abs=0.005)


def test_owl_plan_and_report():
    model = tiny_model("mixtral")
    rep = OWL(name="owl", owl_m=3.0, owl_lambda=0.05).prune(_ctx(model), sparsity=0.6)
    sp = rep["owl"]["layer_sparsity"]
    assert sum(sp) / len(sp) == pytest.approx(0.6)
    assert max(sp) - min(sp) == pytest.approx(0.1)
    ratios = rep["owl"]["outlier_ratios"]
    assert sp[ratios.index(max(ratios))] == min(sp)
    assert rep["layer_forwards"] == 4 * 2 + (2 * 2 - 1) * 4   # dense pass reuses outputs; prune pass re-runs
                                                                # every layer but the last
    for l, s in enumerate(sp):
        assert rep["per_layer"][str(l)]["target_sparsity"] == s


def test_moe_pruner_uses_gate_weighting():
    a, b = tiny_model("mixtral"), tiny_model("mixtral")
    WANDA(name="w", **EXPERTS_ONLY).prune(_ctx(a), sparsity=0.5)
    MOE_PRUNER(name="m", **EXPERTS_ONLY).prune(_ctx(b), sparsity=0.5)
    ga, gb = a.model.layers[0].mlp.experts.gate_up_proj, b.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(ga == 0, gb == 0)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)


def _schema(**kw):
    """The unstructured schema with plain values (no default markers) and the given fields."""
    base = dict(sparsity=0.5, owl_m=5.0, owl_lambda=0.08, owl_weighting="uniform", owl_expert_samples="block_calls",
                blocksize=128, percdamp=0.01)
    return C.UnstructuredConfig(**{**base, **kw})


def test_nm_refuses_other_sparsity_and_config_validation():
    with pytest.raises(ConfigError, match="0.5"):
        WANDA(name="w", nm="2:4").prune(_ctx(tiny_model("mixtral")), sparsity=0.3)
    with pytest.raises(ConfigError, match="nm"):
        _schema(nm="3:4").validate()
    with pytest.raises(ConfigError, match="sparsity"):
        _schema(nm="2:4", sparsity=0.4).validate()
    _schema(nm="2:4", sparsity=None).validate()
    with pytest.raises(ConfigError, match="owl_m"):
        _schema(allocation="owl", owl_m=None).validate()
    with pytest.raises(ConfigError, match="experts\\+attention"):
        _schema(scope="expert+attention").validate()
    with pytest.raises(ConfigError, match="sparsity"):
        _schema(score="magnitude", sparsity=1.0).validate()
    with pytest.raises(ConfigError, match="blocksize"):
        _schema(score=None, update="sparsegpt", nm="4:8", blocksize=100).validate()
    with pytest.raises(ConfigError, match="score"):
        _schema(update="sparsegpt").validate()                 # SparseGPT has its own saliency
    with pytest.raises(ConfigError, match="allocation"):
        _schema(allocation="layerwise").validate()


@pytest.mark.parametrize("name", ["none", "magnitude", "wanda", "owl", "sparsegpt", "moe_pruner"])
def test_preset_yaml_composes_validates_and_instantiates(name):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from stun_exp.run import CONF_DIR
    text = (CONF / f"{name}.yaml").read_text()
    assert text.startswith("#")
    schema = "schema_none" if name == "none" else "schema_unstructured"
    assert list(OmegaConf.create(text).defaults) == [schema, "_self_"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"unstructured_pruner={name}"]).unstructured_pruner
    OmegaConf.to_object(cfg).validate()
    pruner = instantiate(cfg, _convert_="all")
    assert pruner.name == name
    if name == "moe_pruner":
        assert pruner.kinds == {"expert"}
    elif name != "none":
        assert pruner.kinds == set(P.KINDS) and pruner.zero_token_experts == "leave_dense"


def test_presets_compose_with_any_allocation():
    """score x allocation x update: MoE-Pruner scores with OWL's layer sparsities."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from stun_exp.run import CONF_DIR
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["unstructured_pruner=moe_pruner",
                                                       "unstructured_pruner.allocation=owl"])
    pruner = instantiate(cfg.unstructured_pruner, _convert_="all")
    rep = pruner.prune(_ctx(tiny_model("mixtral")), sparsity=0.5)
    assert rep["score"] == "moe_pruner" and rep["allocation"] == "owl"
    assert rep["owl"]["m"] == 5.0 and rep["owl"]["outlier_score"] == "moe_pruner"
    assert len(set(rep["owl"]["layer_sparsity"])) > 1          # OWL spread the layer sparsities


# ---- fused (transformers 5) vs ModuleList (Arctic remote code) layouts ---------------------------
def _fused_twin(model):
    """The Arctic stand-in with its ModuleList experts rewritten as fused 3-D tensors (same function)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    twin = copy.deepcopy(model)
    cfg = model.config
    mcfg = MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_local_experts=cfg.num_local_experts, hidden_act="silu")

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        return self.experts(x, idx, w).reshape(shape)

    for layer in twin.model.layers:
        moe = layer.block_sparse_moe
        fused = MixtralExperts(mcfg)
        with torch.no_grad():
            for e, mlp in enumerate(moe.experts):
                fused.gate_up_proj[e] = torch.cat([mlp.w1.weight, mlp.w3.weight])
                fused.down_proj[e] = mlp.w2.weight
        fused.config = twin.config    # the observer switches the implementation via the model config
        moe.experts = fused
        moe.forward = types.MethodType(forward, moe)
    # the stand-in's PreTrainedModel ignores set_experts_implementation; set the config directly
    twin.set_experts_implementation = lambda name: setattr(twin.config, "_experts_implementation", name)
    spec = dataclasses.replace(get_adapter(model).spec, layout="fused")
    return twin, MoEAdapter(twin, spec)


@pytest.mark.parametrize("cls,kw", [(WANDA, {}), (MOE_PRUNER, EXPERTS_ONLY)])
def test_fused_and_modulelist_layouts_give_the_same_masks(cls, kw):
    ml = tiny_model("arctic")
    fu, fu_adapter = _fused_twin(ml)
    x = tiny_input(2, 8)
    with torch.no_grad():
        assert torch.allclose(ml(x).logits, fu(x).logits, atol=1e-5)
    cls(name="x", **kw).prune(_ctx(ml), sparsity=0.5)
    cls(name="x", **kw).prune(_ctx(fu, fu_adapter), sparsity=0.5)
    ml_ad = get_adapter(ml)
    for l in range(len(ml_ad.layers)):
        a, b = ml_ad.linear_targets(l), fu_adapter.linear_targets(l)
        ea = {(t.expert, t.matrix): t.weight for t in a if t.kind == "expert"}
        eb = {(t.expert, t.matrix): t.weight for t in b if t.kind == "expert"}
        assert ea.keys() == eb.keys() and len(ea) == 12
        for key in ea:
            assert torch.equal(ea[key] == 0, eb[key] == 0), (l, key)
            assert float((ea[key] == 0).float().mean()) == 0.5


def test_owl_ignores_layers_without_targets():
    """DeepSeek's dense first layer has no routed experts: under scope=experts it takes no part."""
    model = tiny_model("deepseek_v2")
    rep = OWL(name="owl", owl_m=3.0, owl_lambda=0.05, **EXPERTS_ONLY).prune(_ctx(model), sparsity=0.5)
    assert rep["owl"]["layer_numel"][0] == 0 and rep["owl"]["layer_sparsity"][0] == 0.0
    assert rep["owl"]["layer_sparsity"][1] == pytest.approx(0.5)      # the only live layer: uniform
    rep = OWL(name="owl", owl_m=3.0, owl_lambda=0.05, nm="2:4", **EXPERTS_ONLY).prune(
        _ctx(tiny_model("deepseek_v2")), sparsity=None)
    assert rep["owl"]["nm_offsets"] == {"1": 0}


@pytest.mark.parametrize("cls,kw", [(WANDA, {"row_rounding": "balanced"}),
                                    (OWL, dict(OWL_KW, row_rounding="balanced")),
                                    (SPARSEGPT, {}), (MAGNITUDE, {}),
                                    (MOE_PRUNER, dict(EXPERTS_ONLY, row_rounding="balanced"))])
def test_total_target_after_expert_removal_lands_within_half_percent(cls, kw):
    """Ledger split (expert phase + derived unstructured ratio) lands decoder-Linear sparsity at 40%."""
    from stun_exp.analysis.sparsity import census, derive_unstructured_ratio, sparsity_report
    from stun_exp.models.surgery import apply_plan
    from stun_exp.models.plan import ExpertPlan
    model = tiny_model("mixtral")
    ctx = _ctx(model)
    dense = census(model, ctx.adapter)
    keep = {l: [0, 2, 3, 5, 6, 7] for l in ctx.adapter.moe_layers}
    apply_plan(ctx.adapter, ExpertPlan.from_keep("t", {l: 8 for l in keep}, keep))
    pruner = cls(name="x", **kw)
    split = derive_unstructured_ratio(0.4, dense, ctx.adapter, pruner.is_targeted)
    pruner.prune(ctx, sparsity=split["unstructured_ratio"])
    rep = sparsity_report(dense, census(model, ctx.adapter), targeted_counts(ctx.adapter, pruner.is_targeted))
    assert abs(rep["decoder_linear"] - 0.4) < 0.005
    assert abs(rep["targeted"] - split["unstructured_ratio"]) < 0.005
