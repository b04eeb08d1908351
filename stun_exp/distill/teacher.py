"""The KD teacher: the dense model rebuilt from ``ctx.dense_state`` (the runner's CPU copy).

If the student has the dense model's shapes (no expert pruning, or ``zero_output`` surgery) the
teacher is a deep copy of the student with the dense weights loaded. After ``slice_router``
surgery the shapes differ, so the model class is re-instantiated from the student's config with
the surgery keys removed and the original expert count restored, then the dense weights load
strictly (a mismatch raises instead of silently re-initialising).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from stun_exp.models.adapter import ORIGINAL_KEY, PER_LAYER_KEY, PRUNED_KEY, REMOVAL_KEY

_SURGERY_KEYS = (PER_LAYER_KEY, PRUNED_KEY, REMOVAL_KEY, ORIGINAL_KEY)


def _same_shapes(model: nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)


@torch.no_grad()
def build_teacher(model: nn.Module, adapter: Any, dense_state: dict, device: torch.device) -> nn.Module:
    """A frozen, eval-mode dense copy of the model on ``device``."""
    if _same_shapes(model, dense_state):
        teacher = copy.deepcopy(model)
    else:
        cfg = copy.deepcopy(model.config)
        original = getattr(cfg, ORIGINAL_KEY, None)
        for key in _SURGERY_KEYS:
            if hasattr(cfg, key):
                delattr(cfg, key)
        if original is not None:
            setattr(cfg, adapter.spec.experts_key, int(original))
        teacher = type(model)(cfg)
    dtype = next(model.parameters()).dtype
    teacher.load_state_dict({k: v.to(dtype) for k, v in dense_state.items()}, strict=True)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
