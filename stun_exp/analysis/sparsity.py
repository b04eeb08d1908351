"""The sparsity ledger: one meaning per number.

Every run reports four denominators, all relative to the ORIGINAL (dense, unpruned) model so that
removed experts count as zeros:

- ``targeted``: zeros / numel over the weights the unstructured pruner targeted (in the pruned model);
- ``decoder_linear``: 1 - nonzero(decoder Linear weights now) / numel(decoder Linear weights originally);
- ``all_params``: 1 - nonzero(all parameters now) / numel(all parameters originally);
- ``active_params``: 1 - active-nonzero now / active originally, where the active parameters of a
  token are all non-routed-expert parameters plus top_k routed experts per MoE layer. After pruning
  a layer's experts are assumed equally likely to be chosen (their mean nonzero count is used): the
  exact value depends on the routing of each token.
Plus ``expert``: experts removed / experts originally present (total and per layer).

A top-level ``sparsity`` target means the total on ``decoder_linear``; ``derive_unstructured_ratio``
turns it into the ratio the unstructured phase must apply to its targets.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from stun_exp.errors import ConfigError

TargetFilter = Callable[[Any], bool]


NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)


def as_numpy(t: torch.Tensor) -> Optional[Any]:
    """``t`` as a numpy array sharing its memory when it is a CPU float tensor numpy computes on
    (its comparisons, counts and selections beat torch's on CPU); None otherwise."""
    if t.device.type != "cpu" or t.dtype not in NUMPY_FLOATS:
        return None
    return t.detach().numpy()


def nonzero_count(t: torch.Tensor, chunk: int = 1 << 20) -> int:
    """Non-zero count (numpy's comparison on CPU floats is several times faster than torch's count)."""
    arr = as_numpy(t.reshape(-1))
    if arr is None:
        return int(torch.count_nonzero(t).item())
    import numpy as np
    return arr.size - sum(int(np.count_nonzero(arr[i:i + chunk] == 0)) for i in range(0, arr.size, chunk))


def _targets(adapter: Any) -> Iterable[tuple[int, Any]]:
    for l in range(len(adapter.layers)):
        for t in adapter.linear_targets(l):
            yield l, t


def census(model: torch.nn.Module, adapter: Any) -> dict[str, Any]:
    """numel / nonzero counts of the current model, with the expert structure per layer."""
    return census_from_counts(model, adapter,
                              [(l, t, t.weight.numel(), nonzero_count(t.weight)) for l, t in _targets(adapter)])


def census_from_counts(model: torch.nn.Module, adapter: Any, counts: Iterable[tuple[int, Any, int, int]],
                       other_nonzero: Optional[int] = None) -> dict[str, Any]:
    """``census`` from per-target (layer, target, numel, nonzero) counts already taken (one read);
    ``other_nonzero``: the non-zeros of ``untiled_params`` when counted already."""
    dec_numel = dec_nz = routed_numel = routed_nz = 0
    per_layer: dict[int, dict[str, float]] = {}
    counts = list(counts)
    for l, t, n, z in counts:
        dec_numel, dec_nz = dec_numel + n, dec_nz + z
        if t.kind == "expert":
            routed_numel, routed_nz = routed_numel + n, routed_nz + z
            pl = per_layer.setdefault(l, {"expert_numel": 0, "expert_nz": 0})
            pl["expert_numel"] += n
            pl["expert_nz"] += z
    all_numel = sum(p.numel() for p in model.parameters())
    all_nz = all_nonzero(model, counts, other_nonzero)
    # zero_output surgery keeps the pruned experts' slots (router untouched): they are not experts
    experts = {l: adapter.num_experts(l) - len(_zeroed(adapter, l)) for l in adapter.moe_layers}
    k = adapter.top_k
    active_expert = sum(k * v["expert_numel"] / max(experts[l], 1) for l, v in per_layer.items())
    active_expert_nz = sum(k * v["expert_nz"] / max(experts[l], 1) for l, v in per_layer.items())
    return {
        "decoder_linear_numel": dec_numel, "decoder_linear_nonzero": dec_nz,
        "all_params_numel": all_numel, "all_params_nonzero": all_nz,
        "routed_numel": routed_numel, "routed_nonzero": routed_nz,
        "active_numel": all_numel - routed_numel + active_expert,
        "active_nonzero": all_nz - routed_nz + active_expert_nz,
        "experts": {str(l): n for l, n in experts.items()},
    }


def all_nonzero(model: torch.nn.Module, counts: list[tuple[int, Any, int, int]],
                other_nonzero: Optional[int] = None) -> int:
    """Non-zeros of every parameter; storages the targets tile exactly reuse the targets' counts,
    the others (``untiled_params``) are counted here unless ``other_nonzero`` gives their count."""
    tiled, rest = _tiling(model, [(t.weight, n) for _, t, n, _ in counts])
    total = sum(z for _, t, _, z in counts if _storage(t.weight) in tiled)
    return total + (other_nonzero if other_nonzero is not None else nonzero_total(rest))


def nonzero_total(tensors: Iterable[torch.Tensor]) -> int:
    """Non-zeros of all ``tensors`` together (parameters: their data is counted)."""
    return sum(nonzero_count(t.data) for t in tensors)


def untiled_params(model: torch.nn.Module, weights: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters whose zeros a census counts itself: those in a storage that ``weights`` (the
    targets' weights) do not tile exactly (embeddings, norms, a router left out of the targets)."""
    return _tiling(model, [(w, w.numel()) for w in weights])[1]


def _tiling(model: torch.nn.Module, weights: list[tuple[torch.Tensor, int]]) -> tuple[set[int], list[torch.Tensor]]:
    """(the storages that ``weights`` (tensor, numel) tile exactly, every parameter in the others)."""
    covered: dict[int, int] = {}
    for w, n in weights:
        covered[_storage(w)] = covered.get(_storage(w), 0) + n
    params: dict[int, list[torch.Tensor]] = {}
    for p in model.parameters():
        params.setdefault(_storage(p), []).append(p)
    tiled = {key for key, ps in params.items() if covered.get(key) == sum(p.numel() for p in ps)}
    return tiled, [p for key, ps in params.items() if key not in tiled for p in ps]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _zeroed(adapter: Any, l: int) -> list[int]:
    return adapter.pruned_experts(l) if hasattr(adapter, "pruned_experts") else []


def sparsity_report(original: dict[str, Any], now: dict[str, Any],
                    targeted: Optional[tuple[int, int]] = None) -> dict[str, Any]:
    """All four denominators (plus expert sparsity) from two censuses. ``targeted`` = (numel, zeros)."""
    e0 = {int(k): v for k, v in original["experts"].items()}
    e1 = {int(k): v for k, v in now["experts"].items()}
    rep = {
        "decoder_linear": 1 - now["decoder_linear_nonzero"] / original["decoder_linear_numel"],
        "all_params": 1 - now["all_params_nonzero"] / original["all_params_numel"],
        "active_params": 1 - now["active_nonzero"] / original["active_numel"],
        "expert": (1 - sum(e1.values()) / sum(e0.values())) if e0 else 0.0,   # a dense model has no experts
        "expert_per_layer": {str(l): 1 - e1.get(l, 0) / n for l, n in sorted(e0.items())},
        "experts_before": sum(e0.values()), "experts_after": sum(e1.values()),
    }
    rep["targeted"] = (targeted[1] / targeted[0]) if targeted and targeted[0] else None
    return rep


def targeted_counts(adapter: Any, is_targeted: TargetFilter) -> tuple[int, int]:
    """(numel, zeros) over the targets selected by ``is_targeted``."""
    numel = zeros = 0
    for _, t in _targets(adapter):
        if is_targeted(t):
            numel += t.weight.numel()
            zeros += t.weight.numel() - nonzero_count(t.weight)
    return numel, zeros


def derive_unstructured_ratio(total: float, original: dict[str, Any], adapter: Any,
                              is_targeted: TargetFilter) -> dict[str, float]:
    """The unstructured ratio r that lands decoder-Linear sparsity (vs the original) at ``total``.

    zeros_after = (original numel - nonzero now) + r * nonzero-targeted-now, solved for r. Raises
    ConfigError when expert pruning alone already exceeds the target or the target is unreachable
    within the unstructured scope.
    """
    now_nz = sum(nonzero_count(t.weight) for _, t in _targets(adapter))
    return ratio_from_counts(total, original, now_nz, *targeted_counts(adapter, is_targeted))


def ratio_from_counts(total: float, original: dict[str, Any], now_nz: int, tgt_numel: int,
                      tgt_zeros: int) -> dict[str, float]:
    """``derive_unstructured_ratio`` from counts alone (streaming mode counts layer by layer)."""
    orig = original["decoder_linear_numel"]
    tgt_nz = tgt_numel - tgt_zeros
    already = 1 - now_nz / orig
    if total < already - 1e-9:
        raise ConfigError("sparsity", total, f"at least {already:.4f}: expert pruning alone already "
                          f"removes {already:.2%} of the original decoder Linear weights")
    r = (total - already) * orig / max(tgt_nz, 1)
    # the pruner's ratio counts existing zeros in its targets too: convert to a ratio over targets
    ratio = (tgt_zeros + r * tgt_nz) / max(tgt_numel, 1)
    if ratio >= 1:
        raise ConfigError("sparsity", total, f"a target reachable within the unstructured scope "
                          f"(it would need {ratio:.2%} of the targeted weights)")
    return {"total_target": total, "structured_share": already, "unstructured_ratio": ratio}


def new_digest() -> Any:
    """The running hash behind ``mask_digest``: 128-bit xxh3, printed as its first 16 hex digits.
    It names a mask, it guards nothing, so a non-cryptographic hash fits; sha256 took 45 ms per
    7 MB of packed zero bits on a CPU without SHA instructions, about half of a run's read of the
    pruned weights, where xxh3 takes under 1 ms. Digests from sha256 (earlier versions) differ."""
    import xxhash
    return xxhash.xxh3_128()


def mask_digest(adapter: Any) -> str:
    """Hash (``new_digest``) over the zero patterns of every decoder Linear weight, in target order:
    two runs with identical masks (and expert layouts) give the same digest."""
    h = new_digest()
    for l in range(len(adapter.layers)):
        digest_layer(h, adapter, l)
    return h.hexdigest()[:16]


def digest_layer(h: Any, adapter: Any, l: int) -> None:
    """Add decoder layer l's zero patterns to the running digest ``h`` of ``new_digest``. Streaming
    adds one layer at a time: the same digest as ``mask_digest`` of the whole model."""
    import numpy as np
    for t in adapter.linear_targets(l):
        h.update(digest_header(l, t))
        h.update(np.packbits((t.weight == 0).flatten().cpu().numpy()).tobytes())


def digest_header(l: int, target: Any) -> bytes:
    """What the digest reads before a target's zero bits: its layer, name and shape (so a removed
    expert or a reshaped matrix changes the digest even where the bits happen to agree)."""
    return f"{l}:{target.name}:{tuple(target.weight.shape)}".encode()
