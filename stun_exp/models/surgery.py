"""Expert surgery: remove or merge experts of one MoE layer, keep the config consistent.

Two removal semantics (recorded in ``config.expert_removal``):

``slice_router``  router rows (and biases / DeepSeek correction bias) and expert slices are dropped;
                  top-k runs over the survivors. The layer's expert count changes, so counts go to
                  ``config.num_experts_per_layer`` and ``loading.load_pretrained`` rebuilds the shapes.
                  For renormalised routers, tokens whose top-k avoided the removed experts are
                  unaffected; for non-renormalised softmax (OLMoE, Qwen with norm_topk_prob=False,
                  DeepSeek-V2) the softmax denominator changes, so every token's gate weights change.
``zero_output``   router untouched; the pruned experts' weights (and biases) are set to zero, so they
                  still receive tokens (and gate weight) but contribute exactly zero. No shapes change,
                  the model reloads with any loader; ids go to ``config.pruned_experts_per_layer``.
                  No renormalisation over survivors is done (that would be a different method).

Merging (STUN reconstruction, ``ExpertPlan`` with a null representative): a group's experts and
router rows (biases too) are averaged, uniformly or with given weights (a plan's optional
``merge_weights``; weights summing to 0 give a zero expert and router row). Under zero_output a merged
group's average is written into every member's slot (router untouched, so tokens routed to any
member now reach the merged expert) and non-representative members of a kept group are zeroed.
A plan's optional ``permutations`` reorder a member's intermediate neurons (gate/up rows, down
columns, gate/up biases) before averaging (``permute_expert``); that leaves the expert's function
unchanged.

Group-limited routers (DeepSeek ``n_group`` > 1) assign experts to groups by position, so
``slice_router`` must keep the same number of experts in every original group (else ConfigError);
survivors are ordered by original group (stable), which keeps every expert in its group.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .plan import ExpertPlan
from .adapter import ORIGINAL_KEY, PER_LAYER_KEY, PRUNED_KEY, REMOVAL_KEY, MoEAdapter

SEMANTICS = ("slice_router", "zero_output")
_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", "up_proj", "up_proj_bias")
Source = tuple[list[int], Optional[list[float]]]   # member ids, averaging weights (None = uniform)


# ---- pure helpers ------------------------------------------------------------------------------
def _combine(t: torch.Tensor, members: list[int], weights: Optional[list[float]]) -> torch.Tensor:
    """Row-combination of t[members] (dim 0). A singleton is an exact copy."""
    if len(members) == 1:
        return t[members[0]].clone()
    w = torch.tensor(weights if weights is not None else [1.0] * len(members), dtype=torch.float32)
    if w.sum() == 0:
        return torch.zeros_like(t[members[0]])
    w = (w / w.sum()).to(t.device)
    stacked = t[members].float()
    return torch.einsum("m,m...->...", w, stacked).to(t.dtype)


def _rebuild_tensor(t: torch.Tensor, sources: list[Source]) -> torch.Tensor:
    return torch.stack([_combine(t, m, w) for m, w in sources])


# ---- validation ----------------------------------------------------------------------------------
def _check_ids(adapter: MoEAdapter, l: int, ids: Sequence[int], what: str) -> None:
    n = adapter.num_experts(l)
    bad = [i for i in ids if not 0 <= int(i) < n]
    if bad:
        raise ConfigError(f"{what} (layer {l})", bad, f"expert ids in [0, {n})")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{what} (layer {l})", list(ids), "each expert id at most once")


def _check_count(adapter: MoEAdapter, l: int, n_new: int) -> None:
    k = adapter.top_k
    if n_new < k:
        raise ConfigError(f"experts kept in layer {l}", n_new, f">= top_k = {k} experts",
                          hint="the router must still be able to pick top_k distinct experts")


def _group_order(adapter: MoEAdapter, l: int, sources: list[Source]) -> list[Source]:
    """For group-limited routers: equal survivors per original group, ordered by group."""
    p = adapter.route_params(l)
    grouped = p.n_group > 1 and (p.use_groups or adapter.spec.routing.group == "top2sum")
    if not grouped:
        return sources
    per = adapter.num_experts(l) // p.n_group
    gid = []
    for members, _ in sources:
        gs = {m // per for m in members}
        if len(gs) != 1:
            raise ConfigError(f"merge group (layer {l})", members,
                              f"members of one routing group (n_group={p.n_group}, {per} experts each)")
        gid.append(gs.pop())
    counts = [gid.count(g) for g in range(p.n_group)]
    if len(set(counts)) != 1:
        raise ConfigError(f"experts kept per routing group (layer {l})", counts,
                          f"the same count in each of the n_group={p.n_group} groups",
                          hint="DeepSeek group routing assigns experts to groups by position")
    need = 2 if adapter.spec.routing.group == "top2sum" else 1
    if counts[0] < need or counts[0] * p.topk_group < adapter.top_k:
        raise ConfigError(f"experts kept per routing group (layer {l})", counts[0],
                          f">= {need} and >= top_k/topk_group = {adapter.top_k}/{p.topk_group}")
    order = sorted(range(len(sources)), key=lambda i: gid[i])
    return [sources[i] for i in order]


# ---- structural rebuild (slice_router) ---------------------------------------------------------
@torch.no_grad()
def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, name, value)   # a registered buffer stays a buffer


@torch.no_grad()
def rebuild_layer(adapter: MoEAdapter, l: int, sources: list[Source]) -> None:
    """Replace layer l's experts by `sources` (each: members averaged) — router rows likewise.

    No validation: ``loading`` also calls it to shrink freshly built layers.
    """
    spec, block, router, ex = adapter.spec, adapter.moe_block(l), adapter.router(l), adapter.experts(l)
    n_new = len(sources)
    if spec.layout == "modulelist":
        new = nn.ModuleList()
        for members, w in sources:
            mod = ex[members[0]]
            if len(members) > 1:
                mod = copy.deepcopy(mod)
                for pname, p in mod.named_parameters():
                    stacked = torch.stack([ex[m].get_parameter(pname).data for m in members])
                    p.data = _combine(stacked, list(range(len(members))), w)
            new.append(mod)
        setattr(block, spec.experts_attr, new)
    else:
        for name in _EXPERT_PARAMS:
            t = getattr(ex, name, None)
            if isinstance(t, torch.Tensor):
                _set_param(ex, name, _rebuild_tensor(t.data, sources))
    for name in ("weight", "bias", spec.routing.correction_bias):
        t = getattr(router, name, None) if name else None
        if isinstance(t, torch.Tensor):
            _set_param(router, name, _rebuild_tensor(t.data, sources))
    for mod in (block, router, ex):
        for attr in ("num_experts", "out_features"):
            if hasattr(mod, attr) and isinstance(getattr(mod, attr), int):
                setattr(mod, attr, n_new)


# ---- zero_output ---------------------------------------------------------------------------------
@torch.no_grad()
def _zero_expert(adapter: MoEAdapter, l: int, e: int) -> None:
    ex = adapter.experts(l)
    if adapter.spec.layout == "modulelist":
        for p in ex[e].parameters():
            p.data.zero_()
        return
    for name in _EXPERT_PARAMS:
        t = getattr(ex, name, None)
        if isinstance(t, torch.Tensor):
            t.data[e].zero_()


@torch.no_grad()
def _write_merged(adapter: MoEAdapter, l: int, members: list[int], weights: Optional[list[float]]) -> None:
    """Average of members written into every member slot (zero_output merge, router untouched)."""
    views = [adapter.expert(l, m) for m in members]
    avg = {k: _combine(torch.stack([v[k] for v in views]), list(range(len(members))), weights)
           for k in ("gate", "up", "down")}
    ex = adapter.experts(l)
    biases = {n: _combine(getattr(ex, n).data, members, weights) for n in ("gate_up_proj_bias", "down_proj_bias")
              if isinstance(getattr(ex, n, None), torch.Tensor)}
    for m in members:
        adapter.set_expert(l, m, **avg)
        for n, b in biases.items():
            getattr(ex, n).data[m].copy_(b)


# ---- neuron permutation --------------------------------------------------------------------------
@torch.no_grad()
def permute_expert(adapter: MoEAdapter, l: int, e: int, perm: Sequence[int]) -> None:
    """Reorder expert e's intermediate neurons: new neuron j = old neuron perm[j] (function unchanged)."""
    _check_ids(adapter, l, [e], "permuted expert")
    w = adapter.expert(l, e)
    size = w["gate"].shape[0]
    if sorted(int(x) for x in perm) != list(range(size)):
        raise ConfigError(f"permutation of expert {e} (layer {l})", f"length {len(perm)}",
                          f"a reordering of the {size} intermediate neurons 0..{size - 1}")
    p = torch.as_tensor([int(x) for x in perm], dtype=torch.long, device=w["gate"].device)
    adapter.set_expert(l, e, gate=w["gate"][p].clone(), up=w["up"][p].clone(), down=w["down"][:, p].clone())
    ex, lay = adapter.experts(l), adapter.spec.layout
    if lay == "modulelist":
        for name in adapter.spec.modulelist_names[:2]:
            b = getattr(ex[e], name).bias
            if b is not None:
                b.data.copy_(b.data[p])
        return
    b = getattr(ex, "gate_up_proj_bias", None)
    if isinstance(b, torch.Tensor):
        row = b.data[e]
        parts = (row[0::2], row[1::2]) if lay == "fused_transposed_interleaved" else (row[:size], row[size:])
        for part in parts:
            part.copy_(part[p].clone())


# ---- config bookkeeping --------------------------------------------------------------------------
def _record(adapter: MoEAdapter, semantics: str, l: int, zeroed: Sequence[int] = ()) -> None:
    cfg, spec = adapter.config, adapter.spec
    if getattr(cfg, ORIGINAL_KEY, None) is None:
        setattr(cfg, ORIGINAL_KEY, int(getattr(cfg, spec.experts_key)))
    prev = getattr(cfg, REMOVAL_KEY, None)
    if prev not in (None, semantics):
        raise ConfigError("removal", semantics, [prev], hint="a model keeps one removal semantics")
    setattr(cfg, REMOVAL_KEY, semantics)
    if semantics == "zero_output":
        pruned = dict(getattr(cfg, PRUNED_KEY, None) or {})
        pruned[str(l)] = sorted(set(pruned.get(str(l), [])) | {int(e) for e in zeroed})
        setattr(cfg, PRUNED_KEY, pruned)
        return
    moe = set(adapter.moe_layers)
    counts = [adapter.num_experts(i) if i in moe else None for i in range(len(adapter.layers))]
    setattr(cfg, PER_LAYER_KEY, counts)
    live = {c for c in counts if c is not None}
    # Uniform counts: the global key says it all and plain from_pretrained loads the model.
    # Non-uniform: keep the max; loading.load_pretrained shrinks layers from it.
    setattr(cfg, spec.experts_key, live.pop() if len(live) == 1 else max(live))


# ---- public API ----------------------------------------------------------------------------------
def _check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ConfigError("removal", semantics, SEMANTICS)


def remove_experts(adapter: MoEAdapter, l: int, keep_ids: Sequence[int], semantics: str = "slice_router") -> None:
    """Keep only `keep_ids` (current ids, kept in the given order) in MoE layer l."""
    _check_semantics(semantics)
    keep = [int(i) for i in keep_ids]
    _check_ids(adapter, l, keep, "keep_ids")
    _check_count(adapter, l, len(keep))
    if semantics == "zero_output":
        zeroed = [e for e in range(adapter.num_experts(l)) if e not in set(keep)]
        for e in zeroed:
            _zero_expert(adapter, l, e)
        _record(adapter, semantics, l, zeroed)
        return
    rebuild_layer(adapter, l, _group_order(adapter, l, [([e], None) for e in keep]))
    _record(adapter, semantics, l)


def merge_experts(adapter: MoEAdapter, l: int, groups: Sequence[Sequence[int]],
                  weights: Optional[Sequence[Optional[Sequence[float]]]] = None,
                  semantics: str = "slice_router") -> None:
    """Collapse each group into one expert (weights and router rows averaged).

    `groups` is the layer's complete new layout: experts in no group are removed. `weights[i]`
    (optional) weighs group i's members (e.g. routing frequency); default uniform.
    """
    _check_semantics(semantics)
    groups = [[int(e) for e in g] for g in groups]
    flat = [e for g in groups for e in g]
    _check_ids(adapter, l, flat, "merge groups")
    if any(not g for g in groups):
        raise ConfigError(f"merge groups (layer {l})", groups, "non-empty groups")
    ws = list(weights) if weights is not None else [None] * len(groups)
    if len(ws) != len(groups) or any(w is not None and len(w) != len(g) for g, w in zip(groups, ws)):
        raise ConfigError(f"merge weights (layer {l})", weights, "one weight per group member")
    _check_count(adapter, l, len(groups))
    sources = [(g, None if w is None else [float(x) for x in w]) for g, w in zip(groups, ws)]
    if semantics == "zero_output":
        zeroed = [e for e in range(adapter.num_experts(l)) if e not in set(flat)]
        for e in zeroed:
            _zero_expert(adapter, l, e)
        for g, w in sources:
            if len(g) > 1:
                _write_merged(adapter, l, g, w)
        _record(adapter, semantics, l, zeroed)
        return
    rebuild_layer(adapter, l, _group_order(adapter, l, sources))
    _record(adapter, semantics, l)


def apply_plan(adapter: MoEAdapter, plan: ExpertPlan) -> None:
    """Apply an ExpertPlan: each group -> one surviving expert, in group order.

    A group with a representative keeps that expert unchanged (other members are removed); a
    null representative averages the group's members (with the layer's ``merge_weights`` if given,
    after its ``permutations``). Honors ``plan.removal``.
    """
    _check_semantics(plan.removal)
    moe = set(adapter.moe_layers)
    for l, lp in sorted(plan.layers.items()):
        if l not in moe:
            raise ConfigError("expert plan layer", l, [str(i) for i in sorted(moe)], hint="not a MoE layer")
        for g, perms in zip(lp.groups, lp.permutations or []):
            for e, p in zip(g, perms or []):
                if p is not None:
                    permute_expert(adapter, l, e, p)
        groups = [[r] if r is not None else g for g, r in zip(lp.groups, lp.representatives)]
        weights = None
        if lp.merge_weights is not None:
            weights = [None if r is not None else w for r, w in zip(lp.representatives, lp.merge_weights)]
        merge_experts(adapter, l, groups, weights, semantics=plan.removal)
