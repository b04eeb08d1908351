"""One sparsity knob at a time: which of the root ``sparsity`` and the pruner's own ratio applies.

Two keys can ask for a sparsity: the root ``sparsity`` (a *total* target over the original model's
decoder Linear weights, removed experts counted as zeros; the unstructured ratio is derived) and
``unstructured_pruner.sparsity`` / ``unstructured_pruner.nm`` (the ratio the unstructured pruner
applies to its targets). Both carry a default, written ``${stun.default:<value>}`` in the YAML, so
that a default can be told from a value the user set (on the command line, in a sweep or in an
experiment file): setting a key replaces the interpolation by a plain value.

Rules (``resolve``):

* a value the user set always wins over a default; two values set for both knobs are refused;
* only defaults set: the root total target applies (the main job: 40% total);
* ``unstructured_pruner=none``: a default total target steps aside (nothing fills it), an explicit
  one is refused (the expert phase alone lands wherever its experts land);
* ``nm`` set: N:M fixes the ratio at 0.5, so the root target steps aside (refused when explicit).

``normalise`` rewrites the config so that it says what runs: the knob that steps aside becomes
null, and the one that applies becomes a plain value. ``results.json`` records that config, the
request (``sparsity_request``) and, after the run, the applied ratio and the achieved sparsities.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from stun_exp.errors import ConfigError

RESOLVER = "stun.default"
_DEFAULT_RE = re.compile(r"^\$\{stun\.default:(.*)\}$")


def register_resolver() -> None:
    """``${stun.default:x}`` resolves to x (parsed as YAML) and marks it as a default."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda v: v)


def is_default(node: DictConfig, key: str) -> bool:
    """True when ``node[key]`` still holds its ``${stun.default:...}`` default (not set by the user)."""
    if key not in node:
        return True
    raw = node._get_node(key)._value()  # noqa: SLF001 (the unresolved value is the provenance)
    return isinstance(raw, str) and _DEFAULT_RE.match(raw.strip()) is not None


@dataclass
class SparsityRequest:
    """What the run will apply: a total target (ratio derived) or the pruner's own ratio / N:M."""
    total: Optional[float]             # root `sparsity` when it applies, else None
    ratio: Optional[float]             # unstructured_pruner.sparsity when it applies, else None
    nm: Optional[str]
    total_source: str                  # "set" | "default" | "stepped aside: <why>" | "null"
    ratio_source: str                  # "set" | "default" | "derived from the total target" | ...

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve(cfg: DictConfig) -> SparsityRequest:
    """The one knob that applies (see module docstring); ConfigError on a conflict."""
    up = cfg.unstructured_pruner
    total_set, total = not is_default(cfg, "sparsity"), cfg.get("sparsity")
    if up.name == "none":
        if total_set and total is not None:
            raise ConfigError("sparsity", total, "null with unstructured_pruner=none (a total target needs "
                              "an unstructured pruner to fill what the expert phase leaves; the expert "
                              "phase's own share is reported either way)")
        why = "stepped aside: unstructured_pruner=none" if total is not None else "null"
        return SparsityRequest(None, None, None, why, "none")
    ratio_set = "sparsity" in up and not is_default(up, "sparsity") and up.sparsity is not None
    nm = up.get("nm")
    if total_set and total is not None and (ratio_set or nm):
        key = "unstructured_pruner.nm" if nm else "unstructured_pruner.sparsity"
        raise ConfigError("sparsity", total, f"null when {key} is set (give either the total target "
                          f"`sparsity` or the pruner's own ratio `{key}`, not both)")
    if nm:
        src = "stepped aside: unstructured_pruner.nm is set" if total is not None else "null"
        return SparsityRequest(None, 0.5, str(nm), src, "nm")
    if ratio_set:
        src = "stepped aside: unstructured_pruner.sparsity is set" if total is not None else "null"
        return SparsityRequest(None, float(up.sparsity), None, src, "set")
    if total is not None:
        return SparsityRequest(float(total), None, None, "set" if total_set else "default",
                               "derived from the total target")
    if up.get("sparsity") is None:
        raise ConfigError("unstructured_pruner.sparsity", None, "a ratio in [0, 1) when the total target "
                          "`sparsity` is null (set one of the two)")
    return SparsityRequest(None, float(up.sparsity), None, "null", "default")


def normalise(cfg: DictConfig, req: SparsityRequest) -> DictConfig:
    """A copy of ``cfg`` whose sparsity keys say what runs (plain values; unused knobs null)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.sparsity = req.total
        if "sparsity" in out.unstructured_pruner:
            out.unstructured_pruner.sparsity = req.ratio if req.ratio_source != "nm" else None
    return out


def effective(cfg: DictConfig) -> tuple[DictConfig, SparsityRequest]:
    """The config that runs, as ``results.json`` records and hashes it: the sparsity knob resolved
    (``normalise``) and ``save_checkpoint``'s default settled (true only for streaming, which writes
    its checkpoint as the way the pruned model exists). The runner and the table launcher both call
    this, so a launched job and the run it made carry the same config hash."""
    request = resolve(cfg)
    cfg = normalise(cfg, request)
    if is_default(cfg, "save_checkpoint"):
        with open_dict(cfg):
            cfg.save_checkpoint = bool(cfg.runtime.streaming)
    return cfg, request
