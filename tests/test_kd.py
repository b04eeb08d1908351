"""Expert-wise KD: masks stay fixed, only experts train, losses drop, expert plans map correctly."""
import pytest
import torch

from stun_exp.context import RunContext
from stun_exp.distill.configs import ExpertKDSchema
from stun_exp.distill.expert_kd import ExpertKD, expert_pairs
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.models.plan import ExpertPlan, LayerPlan
from stun_exp.pruning.weights.pruners import UnstructuredPruner
from tests.tiny_models import tiny_input, tiny_model


def _pruned_ctx(arch="mixtral", plan=None):
    model = tiny_model(arch)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ctx = RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model),
                     calib=tiny_input(12, 16), device=torch.device("cpu"), dense_state=dense)
    if plan is not None:
        from stun_exp.models.surgery import apply_plan
        apply_plan(ctx.adapter, plan)
        ctx.info["expert_plan"] = plan
    UnstructuredPruner(score="wanda", name="wanda").prune(ctx, sparsity=0.5)
    return ctx




def test_kd_never_revives_pruned_weights_and_trains_experts_only():
    ctx = _pruned_ctx()
    model = ctx.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rep = ExpertKD(steps=6, lr=1e-3, lambda_mse=1e4, batch_size=2, eval_batches=2).distill(ctx)
    after = model.state_dict()
    for k, v in before.items():
        if ".experts." in k:
            assert torch.all(after[k][v == 0] == 0), k                      # pruned stays pruned
            assert not torch.equal(after[k], v), k                          # experts did train
        else:
            assert torch.equal(after[k], v), k                              # the rest is frozen
    assert rep["revived_entries"] == 0 and rep["masked_entries"] > 0
    assert rep["after"]["expert_mse"] < rep["before"]["expert_mse"]
    assert rep["after"]["loss"] < rep["before"]["loss"]
    assert not any(p.requires_grad for p in model.parameters())


def test_kd_with_removed_and_merged_experts():
    groups = [[0], [1, 4], [2], [3], [5], [6], [7]]
    reps = [0, None, 2, 3, 5, 6, 7]
    plan = ExpertPlan("test", 16, {0: LayerPlan(groups, reps), 1: LayerPlan(groups, reps)})
    ctx = _pruned_ctx(plan=plan)
    assert ctx.adapter.num_experts(0) == 7
    rep = ExpertKD(steps=4, lr=1e-3, lambda_mse=1e4, batch_size=2).distill(ctx)
    assert rep["revived_entries"] == 0
    assert rep["pairs"] == 14
    assert rep["after"]["expert_mse"] < rep["before"]["expert_mse"]
    assert ExpertKD(steps=0, merged_experts="skip").distill(ctx)["pairs"] == 12


def test_expert_pairs_mapping():
    lp = LayerPlan([[0, 3], [1], [2, 5]], [3, 1, None])
    plan = ExpertPlan("t", 6, {0: lp})
    assert expert_pairs(plan, 0, 3) == [(0, [3]), (1, [1]), (2, [2, 5])]
    assert expert_pairs(plan, 0, 3, merged="skip") == [(0, [3]), (1, [1])]
    plan.removal = "zero_output"
    assert expert_pairs(plan, 0, 6) == [(3, [3]), (1, [1]), (2, [2]), (5, [5])]
    assert expert_pairs(None, 0, 3, pruned=[1]) == [(0, [0]), (2, [2])]


def test_kd_after_moe_pruner_on_arctic_layout():
    model = tiny_model("arctic")
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ctx = RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model),
                     calib=tiny_input(8, 16), device=torch.device("cpu"), dense_state=dense)
    UnstructuredPruner(score="moe_pruner", name="moe_pruner", scope="experts", prune_router=False, prune_shared_experts=False,
              prune_dense_mlp=False).prune(ctx, sparsity=0.5)
    rep = ExpertKD(steps=3, lr=1e-3, lambda_mse=1e4, batch_size=2).distill(ctx)
    assert rep["revived_entries"] == 0 and rep["after"]["expert_mse"] < rep["before"]["expert_mse"]


def test_kd_schema_validation():
    ExpertKDSchema().validate()
    with pytest.raises(ConfigError, match="merged_experts"):
        ExpertKDSchema(merged_experts="avg").validate()
    with pytest.raises(ConfigError, match="lr"):
        ExpertKDSchema(lr=0.0).validate()
