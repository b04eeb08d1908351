"""The sequential engine on tiny models: propagation, routed-token statistics, kwargs, errors."""
import pytest
import torch
import torch.nn.functional as F

from stun_exp.errors import DataError
from stun_exp.models.adapter import get_adapter
from stun_exp.pruning.weights.engine import SequentialEngine, capture_inputs
from stun_exp.pruning.weights.masks import apply_mask_, row_mask
from stun_exp.pruning.weights.scores import wanda_score
from tests.tiny_models import tiny_input, tiny_model

pytest.importorskip("stun_exp.observe.observer", reason="the adapter observer has not landed yet")


def _engine(model, calib, select=lambda t: True, gram=False):
    return SequentialEngine(model, get_adapter(model), calib, torch.device("cpu"), select, gram=gram)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v2", "arctic"])
def test_layer_inputs_match_the_full_model(arch):
    """Unpruned propagation reproduces the model's own hidden states (per-layer kwargs kept)."""
    model = tiny_model(arch)
    calib = tiny_input(3, 12)
    adapter = get_adapter(model)
    seen = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.setdefault(i, []).append((a[0] if a else kw["hidden_states"]).clone()),
        with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    with torch.no_grad():
        for j in range(3):
            model(input_ids=calib[j:j + 1])
    for h in hooks:
        h.remove()
    got = {}

    def process(l, targets, stats):
        return False

    eng = _engine(model, calib)
    orig = eng._forward

    def spy(layer, h, args, as_kw):
        got.setdefault(id(layer), []).append(h.clone())
        return orig(layer, h, args, as_kw)
    eng._forward = spy
    eng.run(process)
    for i, layer in enumerate(adapter.layers):
        for j in range(3):
            assert torch.allclose(got[id(layer)][j], seen[i][j], atol=1e-5), (arch, i, j)
    assert eng.layer_forwards == 3 * len(adapter.layers)     # no re-run when nothing changed


def _naive_mixtral_stats(model, calib, l):
    """Routed-token statistics of every expert of layer l, recomputed from the block inputs."""
    block = model.model.layers[l].mlp
    xs = []
    hook = block.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for j in range(calib.shape[0]):
            model(input_ids=calib[j:j + 1])
    hook.remove()
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    gu = block.experts.gate_up_proj.data
    inter = gu.shape[1] // 2
    out = {e: {"count": 0, "calls": 0, "xsq": 0, "gxsq": 0, "hsq": 0, "ghsq": 0} for e in range(E)}
    for x in xs:
        probs = F.softmax(x @ block.gate.weight.T, dim=-1, dtype=torch.float)
        val, idx = torch.topk(probs, k, dim=-1)
        val = val / val.sum(-1, keepdim=True)
        for e in range(E):
            tok, pos = torch.where(idx == e)
            if not len(tok):
                continue
            xe, g = x[tok], val[tok, pos][:, None]
            h = F.silu(xe @ gu[e, :inter].T) * (xe @ gu[e, inter:].T)
            o = out[e]
            o["count"] += len(tok)
            o["calls"] += 1
            o["xsq"] = o["xsq"] + (xe ** 2).sum(0)
            o["gxsq"] = o["gxsq"] + ((g * xe) ** 2).sum(0)
            o["hsq"] = o["hsq"] + (h ** 2).sum(0)
            o["ghsq"] = o["ghsq"] + ((g * h) ** 2).sum(0)
    return out


def _check_expert_stats(stats, naive, l):
    for name, st in stats.items():
        if ".experts." not in name:
            continue
        e, mat = int(name.split(".")[-2]), name.split(".")[-1]
        n = naive[e]
        assert st.ntokens == n["count"] and st.ncalls == n["calls"], (l, name)
        if n["count"] == 0:
            continue
        key = "h" if mat == "down" else "x"
        assert torch.allclose(st.sq, n[f"{key}sq"], rtol=1e-4, atol=1e-5), (l, name)
        assert torch.allclose(st.gsq, n[f"g{key}sq"], rtol=1e-4, atol=1e-5), (l, name)


def test_expert_stats_equal_naive_recomputation_after_upstream_pruning():
    """Layer 1's expert statistics come from the tokens layer 0 (already pruned) sends."""
    model = tiny_model("mixtral")
    calib = tiny_input(4, 16)
    collected = {}

    def process(l, targets, stats):
        collected[l] = stats
        if l == 0:                       # prune layer 0 only (Wanda, 50%)
            for t in targets:
                apply_mask_(t.weight, row_mask(wanda_score(t.weight, stats[t.name].sq), 0.5))
            return True
        return False

    _engine(model, calib).run(process)
    # layer 0 stats were taken before pruning: compare to a dense model; layer 1 to the pruned one
    dense = tiny_model("mixtral")
    _check_expert_stats(collected[0], _naive_mixtral_stats(dense, calib, 0), 0)
    naive1 = _naive_mixtral_stats(model, calib, 1)
    _check_expert_stats(collected[1], naive1, 1)
    dense1 = _naive_mixtral_stats(dense, calib, 1)
    assert any(not torch.allclose(torch.as_tensor(naive1[e]["xsq"]), torch.as_tensor(dense1[e]["xsq"]))
               for e in naive1 if naive1[e]["count"] and dense1[e]["count"])


def test_linear_stats_count_tokens_and_calls():
    model = tiny_model("mixtral")
    calib = tiny_input(3, 10)
    got = {}

    def process(l, targets, stats):
        got.update({k: v for k, v in stats.items() if k.endswith("q_proj")})
        return False

    _engine(model, calib, gram=True).run(process)
    for st in got.values():
        assert st.ncalls == 3 and st.ntokens == 30
        assert torch.allclose(torch.diagonal(st.gram), st.sq, rtol=1e-5)


def test_shared_input_statistics_equal_per_matrix_ones_bit_for_bit(monkeypatch):
    """q, k and v read one tensor: its statistics are computed once per forward and equal what each
    matrix's own hook computes, as do those of the matrices with other inputs (o_proj, router)."""
    from stun_exp.pruning.weights import engine as engine_mod
    from stun_exp.pruning.weights.stats import SharedInputs
    calib, runs, computed = tiny_input(3, 10), {}, []
    contribution = SharedInputs.contribution

    def counting(self, src, c_in, gram):
        before = self._value
        out = contribution(self, src, c_in, gram)
        computed.append(out is not before)
        return out
    monkeypatch.setattr(SharedInputs, "contribution", counting)
    shared_hooks = engine_mod.input_hooks
    for shared in (True, False):
        if not shared:        # one SharedInputs per hook: every matrix computes its own
            monkeypatch.setattr(engine_mod, "input_hooks", lambda targets, gram, on_read=None: {
                n: h for t in targets if t.kind != "expert" for n, h in shared_hooks([t], gram, on_read).items()})
        got, computed[:] = {}, []

        def process(l, targets, stats, got=got):
            got[l] = stats
            return True
        _engine(tiny_model("mixtral"), calib, select=lambda t: t.kind != "expert", gram=True).run(process)
        runs[shared] = (got, sum(computed), len(computed))
    (got, n_shared, calls), (ref, n_own, _) = runs[True], runs[False]
    layers = len(got)
    assert n_own == calls and n_shared == calls - 2 * 3 * layers        # k and v reuse q's, per sample
    for l, stats in got.items():
        assert set(stats) == set(ref[l]) and any(n.endswith("q_proj") for n in stats)
        for name, st in stats.items():
            assert torch.equal(st.sq, ref[l][name].sq) and torch.equal(st.gram, ref[l][name].gram), name
            assert (st.ncalls, st.ntokens) == (ref[l][name].ncalls, ref[l][name].ntokens)


def test_shared_inputs_recompute_a_changed_or_different_tensor():
    from stun_exp.pruning.weights.stats import SharedInputs
    cache, x = SharedInputs(), torch.randn(2, 5, 4)
    first = cache.contribution(x, 4, gram=True)
    assert cache.contribution(x, 4, gram=True) is first                 # the same tensor: reused
    assert torch.equal(first[1], (x.reshape(-1, 4) ** 2).sum(0))
    assert torch.equal(first[2], x.reshape(-1, 4).T @ x.reshape(-1, 4))
    x.mul_(2)                                                           # changed in place
    again = cache.contribution(x, 4, gram=True)
    assert again is not first and torch.equal(again[1], (x.reshape(-1, 4) ** 2).sum(0))
    y = x.clone()                                                       # equal values, another tensor
    assert cache.contribution(y, 4, gram=True) is not again
    assert cache.contribution(y, 4, gram=False)[2] is None               # what was asked for
    with torch.inference_mode():                                        # no version counter: never reused
        z = torch.randn(3, 4)
    assert cache.contribution(z, 4, gram=False) is not cache.contribution(z, 4, gram=False)


def test_nan_weights_raise_data_error_naming_module():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="layer 1 module .*o_proj"):
        _engine(model, tiny_input(2, 8)).run(lambda l, t, s: False)


def test_nan_activations_raise_data_error():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(DataError, match="layer 0"):
        _engine(model, tiny_input(2, 8)).run(lambda l, t, s: False)


def test_capture_keeps_rotary_kwargs():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    cap = capture_inputs(model, adapter.layers, tiny_input(2, 8), torch.device("cpu"))
    assert cap.hidden.shape == (2, 8, 32)
    kw = cap.layer_args[0][1]
    assert "position_embeddings" in kw and kw["position_embeddings"][0].shape[-2] == 8
    assert not hasattr(adapter.layers[0], "forward") or "forward" not in adapter.layers[0].__dict__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_matches_cpu_and_offloads_layers():
    """Model on CPU, one layer at a time on the GPU: same Wanda masks as an all-CPU run."""
    from stun_exp.context import RunContext
    from stun_exp.pruning.weights.pruners import UnstructuredPruner
    masks = []
    for dev in ("cpu", "cuda"):
        model = tiny_model("mixtral")
        ctx = RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model),
                         calib=tiny_input(4, 16), device=torch.device(dev))
        UnstructuredPruner(score="wanda", name="wanda").prune(ctx, sparsity=0.5)
        assert all(p.device.type == "cpu" for p in model.parameters())
        masks.append([p.detach() == 0 for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def _wanda_half(collected):
    """A pruning pass's callback: Wanda 50 % on every target, statistics kept for comparison."""
    def process(l, targets, stats):
        collected[l] = stats
        for t in targets:
            apply_mask_(t.weight, row_mask(wanda_score(t.weight, stats[t.name].sq), 0.5))
        return True
    return process


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "olmoe", "arctic"])
def test_pruning_pass_skipping_expert_outputs_changes_no_statistic_or_weight(arch):
    """final=True (the pass that prunes) lets the observe forward skip the routed experts' down
    projections; every statistic and every pruned weight equals the pass that computes them."""
    calib = tiny_input(4, 12)
    got, models, engines = {}, {}, {}
    for final in (False, True):
        models[final] = tiny_model(arch)
        got[final] = {}
        engines[final] = SequentialEngine(models[final], get_adapter(models[final]), calib, torch.device("cpu"),
                                          lambda t: True, final=final)
        engines[final].run(_wanda_half(got[final]))
    assert engines[False].partial_layers == 0
    for l, stats in got[False].items():
        for name, st in stats.items():
            other = got[True][l][name]
            assert torch.equal(st.sq, other.sq), (arch, l, name)
            assert (st.gsq is None) == (other.gsq is None) and (st.gsq is None or torch.equal(st.gsq, other.gsq))
            assert (st.ncalls, st.ntokens, st.nblock) == (other.ncalls, other.ntokens, other.nblock)
    for (n, a), b in zip(models[False].state_dict().items(), models[True].state_dict().values()):
        assert torch.equal(a, b), (arch, n)
    # skipped where the routed experts run last in the layer; never where a targeted matrix reads its
    # input after them (a shared expert after the routed ones) or the experts are a ModuleList
    expect_skip = arch in ("mixtral", "gpt_oss", "olmoe")
    assert (engines[True].partial_layers > 0) == expect_skip, (arch, engines[True].partial_layers)


def test_a_pruning_pass_that_changes_nothing_still_propagates_complete_outputs():
    """With outputs skipped in observe, a layer whose process changed nothing is re-run: the next
    layer still sees the model's own hidden states."""
    model = tiny_model("mixtral")
    calib = tiny_input(3, 10)
    seen = {}
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, a, kw: seen.setdefault("h", []).append((a[0] if a else kw["hidden_states"]).clone()),
        with_kwargs=True)
    with torch.no_grad():
        for j in range(3):
            model(input_ids=calib[j:j + 1])
    hook.remove()
    eng = SequentialEngine(model, get_adapter(model), calib, torch.device("cpu"), lambda t: True, final=True)
    got = []
    orig = eng._forward

    def spy(layer, h, args, as_kw):
        if layer is model.model.layers[1]:
            got.append(h.clone())
        return orig(layer, h, args, as_kw)
    eng._forward = spy
    eng.run(lambda l, t, s: False)
    assert eng.partial_layers == 2
    for j in range(3):
        assert torch.equal(got[j], seen["h"][j])


def test_gate_weighted_sums_only_when_asked_and_nothing_else_changes():
    """weighted=False (every score but MoE-Pruner's) skips the gate-weighted expert sums: gsq is
    None, never a silent stand-in; sq and the counts are those of the weighted pass."""
    calib = tiny_input(3, 10)
    got = {}
    for weighted in (True, False):
        model = tiny_model("mixtral")
        got[weighted] = {}
        SequentialEngine(model, get_adapter(model), calib, torch.device("cpu"), lambda t: True,
                         weighted=weighted).run(lambda l, t, s, w=weighted: got[w].update(s) or False)
    experts = [n for n in got[True] if got[True][n].gsq is not None]
    assert experts and all(got[False][n].gsq is None for n in experts)
    for n, st in got[True].items():
        assert torch.equal(st.sq, got[False][n].sq) and st.ncalls == got[False][n].ncalls
