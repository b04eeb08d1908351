"""The sparsity ledger's census (``analysis.sparsity.census``) accumulated one layer at a time.

``census`` needs every weight at once; here each decoder layer adds its counts while it is
materialised and ``finish`` adds the non-layer parameters. The arithmetic is ``census``'s own, so
``sparsity_report`` takes the result unchanged (tested equal to ``census`` on a tiny model).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


class LayerCensus:
    def __init__(self, is_targeted: Optional[Callable[[Any], bool]] = None) -> None:
        self.is_targeted = is_targeted
        self.c = {"dec_numel": 0, "dec_nz": 0, "routed_numel": 0, "routed_nz": 0, "layer_numel": 0,
                  "layer_nz": 0, "tgt_numel": 0, "tgt_zeros": 0}
        self.per_layer: dict[int, dict[str, int]] = {}
        self.experts: dict[int, int] = {}

    def add_counts(self, adapter: Any, l: int, counts: list[tuple[int, Any, int, int]]) -> None:
        """Layer l from its targets' (layer, target, numel, nonzero) counts already taken; the layer's
        other parameters are counted here (storages the targets tile exactly reuse their counts)."""
        from ..analysis.sparsity import all_nonzero
        c = self.c
        for _, t, n, z in counts:
            c["dec_numel"] += n
            c["dec_nz"] += z
            if t.kind == "expert":
                c["routed_numel"] += n
                c["routed_nz"] += z
                pl = self.per_layer.setdefault(l, {"expert_numel": 0, "expert_nz": 0})
                pl["expert_numel"] += n
                pl["expert_nz"] += z
            if self.is_targeted is not None and self.is_targeted(t):
                c["tgt_numel"] += n
                c["tgt_zeros"] += n - z
        c["layer_numel"] += sum(p.numel() for p in adapter.layers[l].parameters())
        c["layer_nz"] += all_nonzero(adapter.layers[l], counts)
        if l in adapter.moe_layers:
            self.experts[l] = adapter.num_experts(l)

    def finish(self, model: nn.Module, adapter: Any) -> dict[str, Any]:
        """The census dict, adding every parameter outside the decoder layers (counted once if tied)."""
        from ..analysis.sparsity import nonzero_total
        c, k = self.c, adapter.top_k
        in_layers = {id(p) for p in adapter.layers.parameters()}
        rest = [p for p in model.parameters() if id(p) not in in_layers]
        all_numel = c["layer_numel"] + sum(p.numel() for p in rest)
        all_nz = c["layer_nz"] + nonzero_total(rest)
        act = sum(k * v["expert_numel"] / max(self.experts[l], 1) for l, v in self.per_layer.items())
        act_nz = sum(k * v["expert_nz"] / max(self.experts[l], 1) for l, v in self.per_layer.items())
        return {
            "decoder_linear_numel": c["dec_numel"], "decoder_linear_nonzero": c["dec_nz"],
            "all_params_numel": all_numel, "all_params_nonzero": all_nz,
            "routed_numel": c["routed_numel"], "routed_nonzero": c["routed_nz"],
            "active_numel": all_numel - c["routed_numel"] + act,
            "active_nonzero": all_nz - c["routed_nz"] + act_nz,
            "experts": {str(l): n for l, n in sorted(self.experts.items())},
        }

    @property
    def targeted(self) -> tuple[int, int]:
        """(numel, zeros) over the targeted weights, as ``sparsity.targeted_counts``."""
        return self.c["tgt_numel"], self.c["tgt_zeros"]


class LayerReport:
    """The run's weight analysis (``analysis.weight_report``'s shape: census, kurtosis, mask digest,
    targeted counts) accumulated one materialised decoder layer at a time. Kurtosis merges per-matrix
    moments (``analysis.kurtosis.Moments``), so no layer's weights are kept after it is released."""

    def __init__(self, is_targeted: Optional[Callable[[Any], bool]] = None, nonzero_only: bool = False,
                 digest: bool = True) -> None:
        from ..analysis.sparsity import new_digest
        self.census = LayerCensus(is_targeted)
        self.nonzero_only = nonzero_only
        self.rows: list[tuple[int, Any, Any]] = []
        self.digest = new_digest() if digest else None
        self.engines: set[str] = set()

    def add_layer(self, adapter: Any, l: int) -> None:
        """One read of each of the layer's weights (``analysis.weight_report``'s scan: zero count,
        zero bits for the digest, moments), as the in-memory runtime reads the whole model."""
        from dataclasses import replace

        from ..analysis.weight_report import engine, read_targets
        items = [(l, t) for t in adapter.linear_targets(l)]
        self.engines.update(engine(t.weight) for _, t in items)
        rows = read_targets(items, self.nonzero_only, self.digest)
        for _, t, _, _, mom in rows:
            self.rows.append((l, replace(t, weight=torch.empty(0), module=None), mom))
        self.census.add_counts(adapter, l, [(l, t, n, nz) for l, t, n, nz, _ in rows])

    def finish(self, model: nn.Module, adapter: Any) -> dict[str, Any]:
        from ..analysis.kurtosis import report_from_moments
        return {"census": self.census.finish(model, adapter),
                "kurtosis": report_from_moments(self.rows, self.nonzero_only, "+".join(sorted(self.engines))),
                "mask_digest": self.digest.hexdigest()[:16] if self.digest is not None else None,
                "targeted": self.census.targeted if self.census.is_targeted is not None else None}
