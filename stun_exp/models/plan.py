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

Optional per-layer fields (absent = the behaviour above; plans without them load unchanged):

* ``merge_weights``: one entry per group, null or one non-negative weight per member; a merged
  group's experts and router rows are averaged with these weights (normalised to sum 1; all zero
  gives a zero expert, which is what a frequency-weighted average over never-routed members is).
* ``permutations``: one entry per group, null or one entry per member, each null (unchanged) or a
  permutation p of the expert's intermediate neurons applied before averaging: neuron j of the
  aligned expert is neuron p[j] (gate/up rows, down columns). It does not change the expert's
  function. Only merged groups (null representative) may carry weights or permutations.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class LayerPlan:
    groups: list[list[int]]
    representatives: list[int | None]
    merge_weights: Optional[list[Optional[list[float]]]] = None
    permutations: Optional[list[Optional[list[Optional[list[int]]]]]] = None

    def __post_init__(self) -> None:
        if len(self.groups) != len(self.representatives):
            raise ValueError("groups and representatives must have the same length")
        for g, r in zip(self.groups, self.representatives):
            if not g:
                raise ValueError("empty expert group")
            if r is not None and r not in g:
                raise ValueError(f"representative {r} is not a member of its group {g}")
        self._check_per_member("merge_weights", self.merge_weights, _check_weight)
        self._check_per_member("permutations", self.permutations, _check_perm)

    def _check_per_member(self, name: str, value: Optional[list], check: Any) -> None:
        if value is None:
            return
        if len(value) != len(self.groups):
            raise ValueError(f"{name}: one entry per group expected ({len(self.groups)}), got {len(value)}")
        for g, r, v in zip(self.groups, self.representatives, value):
            if v is None:
                continue
            if r is not None:
                raise ValueError(f"{name}: group {g} keeps representative {r}; only merged groups take {name}")
            if len(v) != len(g):
                raise ValueError(f"{name}: group {g} needs one entry per member, got {len(v)}")
            for x in v:
                check(x)

    @property
    def kept(self) -> list[int]:
        """Original ids kept unchanged (representatives), in group order."""
        return [r for r in self.representatives if r is not None]

    @property
    def is_pure_selection(self) -> bool:
        return all(r is not None for r in self.representatives)


def _check_weight(w: Any) -> None:
    if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
        raise ValueError(f"merge weight {w!r}: a finite number >= 0 expected")


def _check_perm(p: Any) -> None:
    if p is not None and sorted(int(x) for x in p) != list(range(len(p))):
        raise ValueError("permutation: a reordering of 0..n-1 expected")


def _layer_dict(lp: LayerPlan) -> dict[str, Any]:
    d: dict[str, Any] = {"groups": lp.groups, "representatives": lp.representatives}
    if lp.merge_weights is not None:
        d["merge_weights"] = lp.merge_weights
    if lp.permutations is not None:
        d["permutations"] = lp.permutations
    return d


def _layer_from_dict(v: dict[str, Any]) -> LayerPlan:
    w, p = v.get("merge_weights"), v.get("permutations")
    return LayerPlan([list(map(int, g)) for g in v["groups"]],
                     [None if r is None else int(r) for r in v["representatives"]],
                     None if w is None else [None if x is None else [float(y) for y in x] for x in w],
                     None if p is None else [None if x is None else
                                             [None if y is None else [int(z) for z in y] for y in x] for x in p])


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
            "layers": {str(l): _layer_dict(lp) for l, lp in sorted(self.layers.items())},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertPlan":
        layers = {int(k): _layer_from_dict(v) for k, v in d["layers"].items()}
        return cls(d["method"], int(d["experts_before"]), layers, d.get("removal", "slice_router"),
                   dict(d.get("meta", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)
