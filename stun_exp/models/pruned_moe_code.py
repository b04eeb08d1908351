"""Per-layer expert counts for an expert-pruned MoE checkpoint; needs only torch and transformers.

A checkpoint whose MoE layers keep different numbers of experts cannot be built from the one
expert-count field of a stock config. This file travels inside such a checkpoint (as
``modeling_pruned_moe.py``, followed by a few generated lines that subclass the model's own class), so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it anywhere: the subclass
builds the stock model with the largest count, then shrinks every MoE layer to its entry of
``config.num_experts_per_layer`` before the weights are read. The experts kept (or merged) by pruning
are ordinary experts in the weights, stored in order; nothing else about the model changes.

``LAYOUT`` (written with the generated lines) says where a decoder layer's MoE block, router and
experts live: ``layers`` (dotted path from the causal-LM module), ``moe`` (decoder-layer attribute),
``router`` and ``experts`` (block attributes), ``modulelist`` (experts are a ModuleList rather than
stacked 3-D tensors) and ``router_buffers`` (per-expert router tensors besides weight and bias, e.g.
DeepSeek-V3's ``e_score_correction_bias``).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import torch
from torch import nn

PER_LAYER_KEY = "num_experts_per_layer"
# Stacked per-expert tensors of the fused layouts (dim 0 = expert); absent ones are skipped.
EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", "up_proj", "up_proj_bias")
# Integer attributes that hold the expert count and that forward passes read (one-hot sizes, group views).
COUNT_ATTRS = ("num_experts", "out_features")


def _keep_rows(module: nn.Module, name: str, n: int) -> None:
    """Keep the first n rows of parameter / buffer `name` (a parameter stays a parameter)."""
    old = getattr(module, name, None)
    if not isinstance(old, torch.Tensor):
        return
    new = old.data[:n].clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)


@torch.no_grad()
def shrink_block(block: nn.Module, n: int, layout: dict) -> None:
    """Make one MoE block hold n experts: experts, router rows and count attributes."""
    router, experts = getattr(block, layout["router"]), getattr(block, layout["experts"])
    if layout["modulelist"]:
        setattr(block, layout["experts"], nn.ModuleList(list(experts)[:n]))
    else:
        for name in EXPERT_TENSORS:
            _keep_rows(experts, name, n)
    for name in ("weight", "bias", *layout.get("router_buffers", ())):
        _keep_rows(router, name, n)
    for module in (block, router, getattr(block, layout["experts"])):
        for attr in COUNT_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, n)


def block_experts(block: nn.Module, layout: dict) -> int:
    """The number of experts a MoE block holds now."""
    experts = getattr(block, layout["experts"])
    return len(experts) if layout["modulelist"] else int(experts.gate_up_proj.shape[0])


def shrink_to_counts(model: nn.Module, layout: dict, counts: Optional[Sequence[Optional[int]]]) -> None:
    """Shrink every MoE layer l to ``counts[l]`` experts (None = dense layer or unchanged)."""
    layers = functools.reduce(getattr, layout["layers"].split("."), model)
    for l, n in enumerate(counts or []):
        block = getattr(layers[l], layout["moe"], None) if n is not None else None
        if block is None or not hasattr(block, layout["experts"]):
            continue
        have = block_experts(block, layout)
        if n > have:
            raise ValueError(f"layer {l}: config asks for {n} experts but the model builds only {have}")
        if n < have:
            shrink_block(block, n, layout)


def init_pruned(model: nn.Module, config: Any, layout: dict) -> None:
    """What the generated subclass's ``__init__`` runs after the stock ``__init__``."""
    shrink_to_counts(model, layout, getattr(config, PER_LAYER_KEY, None))
