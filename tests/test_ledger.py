"""Sparsity ledger: four denominators and the derived unstructured ratio, on a hand-built layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from stun_exp.analysis import sparsity as ledger
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import Target


class FakeAdapter:
    """One MoE layer: attention 4x4, router E x 4, E experts of three 2x4 / 4x2 matrices."""

    def __init__(self, model, E=4):
        self.model, self.layers, self.moe_layers, self.top_k, self.E = model, [0], [0], 2, E

    def num_experts(self, l):
        return self.E

    def linear_targets(self, l):
        m = self.model
        out = [Target("attn", "attention", m.attn), Target("router", "router", m.router[: self.E])]
        for e in range(self.E):
            for i, name in enumerate(("gate", "up", "down")):
                out.append(Target(f"e{e}.{name}", "expert", m.experts[e, i], expert=e, matrix=name))
        return out


def keep_first(m, a, n):
    """Real removal: the router rows and expert slices beyond n are gone from the model."""
    m.router = nn.Parameter(m.router.data[:n].clone())
    m.experts = nn.Parameter(m.experts.data[:n].clone())
    a.E = n


class FakeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Parameter(torch.ones(4, 4))
        self.router = nn.Parameter(torch.ones(4, 4))
        self.experts = nn.Parameter(torch.ones(4, 3, 2, 4))   # 24 weights per expert
        self.embed = nn.Parameter(torch.ones(10, 4))


def test_census_and_report_count_removed_experts_as_zeros():
    m = FakeModel()
    a = FakeAdapter(m)
    dense = ledger.census(m, a)
    assert dense["decoder_linear_numel"] == 16 + 16 + 96
    assert dense["active_numel"] == (16 + 16 + 96 + 40) - 96 + 2 * 24
    keep_first(m, a, 3)                         # remove expert 3: its router row and 24 expert weights
    now = ledger.census(m, a)
    rep = ledger.sparsity_report(dense, now)
    assert rep["decoder_linear"] == pytest.approx((4 + 24) / 128)
    assert rep["expert"] == pytest.approx(0.25)
    assert rep["all_params"] == pytest.approx(1 - (168 - 28) / 168)
    assert rep["active_params"] == pytest.approx(4 / 120)   # only the router row: experts stay whole


def test_derived_ratio_lands_the_total():
    m = FakeModel()
    a = FakeAdapter(m)
    dense = ledger.census(m, a)
    keep_first(m, a, 3)
    is_expert = lambda t: t.kind == "expert"    # noqa: E731
    split = ledger.derive_unstructured_ratio(0.5, dense, a, is_expert)
    r = split["unstructured_ratio"]
    # apply r to the 72 surviving expert weights and check the total is exactly 50%
    zeros = round(r * 72)
    with torch.no_grad():
        m.experts.view(-1)[:zeros] = 0
    now = ledger.census(m, a)
    assert ledger.sparsity_report(dense, now)["decoder_linear"] == pytest.approx(0.5, abs=0.5 / 128)
    assert split["structured_share"] == pytest.approx(28 / 128)


def test_unreachable_targets_are_config_errors():
    m = FakeModel()
    a = FakeAdapter(m)
    dense = ledger.census(m, a)
    keep_first(m, a, 1)
    with pytest.raises(ConfigError, match="expert pruning alone"):
        ledger.derive_unstructured_ratio(0.1, dense, a, lambda t: True)
    with pytest.raises(ConfigError, match="unstructured scope"):
        ledger.derive_unstructured_ratio(0.99, dense, a, lambda t: t.kind == "attention")


def test_mask_digest_hashes_each_targets_header_and_zero_bits_in_order():
    import numpy as np
    import xxhash
    m = FakeModel()
    a = FakeAdapter(m)
    m.experts.data[1, 2, 0, 1] = 0.0
    h = xxhash.xxh3_128()
    for t in a.linear_targets(0):
        h.update(f"0:{t.name}:{tuple(t.weight.shape)}".encode())
        h.update(np.packbits([float(v) == 0.0 for v in t.weight.flatten().tolist()]).tobytes())
    assert ledger.mask_digest(a) == h.hexdigest()[:16]
    m.experts.data[1, 2, 0, 1] = 1.0            # one entry less at zero: another digest
    assert ledger.mask_digest(a) != h.hexdigest()[:16]
