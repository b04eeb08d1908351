"""OWL's expert running mean counts samples as STUN's Mixtral code does (``owl_expert_samples``).

STUN's Mixtral modelling code calls every expert on every MoE block call, an expert without tokens
on an empty batch, and Wanda's ``WrappedGPT.add_batch`` counts each call as one sample of its
running mean of x^2. The naive loop below does exactly that on the Arctic-like model with its MoE
forward replaced by the call-every-expert loop; calibration sequence 0 repeats one token, so every
token of it goes to the same two experts and the other experts get no token in that sequence.
"""
import types

import numpy as np
import pytest
import torch
from torch import nn

from stun_exp.context import RunContext
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from stun_exp.pruning.weights import configs as C
from stun_exp.pruning.weights.pruners import UnstructuredPruner
from tests.tiny_models import tiny_input, tiny_model

M, LAM, S = 2.0, 0.1, 0.5


def _calib() -> torch.Tensor:
    calib = tiny_input(6, 16)
    calib[0] = calib[0, 0]
    return calib


def _call_every_expert(self, x):
    """The STUN Mixtral block loop: every expert runs on every call, with or without tokens."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float)
    w, idx = torch.topk(probs, self.top_k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(len(self.experts)):
        tok, pos = torch.where(idx == e)
        out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, pos, None])
    return out.reshape(shape)


def _reference_ratios(model, calib):
    """Per-layer OWL outlier ratios and layer sparsities with add_batch's running mean, plus the
    number of (expert, sequence) pairs in which an expert got no token."""
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        if getattr(moe, "is_moe_layer", True) and hasattr(moe, "experts"):
            moe.forward = types.MethodType(_call_every_expert, moe)
    inps, empty_calls, d = [], 0, []
    h = model.model.layers[0].register_forward_pre_hook(lambda m, a: inps.append(a[0].detach().clone()))
    with torch.no_grad():
        for j in range(calib.shape[0]):
            model(input_ids=calib[j:j + 1])
    h.remove()
    for layer in model.model.layers:
        lin = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        mean = {n: torch.zeros(m.in_features) for n, m in lin.items()}
        calls = {n: 0 for n in lin}

        def hook(name, mean=mean, calls=calls):
            def f(mod, args, out):
                nonlocal empty_calls
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                empty_calls += int(x.shape[0] == 0 and name.endswith("w1"))
                mean[name] *= calls[name] / (calls[name] + 1)
                calls[name] += 1
                mean[name] += (x ** 2).sum(0) / calls[name]
            return f
        hs = [m.register_forward_hook(hook(n)) for n, m in lin.items() if "gate" != n.split(".")[-1]]
        with torch.no_grad():
            inps = [layer(x) for x in inps]
        for hk in hs:
            hk.remove()
        a = torch.cat([(lin[n].weight.abs() * mean[n].sqrt()[None]).flatten() for n in lin if calls[n]])
        d.append(float((a > a.mean() * M).sum()) / a.numel() * 100)
    r = np.array(d)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * LAM * 2)
    return d, list(S - (r - r.mean())), empty_calls


def _ours(per: str):
    model = tiny_model("arctic")
    ctx = RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model), calib=_calib(),
                     device=torch.device("cpu"))
    pruner = UnstructuredPruner(score="wanda", allocation="owl", name="owl", owl_m=M, owl_lambda=LAM, prune_router=False, owl_expert_samples=per)
    return pruner.prune(ctx, sparsity=S)


def test_block_calls_match_the_reference_running_mean():
    d_ref, s_ref, empty = _reference_ratios(tiny_model("arctic"), _calib())
    assert empty > 0                                   # the case is exercised
    block, routed = _ours("block_calls"), _ours("routed_calls")
    assert block["zero_token_expert_count"] == 0       # every expert got tokens in some sequence
    assert block["owl"]["expert_samples"] == "block_calls"
    assert block["owl"]["outlier_ratios"] == pytest.approx(d_ref, abs=1e-9)
    assert block["owl"]["layer_sparsity"] == pytest.approx(s_ref, abs=1e-9)
    # the other normalisation scales the partly routed experts' scores up: a different statistic
    assert routed["owl"]["outlier_ratios"] != pytest.approx(d_ref, abs=1e-9)


def test_default_and_validation():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stun_exp.run import CONF_DIR
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        node = compose(config_name="config", overrides=["unstructured_pruner=owl"]).unstructured_pruner
    assert node.owl_expert_samples == "block_calls"
    with pytest.raises(ConfigError, match="owl_expert_samples"):
        C.UnstructuredConfig(allocation="owl", sparsity=0.5, owl_m=5.0, owl_lambda=0.08, owl_weighting="uniform",
                             owl_expert_samples="per_token").validate()
    assert OmegaConf.to_object(node).owl_m == 5.0
