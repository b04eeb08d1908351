"""The expert plan: which experts each MoE layer keeps. A stable, public contract.

``expert_plan.json`` shape (ids are the model's ORIGINAL expert indices)::

    {"method": "stun", "experts_before": 32, "experts_after": 24,
     "layers": {"0": {"groups": [[0, 4], [1], [2, 3, 7]], "representatives": [4, 1, null]}, ...},
     "removal": "slice_router", "meta": {...}}

Each group becomes one surviving expert, in list order. Its representative is the original
expert kept unchanged, or null when the group is merged (weights and router rows averaged).
Pruners that only drop experts write singleton groups. ``removal`` is the surgery semantics
(``slice_router`` or ``zero_output``). ``meta`` holds method-specific facts (threshold found,
forward passes, ...). Layer keys are decoder-layer indices as strings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerPlan:
    groups: list[list[int]]
    representatives: list[int | None]

    def __post_init__(self) -> None:
        if len(self.groups) != len(self.representatives):
            raise ValueError("groups and representatives must have the same length")
        for g, r in zip(self.groups, self.representatives):
            if not g:
                raise ValueError("empty expert group")
            if r is not None and r not in g:
                raise ValueError(f"representative {r} is not a member of its group {g}")

    @property
    def kept(self) -> list[int]:
        """Original ids kept unchanged (representatives), in group order."""
        return [r for r in self.representatives if r is not None]

    @property
    def is_pure_selection(self) -> bool:
        return all(r is not None for r in self.representatives)


@dataclass
class ExpertPlan:
    method: str
    experts_before: int
    layers: dict[int, LayerPlan]
    removal: str = "slice_router"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def experts_after(self) -> int:
        return sum(len(lp.groups) for lp in self.layers.values())

    @classmethod
    def from_keep(cls, method: str, experts_per_layer: dict[int, int], keep: dict[int, list[int]],
                  removal: str = "slice_router", **meta: Any) -> "ExpertPlan":
        """A drop-only plan: every kept expert is a singleton group, in ascending id order."""
        layers = {l: LayerPlan([[e] for e in sorted(ids)], sorted(ids)) for l, ids in keep.items()}
        return cls(method, sum(experts_per_layer.values()), layers, removal, dict(meta))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "removal": self.removal,
            "layers": {str(l): {"groups": lp.groups, "representatives": lp.representatives}
                       for l, lp in sorted(self.layers.items())},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertPlan":
        layers = {int(k): LayerPlan([list(map(int, g)) for g in v["groups"]],
                                    [None if r is None else int(r) for r in v["representatives"]])
                  for k, v in d["layers"].items()}
        return cls(d["method"], int(d["experts_before"]), layers, d.get("removal", "slice_router"),
                   dict(d.get("meta", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)
