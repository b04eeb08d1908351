"""``expert_pruner=router_change``: Chowdhury et al., ICML 2024 (nowazrabbani/MoE_Pruning).

Experts whose router vector changed least during fine-tuning are pruned. With w⁰ the pretrained and
wᵀ the fine-tuned router row of expert s:

* ``norm_diff`` (default, the authors' code): Δ_s = ‖wᵀ_s‖₂ − ‖w⁰_s‖₂ (signed);
* ``diff_norm``: Δ_s = ‖wᵀ_s − w⁰_s‖₂.

The smallest Δ are removed. ``removal=zero_output`` (default) is the authors' semantics: the router is
untouched and pruned experts output zero, with no renormalisation; ``slice_router`` drops the rows.
The code prunes the same count in every layer (``scope=layer``); ``global`` is our extension.
Zero forward passes. ``pretrained_path``: a HF model directory (loaded on CPU, fp32) or a torch file
mapping layer index (int or str) -> router weight [E, H].
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from stun_exp.errors import ConfigError
from stun_exp.pruning.expert.common import ConfiguredPruner, router_weights, routing_groups, timed
from stun_exp.pruning.expert.configs import RouterChangeConfig
from stun_exp.models.plan import ExpertPlan
from stun_exp.pruning.expert.selection import select

KEY = "expert_pruner.pretrained_path"


def router_delta(tuned: torch.Tensor, pretrained: torch.Tensor, delta: str = "norm_diff") -> torch.Tensor:
    """Per-expert Δ from [E, H] fine-tuned and pretrained router weights (fp64)."""
    t, p = tuned.double(), pretrained.double()
    if delta == "norm_diff":
        return t.norm(dim=1) - p.norm(dim=1)
    if delta == "diff_norm":
        return (t - p).norm(dim=1)
    raise ValueError(f"unknown delta {delta!r}; known: norm_diff, diff_norm")


def load_pretrained_routers(path: str, layers: list[int]) -> dict[int, torch.Tensor]:
    """Router weights of the pre-fine-tuning model (see module doc for the two accepted forms)."""
    if not os.path.exists(path):
        raise ConfigError(KEY, path, "an existing HF model directory or torch file")
    if os.path.isdir(path):
        from stun_exp.models.adapter import get_adapter
        from stun_exp.models.loading import load_pretrained
        model, _ = load_pretrained(path, dtype=torch.float32, device="cpu")
        return router_weights(get_adapter(model))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for l in layers:
        t = raw.get(l, raw.get(str(l)))
        if t is None:
            raise ConfigError(KEY, path, f"a file holding the router weight of every MoE layer ({layers}); "
                              f"layer {l} is missing")
        out[l] = torch.as_tensor(t).float()
    return out


def check_shapes(tuned: Mapping[int, torch.Tensor], pre: Mapping[int, torch.Tensor], path: str) -> None:
    for l, w in tuned.items():
        p = pre.get(l)
        if p is None or tuple(p.shape) != tuple(w.shape):
            got = None if p is None else tuple(p.shape)
            raise ConfigError(KEY, path, f"a checkpoint of the same architecture: layer {l} router is "
                              f"{tuple(w.shape)} here but {got} in the pretrained model")


class RouterChangePruner(ConfiguredPruner):
    """Built by ``hydra.utils.instantiate(cfg.expert_pruner)``; fields as in ``RouterChangeConfig``."""

    def __init__(self, **fields: Any) -> None:
        self.cfg = RouterChangeConfig(**fields)

    def plan(self, ctx: Any) -> ExpertPlan:
        cfg, a = self.cfg, ctx.adapter
        if not cfg.pretrained_path:
            raise ConfigError(KEY, cfg.pretrained_path, "the path of the model BEFORE fine-tuning "
                              "(set expert_pruner.pretrained_path or model.pretrained_path)")
        cfg.validate(a.model_info())
        layers = list(a.moe_layers)
        meta: dict[str, Any] = {"scope": cfg.scope, "delta": cfg.delta, "pretrained_path": cfg.pretrained_path}
        with timed(meta):
            tuned = router_weights(a)
            pre = load_pretrained_routers(cfg.pretrained_path, layers)
            check_shapes(tuned, pre, cfg.pretrained_path)
            scores = {l: router_delta(tuned[l], pre[l], cfg.delta) for l in layers}
            keep = select(scores, cfg.expert_sparsity, a.top_k, cfg.scope, routing_groups(a))
        meta.update(scores={str(l): [float(x) for x in s] for l, s in scores.items()},
                    forward_passes={"full_model_forwards": 0, "moe_block_forwards": 0})
        return ExpertPlan.from_keep("router_change", {l: a.num_experts(l) for l in layers}, keep,
                                    cfg.removal, **meta)
