"""Wanda and OWL (STUN defaults) give the masks of a reference-style loop on an Arctic-like model.

The loop below re-states, independently, what the STUN authors' layer loop (thnkinbtfly/STUN,
``wanda/`` and ``OWL/``) does: every nn.Linear of each decoder layer is hooked; each hook call is one
"sample" and the statistic is the running mean over calls of sum_t x_tj^2; modules with no call
are skipped (left dense); masks are chosen per output row, floor(C_in * r) lowest, stable sort;
the layer is re-run after pruning. OWL adds a dense pass computing the outlier ratio of the
pooled scores of the non-skipped modules and the layer ratios S - (D~ - mean D~).
"""
import numpy as np
import pytest
import torch
from torch import nn

from stun_exp.context import RunContext
from stun_exp.models.adapter import get_adapter
from stun_exp.pruning.weights.pruners import UnstructuredPruner
from tests.tiny_models import tiny_input, tiny_model


def _layer0_inputs(model, calib):
    xs = []
    h = model.model.layers[0].register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().clone()))
    with torch.no_grad():
        for j in range(calib.shape[0]):
            model(input_ids=calib[j:j + 1])
    h.remove()
    return xs


def _layer_scores(layer, inps):
    """Run the layer over the samples with running-mean hooks; return ({name: score}, outputs)."""
    lin = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    mean = {n: torch.zeros(m.in_features) for n, m in lin.items()}
    calls = {n: 0 for n in lin}

    def hook(name):
        def f(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            calls[name] += 1
            mean[name] = mean[name] * (calls[name] - 1) / calls[name] + (x ** 2).sum(0) / calls[name]
        return f
    hs = [m.register_forward_hook(hook(n)) for n, m in lin.items()]
    with torch.no_grad():
        outs = [layer(x) for x in inps]
    for h in hs:
        h.remove()
    return {n: lin[n].weight.detach().abs() * mean[n].sqrt()[None] for n in lin if calls[n]}, outs, lin


def _reference(model, calib, ratios):
    inps = _layer0_inputs(model, calib)
    for i, layer in enumerate(model.model.layers):
        scores, _, lin = _layer_scores(layer, inps)
        for n, sc in scores.items():
            k = int(sc.shape[1] * ratios[i])
            idx = torch.sort(sc, dim=-1, stable=True).indices[:, :k]
            with torch.no_grad():
                lin[n].weight.scatter_(1, idx, 0.0)
        with torch.no_grad():
            inps = [layer(x) for x in inps]


def _reference_owl_ratios(model, calib, s, m, lam):
    inps, d = _layer0_inputs(model, calib), []
    for layer in model.model.layers:
        scores, inps, _ = _layer_scores(layer, inps)
        a = torch.cat([v.flatten() for v in scores.values()])
        d.append(float((a > a.mean() * m).sum()) / a.numel() * 100)
    d = np.array(d)
    d = (d - d.min()) * (1 / (d.max() - d.min()) * lam * 2)
    return list(s - (d - d.mean()))


def _ctx(model, calib):
    return RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model), calib=calib,
                      device=torch.device("cpu"))


def _blocked(model):
    """Expert 1 of layer 0 gets no token, so the skip rule is exercised."""
    model.model.layers[0].block_sparse_moe.gate.register_forward_hook(
        lambda m, a, out: out - 1e4 * (torch.arange(out.shape[-1]) == 1).to(out.dtype))
    return model


def test_wanda_matches_reference_loop():
    calib = tiny_input(6, 16)
    ours, ref = _blocked(tiny_model("arctic")), _blocked(tiny_model("arctic"))
    rep = UnstructuredPruner(score="wanda", name="wanda").prune(_ctx(ours, calib), sparsity=0.4)
    _reference(ref, calib, [0.4, 0.4])
    assert rep["zero_token_expert_count"] == 1
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a == 0, b == 0), n


def test_owl_matches_reference_loop():
    calib = tiny_input(6, 16)
    ours, ref = _blocked(tiny_model("arctic")), _blocked(tiny_model("arctic"))
    rep = UnstructuredPruner(score="wanda", allocation="owl", name="owl", owl_m=2.0, owl_lambda=0.1).prune(_ctx(ours, calib), sparsity=0.5)
    ratios = _reference_owl_ratios(ref, calib, 0.5, 2.0, 0.1)
    assert rep["owl"]["layer_sparsity"] == pytest.approx(ratios, abs=1e-9)
    assert max(ratios) - min(ratios) == pytest.approx(0.2)
    _reference(ref, calib, ratios)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a == 0, b == 0), n
