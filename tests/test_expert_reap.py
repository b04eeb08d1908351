"""REAP: every criterion against a naive per-token loop, REAP's exact results on hand-built cases,
the expert-output observer (routed-only == all experts then masked; one decoder layer at a time ==
the full model; padding masked), the selection rule, the config, and the pruner through the runner
on a tiny model of every supported architecture."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from stun_exp.config.validate import validate
from stun_exp.context import RunContext
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.observe.expert_outputs import ExpertOutputObserver
from stun_exp.pipeline import run_pipeline
from stun_exp.observe import reap_metrics as R
from stun_exp.pruning.expert.calibrated import resolve_renormalize
from stun_exp.pruning.expert.configs import ReapConfig, reap_n_clusters, reap_n_pruned
from stun_exp.pruning.expert.reap import ReapPruner, reap_keep
from stun_exp.pruning.expert.selection import n_removed
from stun_exp.run import CONF_DIR
from tests.tiny_models import ARCHS, VOCAB, save_tiny_checkpoint, tiny_input, tiny_model

EPS = torch.finfo(torch.float32).eps

# Hand-built batch: 6 tokens, 4 experts, top-2. Tokens 4 and 5 are padding and the only tokens that
# route to expert 2; expert 3 is never in a top-2.
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0], [3.0, 0.5, -1.0, -2.0],
                       [0.0, 1.0, -1.0, -3.0], [0.0, -1.0, 5.0, -2.0], [-1.0, 2.0, 1.0, -2.0]])
MASK = torch.tensor([1, 1, 1, 1, 0, 0])
OUTS = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))   # E_e(x_t) for every (e, t)


def _routed_norms(ids: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.linalg.norm(outs[ids[t], t], dim=-1) for t in range(ids.shape[0])])


def naive(logits, outs, k, renorm, mask=None) -> dict[str, list[float]]:
    """Per-token loop in float64 (REAP's definitions written out)."""
    E = logits.shape[1]
    acc = {e: [] for e in range(E)}
    for t in range(logits.shape[0]):
        if mask is not None and not mask[t]:
            continue
        ids = torch.topk(logits[t], k)[1].tolist()
        p = torch.softmax(logits[t].double(), dim=0)
        if renorm:
            p = torch.clamp(p / p[ids].sum(), min=float(EPS))
        for e in ids:
            acc[e].append((float(torch.linalg.norm(outs[e, t].double())), float(p[e])))
    out = {c: [] for c in R.CRITERIA}
    for e in range(E):
        a = [x for x, _ in acc[e]]
        ag = [x * g for x, g in acc[e]]
        n = len(a)
        out["frequency"].append(n)
        out["ean_sum"].append(sum(a))
        out["ean_mean"].append(sum(a) / n if n else 0.0)
        out["weighted_ean_sum"].append(sum(ag))
        out["reap"].append(sum(ag) / n if n else 0.0)
        out["weighted_frequency"].append(sum(g for _, g in acc[e]))
    return out


def _stats(batches, renorm, E=4, k=2) -> R.ReapStats:
    st = R.ReapStats(E)
    for logits, outs, mask in batches:
        ids = R.selected_experts(logits, k)
        st.add(R.batch_metrics(ids, _routed_norms(ids, outs), R.routing_weights(logits, ids, renorm), E, mask))
    return st


# ---- criteria vs the naive loop ---------------------------------------------------------------------
@pytest.mark.parametrize("renorm", [False, True])
def test_every_criterion_matches_naive_loop_with_padding(renorm):
    st = _stats([(LOGITS, OUTS, MASK)], renorm)
    want = naive(LOGITS, OUTS, 2, renorm, MASK)
    for crit in R.CRITERIA:
        got = st.saliency(crit).double()
        assert got.tolist() == pytest.approx(want[crit], rel=1e-6, abs=1e-12), crit
    assert st.total_tokens == 4 and st.expert_frequency.tolist() == [4, 4, 0, 0]
    for crit in R.CRITERIA:                       # no routed (real) token: exactly 0 in every criterion
        assert st.saliency(crit)[2].item() == 0 and st.saliency(crit)[3].item() == 0


@pytest.mark.parametrize("renorm", [False, True])
def test_batches_accumulate_like_one_pass(renorm):
    """Sums add up; the means are token-count-weighted running means (REAP's tracker)."""
    g = torch.Generator().manual_seed(1)
    logits, outs = torch.randn(40, 5, generator=g), torch.randn(5, 40, 4, generator=g)
    parts = [(logits[:7], outs[:, :7], None), (logits[7:25], outs[:, 7:25], None), (logits[25:], outs[:, 25:], None)]
    st = _stats(parts, renorm, E=5)
    want = naive(logits, outs, 2, renorm)
    for crit in R.CRITERIA:
        assert st.saliency(crit).double().tolist() == pytest.approx(want[crit], rel=1e-5), crit


def test_dtypes_are_reaps():
    st = _stats([(LOGITS, OUTS, MASK)], False)
    assert {c: st.saliency(c).dtype for c in R.CRITERIA} == {
        "reap": torch.float32, "ean_mean": torch.float32, "ean_sum": torch.float64,
        "weighted_ean_sum": torch.float64, "weighted_frequency": torch.float64, "frequency": torch.int64}


def test_exact_values_on_integer_norms():
    """Outputs with integer norms: REAP's sums and means are exact; weights 1/2 exactly."""
    logits = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 0.0, -math.inf]])
    outs = torch.zeros(3, 2, 2)
    outs[0, 0], outs[0, 1] = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])   # norms 5, 2
    outs[1, 0], outs[1, 1] = torch.tensor([6.0, 8.0]), torch.tensor([1.0, 0.0])   # norms 10, 1
    st = _stats([(logits, outs, None)], False, E=3)
    assert st.saliency("ean_sum").tolist() == [7.0, 11.0, 0.0]
    assert st.saliency("ean_mean").tolist() == [3.5, 5.5, 0.0]
    assert st.saliency("weighted_ean_sum").tolist() == [3.5, 5.5, 0.0]
    assert st.saliency("reap").tolist() == [1.75, 2.75, 0.0]
    assert st.saliency("weighted_frequency").tolist() == [1.0, 1.0, 0.0]


def test_renormalised_zero_probability_pick_gets_float32_eps():
    """A top-k pick with probability 0 (logit -inf): REAP still counts it, and after renormalising
    clamps its weight to float32 eps, so its reap saliency is exactly ‖out‖ · eps."""
    logits = torch.tensor([[0.0, -math.inf, -math.inf]])
    outs = torch.zeros(3, 1, 2)
    outs[:, 0] = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])
    ids = R.selected_experts(logits, 2)
    other = int(ids[0, 1])
    st = _stats([(logits, outs, None)], True, E=3)
    norm = float(torch.linalg.norm(outs[other, 0]))
    assert st.saliency("frequency")[other].item() == 1
    assert st.saliency("reap")[other].item() == (torch.tensor(norm) * EPS).item()
    assert _stats([(logits, outs, None)], False, E=3).saliency("reap")[other].item() == 0.0


def test_running_mean_is_kahan_welford():
    m = R.RunningMean((2,), (2,))
    m.update(torch.tensor([1.0, 0.0]), torch.tensor([3, 0]))
    m.update(torch.tensor([5.0, 2.0]), torch.tensor([1, 4]))
    assert m.mean.tolist() == [2.0, 2.0] and m.count.tolist() == [4, 4]


# ---- selection ---------------------------------------------------------------------------------------
def test_counts_truncate_like_reap():
    assert [reap_n_pruned(s, 8) for s in (0.25, 0.3, 0.3125, 0.5)] == [2, 2, 2, 4]
    assert n_removed(0.3125, 8) == 3                      # the project's round-half-up differs here
    assert [reap_n_clusters(s, 8) for s in (0.25, 0.3, 0.5)] == [6, 5, 4]


def test_reap_keep_is_topk_complement():
    assert reap_keep(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2) == [0, 2]
    freq = torch.tensor([5, 3, 3, 7])                     # int64 tie: whatever torch.topk drops
    drop = torch.topk(freq, 1, largest=False)[1].tolist()
    assert reap_keep(freq, 1) == [e for e in range(4) if e not in drop]
    assert reap_keep(torch.tensor([1.0, 2, 3, 4, 0.5, 5, 6, 7]), 2, n_group=2) == [1, 2, 3, 5, 6, 7]


# ---- observer --------------------------------------------------------------------------------------------
def _ctx(model, calib):
    return RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model), calib=calib,
                      device=torch.device("cpu"))


def _all_experts_then_mask(a, l, x, renorm) -> R.BatchMetrics:
    """REAP's way: every expert on every token, then the routed rows."""
    logits = a.router_logits(l, x)
    ids = R.selected_experts(logits, a.top_k)
    outs = torch.stack([a.expert_output(l, e, a.expert_hidden(l, e, x)).float() for e in range(a.num_experts(l))])
    return R.batch_metrics(ids, _routed_norms(ids, outs), R.routing_weights(logits, ids, renorm), a.num_experts(l))


def _close(s1: R.ReapStats, s2: R.ReapStats) -> None:
    assert s1.total_tokens == s2.total_tokens
    for crit in R.CRITERIA:
        assert torch.allclose(s1.saliency(crit).double(), s2.saliency(crit).double(), rtol=1e-5, atol=1e-8), crit


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "arctic", "deepseek_v3"])
def test_routed_only_equals_all_experts_then_masked(arch):
    model = tiny_model(arch)
    a = get_adapter(model)
    captured = {}
    hooks = [a.moe_block(l).register_forward_pre_hook(
        lambda m, args, l=l: captured.setdefault(l, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for l in a.moe_layers]
    with ExpertOutputObserver(a, renormalize=True) as obs, ExpertOutputObserver(
            a, renormalize=True, characteristic=True) as obs_all, torch.no_grad():
        model(tiny_input(2, 8))
    for h in hooks:
        h.remove()
    for l in a.moe_layers:
        ref = R.ReapStats(a.num_experts(l))
        with torch.no_grad():
            for x in captured[l]:
                ref.add(_all_experts_then_mask(a, l, x, True))
        _close(obs.stats[l], ref)
        _close(obs_all.stats[l], ref)
        assert obs.stats[l].expert_frequency.sum() == 16 * a.top_k


def test_one_decoder_layer_at_a_time_equals_full_model():
    """The streaming runtime runs one decoder layer at a time; the observer sees the same calls."""
    model = tiny_model("qwen3_moe")
    a = get_adapter(model)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, kw, i=i: inputs.setdefault(i, (args, kw)),
                                             with_kwargs=True) for i, layer in enumerate(a.layers)]
    pruner = ReapPruner()
    with pruner.observer(a, a.moe_layers) as full, torch.no_grad():
        model(tiny_input(3, 8))
    for h in hooks:
        h.remove()
    for l in a.moe_layers:
        with pruner.observer(a, [l]) as one, torch.no_grad():
            args, kw = inputs[l]
            a.layers[l](*args, **kw)
        assert list(one.stats) == [l]
        _close(one.stats[l], full.stats[l])


def test_token_mask_drops_padding():
    model = tiny_model("mixtral")
    a = get_adapter(model)
    l = a.moe_layers[0]
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    masked = ExpertOutputObserver(a, [l], renormalize=False, characteristic=True, logit_similarity=True)
    with masked.token_mask(mask):
        masked.observe(l, h)
    plain = ExpertOutputObserver(a, [l], renormalize=False, characteristic=True, logit_similarity=True)
    plain.observe(l, h.reshape(-1, 32)[mask.reshape(-1).bool()])
    _close(masked.stats[l], plain.stats[l])
    assert masked.stats[l].total_tokens == 7
    assert torch.equal(masked.stats[l].characteristic_activation.mean, plain.stats[l].characteristic_activation.mean)


# ---- config --------------------------------------------------------------------------------------------
def test_config_validation():
    info = get_adapter(tiny_model("mixtral")).model_info()
    with pytest.raises(ConfigError, match="did you mean 'reap'"):
        ReapConfig(criterion="reep").validate(info)
    for bad in (float("nan"), float("inf"), 1.0, -0.1):
        with pytest.raises(ConfigError, match="expert_sparsity"):
            ReapConfig(expert_sparsity=bad).validate(info)
    with pytest.raises(ConfigError, match="renormalize"):
        ReapConfig(renormalize="yes").validate(info)
    with pytest.raises(ConfigError, match="calib_batch_size"):
        ReapConfig(calib_batch_size=0).validate(info)
    with pytest.raises(ConfigError, match="did you mean 'global'"):
        ReapConfig(scope="globl").validate(info)
    ReapConfig(expert_sparsity=0.8).validate(info)          # int(6.4) = 6 removed, 2 = top_k kept
    with pytest.raises(ConfigError, match="top_k=2"):
        ReapConfig(expert_sparsity=0.9).validate(info)
    grouped = get_adapter(tiny_model("deepseek_v2")).model_info()
    with pytest.raises(ConfigError, match="n_group"):
        ReapConfig(scope="global").validate(grouped)


def test_bad_value_refused_before_the_model_loads():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=toy_tiny", "expert_pruner=reap",
                                                        "expert_pruner.criterion=frequncy"])
    with pytest.raises(ConfigError, match="did you mean 'frequency'"):
        validate(cfg)


def test_renormalize_follows_reaps_rule():
    cfg = lambda arch: tiny_model(arch).config
    assert resolve_renormalize(None, cfg("mixtral")) is False          # Mixtral config: no norm_topk_prob
    assert resolve_renormalize(None, cfg("qwen3_moe")) is True
    assert resolve_renormalize(None, cfg("qwen3_moe_nonorm")) is False
    assert resolve_renormalize(True, cfg("mixtral")) is True


def test_registered_and_interface():
    from hydra.utils import get_class

    from stun_exp.config.schema import schemas
    for name in ("reap", "hc_smoe", "m_smoe"):
        cls = get_class(schemas()[("expert_pruner", name)]._target_)
        assert cls(name=name).needs == "calibration_stats"
        assert callable(cls.observer) and callable(cls.plan_from_stats)


def test_plan_counts_one_calibration_pass_and_records_saliency():
    model, calib = tiny_model("mixtral"), tiny_input(4, 8)
    ctx = _ctx(model, calib)
    plan = ReapPruner(calib_batch_size=2, expert_sparsity=0.5).plan(ctx)
    assert plan.meta["forward_passes"]["full_model_forwards"] == 2 == ctx.counters.full_model_forwards
    assert plan.meta["wall_time_s"] >= 0 and set(plan.meta["saliency"]) == {"0", "1"}
    for l, lp in plan.layers.items():
        sal = torch.tensor(plan.meta["saliency"][str(l)])
        assert lp.kept == reap_keep(sal, 4)


# ---- through the runner, every architecture ---------------------------------------------------------------
def run_cli(arch, tmp_path, overrides):
    ckpt = save_tiny_checkpoint(arch, str(tmp_path / "ckpt"))
    torch.save(torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "ids.pt")
    base = ["model=hf", f"model.name_or_path={ckpt}", f"model.trust_remote_code={arch == 'arctic'}",
            "calib=tokens", f"calib.path={tmp_path / 'ids.pt'}", "calib.nsamples=4", "calib.seqlen=16",
            "eval=none", "dense_baseline=false", "unstructured_pruner=magnitude", "sparsity=0.3"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=base + overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    res = run_pipeline(cfg, str(run_dir))
    return res, json.loads((run_dir / "expert_plan.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_reap_runs_on_every_architecture(arch, tmp_path):
    res, plan = run_cli(arch, tmp_path, ["expert_pruner=reap", "expert_pruner.expert_sparsity=0.25"])
    assert res["complete"] and plan["method"] == "reap"
    assert plan["experts_after"] < plan["experts_before"]
    assert res["sparsity"]["decoder_linear"] == pytest.approx(0.3, abs=0.03)
    meta = res["expert_pruning"]["meta"]
    assert meta["forward_passes"]["full_model_forwards"] == 4 and "wall_time_s" in meta
    assert set(meta["saliency"]) == {str(l) for l in plan["layers"]}
