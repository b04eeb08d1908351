"""SparseGPT: sparsity, N:M structure, and lower layer-output error than Wanda."""
import pytest
import torch

from stun_exp.pruning.weights.masks import nm_mask, row_mask
from stun_exp.pruning.weights.scores import wanda_score
from stun_exp.pruning.weights.sparsegpt import sparsegpt_prune


def _layer(seed=0, t=400, cin=64, cout=32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=g) / cin ** 0.5 + torch.eye(cin)
    scale = torch.linspace(0.2, 3, cin)[torch.randperm(cin, generator=g)]
    x = torch.randn(t, cin, generator=g) @ mix * scale  # correlated inputs, uneven column norms
    w = torch.randn(cout, cin, generator=g)
    return x, w


def _err(x, w, w2):
    return float(((x @ w.T - x @ w2.T) ** 2).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_on_output_error(nm):
    x, w = _layer()
    w_sg, mask = sparsegpt_prune(w, x.T @ x, 0.5, nm=nm, blocksize=32)  # two column blocks
    score = wanda_score(w, (x ** 2).sum(0))
    wm = nm_mask(score, *nm) if nm else row_mask(score, 0.5)
    w_wanda = w.masked_fill(wm, 0)
    assert _err(x, w, w_sg) < _err(x, w, w_wanda)
    assert torch.all(w_sg[mask] == 0)
    frac = float((w_sg == 0).float().mean())
    assert abs(frac - 0.5) < 0.005 + 1.0 / w.numel() * 64
    if nm:
        assert torch.all((w_sg == 0).reshape(32, -1, 4).sum(-1) >= 2)


def test_sparsegpt_dead_inputs_and_zero_sparsity():
    x, w = _layer(cin=16, cout=4)
    x[:, 3] = 0
    w_sg, mask = sparsegpt_prune(w, x.T @ x, 0.0)
    assert not mask.any()
    assert torch.all(w_sg[:, 3] == 0)                 # reference: dead input -> column zeroed
    others = [j for j in range(16) if j != 3]
    assert torch.allclose(w_sg[:, others], w[:, others], atol=1e-4)  # no error to propagate
