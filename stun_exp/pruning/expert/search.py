"""The reference's global-threshold search (thnkinbtfly/STUN ``merge_weight.py`` ``__main__``).

One τ is shared by all layers; each layer keeps as many clusters as ``greedy_clusters`` yields at τ.
Starting at ``init`` with ``step``: while the total misses the target, move τ up (too many experts
kept) or down (too few); the step doubles until the direction first flips, then halves every trial.

Where the reference aborts (``sys.exit(1)`` once the last 10 of more than 10 totals are equal), this
search stops instead (also when the step underflows relative to τ, or after ``max_iters`` trials, so it
never hangs) and falls back deterministically; the rule and the achieved total go to ``plan.meta``:

* ``nearest``: the evaluated τ whose total is closest to the target; ties go to the total that keeps
  MORE experts (fewer merges: the conservative side), then to the smallest τ. May miss the target.
* ``trim`` (STUN's default, applied in ``stun.cluster_layers``): take the evaluated τ whose total is
  closest BELOW the target (ties: smallest τ) and undo its largest-distance merges across all layers
  until the total equals the target (``clustering.trim_merges``). Exact whenever some τ overshot.
  Falls back to ``nearest`` if no evaluated τ went below the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

STALL_WINDOW = 10


@dataclass
class SearchResult:
    threshold: float
    total: int
    hit: bool
    stop_reason: str                       # "hit" | "stalled" | "step_underflow" | "max_iters"
    trace: list[tuple[float, int]] = field(default_factory=list)   # (τ, total) per trial

    def as_meta(self, target: int) -> dict:
        rule = None if self.hit else ("nearest total to the target; ties -> more experts kept, "
                                      "then smallest threshold")
        return {"threshold": self.threshold, "target_experts": target, "achieved_experts": self.total,
                "hit": self.hit, "stop_reason": self.stop_reason, "fallback_rule": rule,
                "trials": len(self.trace), "trace": [[t, k] for t, k in self.trace]}


def search_threshold(total_at: Callable[[float], int], target: int, init: float = 0.5,
                     step: float = 0.1, max_iters: int = 100) -> SearchResult:
    """Expanding-then-halving search for τ with ``total_at(τ) == target`` (see module doc)."""
    tau, last_dir, expanding = float(init), 0, True
    history: list[int] = []
    trace: list[tuple[float, int]] = []
    reason = "max_iters"
    for _ in range(max_iters):
        total = int(total_at(tau))
        trace.append((tau, total))
        if total == target:
            return SearchResult(tau, total, True, "hit", trace)
        direction = -1 if total < target else 1
        history.append(total)
        if len(history) > STALL_WINDOW and len(set(history[-STALL_WINDOW:])) == 1:
            reason = "stalled"
            break
        if last_dir * direction < 0:
            expanding = False
        step = step * 2 if expanding else step / 2
        new_tau = tau + direction * step
        if new_tau == tau:
            reason = "step_underflow"
            break
        tau, last_dir = new_tau, direction
    return _fallback(trace, target, reason)


def closest_below(trace: list[tuple[float, int]], target: int) -> tuple[float, int] | None:
    """The evaluated (τ, total) with the largest total < target (ties: smallest τ), or None."""
    below = [tk for tk in trace if tk[1] < target]
    return min(below, key=lambda tk: (target - tk[1], tk[0])) if below else None


def _fallback(trace: list[tuple[float, int]], target: int, reason: str) -> SearchResult:
    tau, total = min(trace, key=lambda tk: (abs(tk[1] - target), -tk[1], tk[0]))
    return SearchResult(tau, total, False, reason, trace)
