"""MoE adapter: the one interface pruners use to reach routers, experts and routing.

Pruners never mention module paths; they ask the adapter. Architecture support is data
(see ``arch_table.py``): one ``ArchSpec`` entry per model class.

PUBLIC API (a contract used by observe/, pruning/ and analysis/; keep the names):

    adapter = get_adapter(model)            # raises ConfigError naming supported archs
    adapter.spec                            # ArchSpec of this model class
    adapter.layers                          # nn.ModuleList of decoder layers
    adapter.moe_layers                      # list[int]: decoder-layer indices that hold a MoE block
    adapter.top_k                           # int
    adapter.num_experts(l)                  # int, current count in layer l (per-layer after pruning)
    adapter.moe_block(l)                    # nn.Module
    adapter.router_weight(l)                # Tensor [E_l, H] (the live parameter data; rows = experts)
    adapter.router_logits(l, h)             # h [N, H] -> logits [N, E_l] exactly as the model computes them
    adapter.route(l, logits)                # -> (ids [N, k] long, weights [N, k] float32): the model's own rule
    adapter.expert(l, e)                    # -> {"gate": [I,H], "up": [I,H], "down": [H,I]} rows = output
                                            #    features; views of the storage where the layout allows,
                                            #    so in-place ops (mask.mul_) write through
    adapter.set_expert(l, e, gate=None, up=None, down=None)   # write back (copies into storage)
    adapter.moe_forward(l, h, drop=None)    # h [N,H] -> MoE block output [N,H]; `drop` = expert ids whose
                                            #    router logits are masked out (softmax over survivors)
    adapter.linear_targets(l)               # -> list[Target]: every prunable 2-D weight in decoder layer l
    adapter.model_info()                    # -> ModelInfo (counts needed for validation/sparsity ledger)

Extras (not part of the frozen contract): ``adapter.router(l)``, ``adapter.experts(l)``,
``adapter.expert_hidden(l, e, x)`` (input of down for tokens x), ``adapter.pruned_experts(l)``
(zero_output-pruned ids), ``route(l, logits, drop=...)``, ``model_info_from_config(config)``.

Surgery lives in ``surgery.py``: ``apply_plan(adapter, plan)``, ``remove_experts``, ``merge_experts``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, closest
from .arch_table import (ARCH_SPECS, CLASS_TO_SPEC, DENSE_SPEC, EXPERT_COUNT_KEYS, SUPPORTED_CLASSES, ArchSpec,
                         is_moe_layer)
from .routing import RouteParams
from .routing import route as _route


@dataclass
class Target:
    """One prunable weight matrix in a decoder layer.

    kind: "attention" | "router" | "shared_expert" | "dense_mlp" | "expert"
    For kind == "expert": expert = original-position index in the current layer, matrix in
    {"gate", "up", "down"}; ``weight`` is a view (rows = output features).
    For nn.Linear targets ``module`` is the Linear (its inputs can be hooked).
    """
    name: str
    kind: str
    weight: torch.Tensor
    module: Optional[nn.Module] = None
    expert: Optional[int] = None
    matrix: Optional[str] = None


from stun_exp.models.info import ModelInfo  # noqa: E402  (torch-free; re-exported)


# Config attributes written by surgery (unknown attributes round-trip through config.json).
PER_LAYER_KEY = "num_experts_per_layer"      # list over decoder layers: count, or None (dense layer)
PRUNED_KEY = "pruned_experts_per_layer"      # zero_output: {"<layer>": [original ids whose output is 0]}
REMOVAL_KEY = "expert_removal"               # "slice_router" | "zero_output"
ORIGINAL_KEY = "num_experts_original"        # expert count before any surgery


def _get_path(root: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), root) if path else root


def spec_for_class_names(names: Sequence[str], what: str) -> ArchSpec:
    """First ArchSpec matching any of `names` (a class MRO or config.architectures), else ConfigError."""
    for n in names:
        if n in CLASS_TO_SPEC:
            return CLASS_TO_SPEC[n]
    shown = names[0] if names else "?"
    raise ConfigError("model architecture", shown, SUPPORTED_CLASSES,
                      hint=f"{what}; add an ArchSpec entry to stun_exp/models/arch_table.py "
                           f"(plus a tiny model in tests/tiny_models.py){closest(shown, SUPPORTED_CLASSES)}")


def spec_for_model(names: Sequence[str], config: Any, what: str) -> ArchSpec:
    """The ArchSpec of a model class (MRO names) and its config; ``DENSE_SPEC`` for a dense decoder."""
    if not any(n in CLASS_TO_SPEC for n in names) and _is_dense_config(config):
        return DENSE_SPEC
    return spec_for_class_names(names, what)


def _is_dense_config(config: Any) -> bool:
    """A causal-LM config with no routed-expert count (a dense decoder)."""
    return not any(int(getattr(config, k, 0) or 0) > 0 for k in EXPERT_COUNT_KEYS)


def _is_dense_model(model: nn.Module) -> bool:
    """Llama-family layout: model.layers[i] with self_attn and an mlp that holds no experts."""
    try:
        layers = _get_path(model, DENSE_SPEC.layers_path)
    except AttributeError:
        return False
    return isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        hasattr(l, DENSE_SPEC.attention_attr) and hasattr(l, DENSE_SPEC.moe_attr)
        and not hasattr(getattr(l, DENSE_SPEC.moe_attr), DENSE_SPEC.experts_attr) for l in layers)


def _config_experts(config: Any, spec: ArchSpec) -> int:
    return int(getattr(config, spec.experts_key))


# Router modules copy these config values at init; the module's copy is what its forward uses.
_ROUTER_ATTR = {"norm_topk_prob": "norm_topk_prob", "routed_scaling_factor": "routed_scaling_factor",
                "n_group": "num_group", "topk_group": "topk_group", "topk_method": "topk_method",
                "router_jitter_noise": "router_jitter_noise", "num_experts_per_tok": "top_k"}


def _read(config: Any, router: nn.Module | None, key: str, default: Any = None) -> Any:
    attr = _ROUTER_ATTR.get(key)
    if router is not None and attr and hasattr(router, attr):
        return getattr(router, attr)
    return getattr(config, key, default)


def _route_params(spec: ArchSpec, config: Any, router: nn.Module | None) -> RouteParams:
    """The routing numbers of one layer (router module attributes first, then the config)."""
    r = spec.routing
    renorm = bool(_read(config, router, r.renorm, False)) if isinstance(r.renorm, str) else bool(r.renorm)
    use_groups = r.group is not None and (
        r.group_method_key is None or _read(config, router, r.group_method_key) == r.group_method)
    bias = getattr(router, r.correction_bias, None) if (router is not None and r.correction_bias) else None
    return RouteParams(
        top_k=r.fixed_top_k or int(_read(config, router, spec.topk_key)),
        renorm=renorm,
        scaling=float(_read(config, router, r.scaling_key, 1.0) or 1.0) if r.scaling_key else 1.0,
        n_group=int(_read(config, router, r.n_group_key, 1) or 1) if r.group else 1,
        topk_group=int(_read(config, router, r.topk_group_key, 1) or 1) if r.group else 1,
        use_groups=use_groups,
        jitter_eps=float(_read(config, router, r.jitter_key, 0.0) or 0.0) if r.jitter_key else 0.0,
        correction_bias=bias,
    )


def model_info_from_config(config: Any) -> ModelInfo:
    """Static facts from a PretrainedConfig alone (no weights): used to validate runs before loading."""
    names = list(getattr(config, "architectures", None) or [])
    mt = getattr(config, "model_type", None)
    if mt in ARCH_SPECS:
        names.append(ARCH_SPECS[mt].class_names[0])
    if not any(n in CLASS_TO_SPEC for n in names) and _is_dense_config(config):
        return _dense_info(config, names)
    spec = spec_for_class_names(names, f"config model_type={mt!r}")
    n_layers = int(config.num_hidden_layers)
    per_layer = getattr(config, PER_LAYER_KEY, None)
    moe = [i for i in range(n_layers) if is_moe_layer(spec, config, i)]
    counts = {i: int(per_layer[i]) if per_layer and per_layer[i] is not None else _config_experts(config, spec)
              for i in moe}
    p = _route_params(spec, config, None)
    return ModelInfo(
        arch=spec.name, num_layers=n_layers, moe_layers=moe, experts_per_layer=counts, top_k=p.top_k,
        hidden_size=int(config.hidden_size),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", 0) or 0),
        n_group=p.n_group if p.use_groups or spec.routing.group == "top2sum" else 1,
        extra={"layout": spec.layout, "score": spec.routing.score, "renorm": p.renorm,
               "routed_scaling_factor": p.scaling, "topk_group": p.topk_group,
               "shared_experts": bool(spec.shared_attrs),
               "vocab_size": getattr(config, "vocab_size", None),
               "experts_original": int(getattr(config, ORIGINAL_KEY, None) or _config_experts(config, spec)),
               "removal": getattr(config, REMOVAL_KEY, None),
               "pruned_experts": {int(k): list(v) for k, v in (getattr(config, PRUNED_KEY, None) or {}).items()}},
    )


def _dense_info(config: Any, names: list[str]) -> ModelInfo:
    return ModelInfo(arch=names[0] if names else str(getattr(config, "model_type", "dense")),
                     num_layers=int(config.num_hidden_layers), moe_layers=[], experts_per_layer={}, top_k=0,
                     hidden_size=int(config.hidden_size),
                     max_position_embeddings=int(getattr(config, "max_position_embeddings", 0) or 0),
                     extra={"layout": "dense", "vocab_size": getattr(config, "vocab_size", None)})


class MoEAdapter:
    """Uniform access to routers, experts and routing of one loaded model (see module docstring)."""

    def __init__(self, model: nn.Module, spec: ArchSpec) -> None:
        self.model, self.spec = model, spec
        self.config = model.config

    # ---- structure -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return _get_path(self.model, self.spec.layers_path)

    @property
    def moe_layers(self) -> list[int]:
        out = []
        for i, layer in enumerate(self.layers):
            block = getattr(layer, self.spec.moe_attr, None)
            if block is not None and hasattr(block, self.spec.experts_attr):
                out.append(i)
        return out

    @property
    def top_k(self) -> int:
        if self.spec is DENSE_SPEC:
            return 0
        return self.spec.routing.fixed_top_k or int(getattr(self.config, self.spec.topk_key))

    def moe_block(self, l: int) -> nn.Module:
        block = getattr(self.layers[l], self.spec.moe_attr, None)
        if block is None or not hasattr(block, self.spec.experts_attr):
            raise ConfigError("layer", l, [str(i) for i in self.moe_layers], hint="not a MoE layer")
        return block

    def router(self, l: int) -> nn.Module:
        return getattr(self.moe_block(l), self.spec.router_attr)

    def experts(self, l: int) -> nn.Module:
        return getattr(self.moe_block(l), self.spec.experts_attr)

    def num_experts(self, l: int) -> int:
        ex = self.experts(l)
        return len(ex) if self.spec.layout == "modulelist" else int(ex.gate_up_proj.shape[0])

    def pruned_experts(self, l: int) -> list[int]:
        """Ids whose output is zeroed (zero_output surgery); they still get routed tokens."""
        return list((getattr(self.config, PRUNED_KEY, None) or {}).get(str(l), []))

    # ---- routing ---------------------------------------------------------------------------
    def router_weight(self, l: int) -> torch.Tensor:
        return self.router(l).weight.data

    def route_params(self, l: int) -> RouteParams:
        return _route_params(self.spec, self.config, self.router(l))

    def router_logits(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """Call the model's own router module, so the logits are exactly the model's."""
        out = self.router(l)(h.reshape(-1, h.shape[-1]))
        return out[0] if isinstance(out, tuple) else out

    def route(self, l: int, logits: torch.Tensor, drop: Optional[Sequence[int]] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return _route(logits, self.route_params(l), self.spec.routing, drop)

    # ---- experts ---------------------------------------------------------------------------
    def expert(self, l: int, e: int) -> dict[str, torch.Tensor]:
        """Views (rows = output features) of expert e's gate [I,H], up [I,H], down [H,I]."""
        ex, lay = self.experts(l), self.spec.layout
        if lay == "modulelist":
            g, u, d = (getattr(ex[e], n).weight.data for n in self.spec.modulelist_names)
            return {"gate": g, "up": u, "down": d}
        gu, down = ex.gate_up_proj.data[e], ex.down_proj.data[e]
        if lay == "fused":
            i = gu.shape[0] // 2
            return {"gate": gu[:i], "up": gu[i:], "down": down}
        return {"gate": gu[:, 0::2].T, "up": gu[:, 1::2].T, "down": down.T}   # transposed interleaved

    @torch.no_grad()
    def set_expert(self, l: int, e: int, gate: torch.Tensor | None = None, up: torch.Tensor | None = None,
                   down: torch.Tensor | None = None) -> None:
        views = self.expert(l, e)
        for name, val in (("gate", gate), ("up", up), ("down", down)):
            if val is not None:
                views[name].copy_(val)

    def expert_hidden(self, l: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """Input of expert e's down projection for tokens x [n, H] (act(gate x) * up x, biases included)."""
        ex, lay = self.experts(l), self.spec.layout
        if lay == "modulelist":
            g, u, _ = (getattr(ex[e], n) for n in self.spec.modulelist_names)
            return self._act()(g(x)) * u(x)
        if lay == "fused":
            gu = F.linear(x, ex.gate_up_proj[e])
        else:
            gu = x @ ex.gate_up_proj[e]
        if getattr(ex, "gate_up_proj_bias", None) is not None:
            gu = gu + ex.gate_up_proj_bias[e]
        return ex._apply_gate(gu)

    def expert_output(self, l: int, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's down projection of h [n, I] (bias included)."""
        ex, lay = self.experts(l), self.spec.layout
        if lay == "modulelist":
            return getattr(ex[e], self.spec.modulelist_names[2])(h)
        out = F.linear(h, ex.down_proj[e]) if lay == "fused" else h @ ex.down_proj[e]
        if getattr(ex, "down_proj_bias", None) is not None:
            out = out + ex.down_proj_bias[e]
        return out

    def _act(self):
        from transformers.activations import ACT2FN
        return ACT2FN[getattr(self.config, self.spec.act_key, "silu") or "silu"]

    def shared_output(self, l: int, h: torch.Tensor) -> torch.Tensor | None:
        """Shared-expert contribution for h [N, H] (gated for Qwen2-MoE), or None."""
        block, spec = self.moe_block(l), self.spec
        out = None
        for name in spec.shared_attrs:
            if name == spec.shared_gate_attr:
                continue
            y = getattr(block, name)(h)
            out = y if out is None else out + y
        if out is not None and spec.shared_gate_attr:
            out = torch.sigmoid(getattr(block, spec.shared_gate_attr)(h)) * out
        return out

    def moe_forward(self, l: int, h: torch.Tensor, drop: Optional[Sequence[int]] = None) -> torch.Tensor:
        """MoE block output for h [..., H]; `drop` masks experts out of the routing choice."""
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        ids, w = self.route(l, self.router_logits(l, x), drop)
        w = w if self.spec.routing.weights_fp32 else w.to(x.dtype)
        if self.spec.layout == "modulelist":
            out = torch.zeros_like(x)
            for e in ids.unique().tolist():
                tok, pos = torch.where(ids == e)
                y = self.expert_output(l, e, self.expert_hidden(l, e, x[tok])) * w[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
        else:
            out = self.experts(l)(x, ids, w)
        shared = self.shared_output(l, x)
        return (out if shared is None else out + shared).reshape(shape)

    # ---- targets & info --------------------------------------------------------------------
    def linear_targets(self, l: int) -> list[Target]:
        """Every prunable 2-D weight of decoder layer l, tagged by kind."""
        layer, spec = self.layers[l], self.spec
        pre = f"{spec.layers_path}.{l}"
        out = _linears(getattr(layer, spec.attention_attr), f"{pre}.{spec.attention_attr}", "attention")
        if l not in self.moe_layers:
            return out + _linears(getattr(layer, spec.moe_attr), f"{pre}.{spec.moe_attr}", "dense_mlp")
        for name in spec.dense_attrs:
            if getattr(layer, name, None) is not None:
                out += _linears(getattr(layer, name), f"{pre}.{name}", "dense_mlp")
        mpre = f"{pre}.{spec.moe_attr}"
        router = self.router(l)
        out.append(Target(f"{mpre}.{spec.router_attr}", "router", router.weight.data, router))
        for name in spec.shared_attrs:
            out += _linears(getattr(self.moe_block(l), name), f"{mpre}.{name}", "shared_expert")
        ex = self.experts(l)
        for e in range(self.num_experts(l)):
            for mat, w in self.expert(l, e).items():
                mod = None
                if spec.layout == "modulelist":
                    mod = getattr(ex[e], spec.modulelist_names[("gate", "up", "down").index(mat)])
                out.append(Target(f"{mpre}.{spec.experts_attr}.{e}.{mat}", "expert", w, mod, e, mat))
        return out

    def model_info(self) -> ModelInfo:
        if self.spec is DENSE_SPEC:
            info = _dense_info(self.config, [type(self.model).__name__])
            info.extra["class"] = type(self.model).__name__
            return info
        info = model_info_from_config(self.config)
        info.moe_layers = self.moe_layers
        info.experts_per_layer = {l: self.num_experts(l) for l in info.moe_layers}
        info.extra["class"] = type(self.model).__name__
        return info


def _linears(module: nn.Module, prefix: str, kind: str) -> list[Target]:
    if isinstance(module, nn.Linear):
        return [Target(prefix, kind, module.weight.data, module)]
    return [Target(f"{prefix}.{n}", kind, m.weight.data, m)
            for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for `model`, matched by class name along its MRO (subclasses made by the loader match)."""
    names = [c.__name__ for c in type(model).__mro__]
    if not any(n in CLASS_TO_SPEC for n in names) and _is_dense_model(model):
        return MoEAdapter(model, DENSE_SPEC)
    return MoEAdapter(model, spec_for_class_names(names, f"class {type(model).__name__} is not supported"))
