"""Pruned checkpoints that load without stun-exp: vanilla when uniform, self-contained otherwise.

``save_pruned(model, tokenizer, path, report=None)`` writes a checkpoint folder atomically;
``finalize_checkpoint_dir(path, config, model_class, report=None)`` writes the config, code and
``PRUNING.md`` of a folder whose weights another writer (the streaming runtime) has written.

The kind follows from the expert count of each MoE layer:

``uniform``    every MoE layer keeps the same count n (also: no expert pruning, ``zero_output``
               surgery). The architecture's one expert-count field is n (in ``text_config`` too when
               it lives there); group-routing fields are made consistent (DeepSeek ``n_group`` /
               ``topk_group``: when the router does not route by group and n does not split into the
               groups, both become 1, which leaves its choice unchanged; a group-routed layer always
               splits, surgery keeps the groups balanced). Plain
               ``AutoModelForCausalLM.from_pretrained(dir)`` loads it, and so can serving stacks that
               build every MoE layer from that one field.
``per_layer``  counts differ. The expert-count field holds the largest count, ``num_experts_per_layer``
               the count of each decoder layer, and the folder carries ``modeling_pruned_moe.py``
               (``pruned_moe_code.py`` plus a subclass of the model's own class, as the STUN authors'
               released checkpoints carried their modeling code) with
               ``auto_map["AutoModelForCausalLM"]`` pointing to it: ``from_pretrained(dir,
               trust_remote_code=True)`` loads it with torch and transformers only.

Architectures whose code is not part of transformers (Snowflake Arctic) keep their own code files,
copied beside the weights with ``auto_map`` pointing to them, and need ``trust_remote_code=True`` in
both kinds, as the original model does. A stock architecture gets no ``auto_map`` when uniform (a
hub ``auto_map`` whose code was not copied would break ``trust_remote_code=True`` loads).

The keys surgery writes (``num_experts_per_layer``, ``num_experts_original``, ``expert_removal``,
``pruned_experts_per_layer``) stay in ``config.json``: stock loaders keep unknown keys as plain
attributes, and ``loading.load_pretrained`` and the sparsity ledger read them.
"""
from __future__ import annotations

import copy
import inspect
import json
import pprint
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..tracking.files import atomic_replace_dir, atomic_write_text
from . import pruned_moe_code
from .adapter import ORIGINAL_KEY, PER_LAYER_KEY, REMOVAL_KEY, model_info_from_config, spec_for_model
from .arch_table import ArchSpec

REMOTE_MODULE = "modeling_pruned_moe"
REPORT_NAME = "PRUNING.md"
# Class attributes that mark a wrapper around the model's own class (loading.per_layer_pruned_class,
# the generated remote class): exporting looks through them to the class they wrap.
WRAPPER_MARKS = ("_stun_per_layer", "_pruned_moe_per_layer")


@dataclass
class ExportInfo:
    """What kind of checkpoint was written and how it loads."""
    arch: str
    kind: str                                 # "uniform" | "per_layer"
    counts: dict[int, int]                    # MoE layer -> experts kept
    original: Optional[int]                   # experts per layer before pruning (None: never pruned)
    removal: Optional[str]                    # surgery semantics, None if no experts were pruned
    stock: bool                               # the model class ships with transformers
    auto_map: dict[str, str] = field(default_factory=dict)
    zeroed: dict[int, list[int]] = field(default_factory=dict)   # zero_output: ids stored as zeros
    adjustments: list[str] = field(default_factory=list)   # config edits made for consistency

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.auto_map)


# ---- classes and code files ----------------------------------------------------------------------
def base_model_class(model_class: type) -> type:
    """The model's own class: the first class along the MRO that is not one of our wrappers."""
    for c in model_class.__mro__:
        if not any(m in c.__dict__ for m in WRAPPER_MARKS):
            return c
    raise TypeError(f"{model_class} has no base class")


def _is_stock(cls: type) -> bool:
    """Shipped with transformers (remote code lives in ``transformers_modules``, not ``transformers.``)."""
    return cls.__module__.startswith("transformers.")


def _source_file(cls: type) -> Path:
    return Path(inspect.getfile(cls))


def _code_files(classes: list[type]) -> list[Path]:
    """Source files of non-stock classes plus everything they import relatively."""
    from transformers.dynamic_module_utils import get_relative_import_files
    out: list[Path] = []
    for cls in classes:
        if _is_stock(cls):
            continue
        main = _source_file(cls)
        for f in [main, *map(Path, get_relative_import_files(str(main)))]:
            if f not in out:
                out.append(f)
    return out


def layout_of(spec: ArchSpec) -> dict[str, Any]:
    """The ``LAYOUT`` of ``pruned_moe_code`` for one architecture."""
    return {"layers": spec.layers_path, "moe": spec.moe_attr, "router": spec.router_attr,
            "experts": spec.experts_attr, "modulelist": spec.layout == "modulelist",
            "router_buffers": [spec.routing.correction_bias] if spec.routing.correction_bias else []}


def _import_base(base: type) -> str:
    name = base.__name__
    if _is_stock(base):
        import transformers
        where = "transformers" if getattr(transformers, name, None) is base else base.__module__
        return f"from {where} import {name} as _Base  # noqa: E402"
    return f"from .{_source_file(base).stem} import {name} as _Base  # noqa: E402"


def remote_code(base: type, spec: ArchSpec) -> str:
    """Text of ``modeling_pruned_moe.py``: pruned_moe_code.py, then a subclass of `base`."""
    src = Path(pruned_moe_code.__file__).read_text()
    name = base.__name__
    footer = f'''

# ---- generated for this checkpoint ({spec.name}) ----
{_import_base(base)}

LAYOUT = {pprint.pformat(layout_of(spec), sort_dicts=False)}


class {name}(_Base):
    """``{name}`` whose MoE layers hold ``config.{PER_LAYER_KEY}`` experts each."""
    _pruned_moe_per_layer = True

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        init_pruned(self, config, LAYOUT)
'''
    return "# Modeling code of an expert-pruned checkpoint whose MoE layers keep different expert counts.\n" \
           + src + footer


# ---- config ----------------------------------------------------------------------------------------
def _holders(config: Any, key: str) -> list[Any]:
    """The config objects that carry `key`: the config itself and/or its text config."""
    out = [config] if hasattr(config, key) else []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config and hasattr(text, key):
        out.append(text)
    return out or [config]


def _set_count(config: Any, spec: ArchSpec, n: int) -> None:
    for c in _holders(config, spec.experts_key):
        setattr(c, spec.experts_key, int(n))


def consistent_groups(config: Any, spec: ArchSpec, n: int) -> list[str]:
    """Make DeepSeek-style routing-group fields agree with n experts per layer (see module doc)."""
    r = spec.routing
    if r.group is None:
        return []
    n_group = int(getattr(config, r.n_group_key, 1) or 1)
    if n_group <= 1 or n % n_group == 0:
        return []
    grouped = r.group_method_key is None or getattr(config, r.group_method_key, None) == r.group_method
    if grouped:
        raise ValueError(f"{n} experts per layer do not split into {r.n_group_key}={n_group} routing groups "
                         f"(group-routed layers must keep the groups balanced)")
    old_topk = getattr(config, r.topk_group_key, None)
    setattr(config, r.n_group_key, 1)
    setattr(config, r.topk_group_key, 1)
    return [f"`{r.n_group_key}` {n_group} -> 1 and `{r.topk_group_key}` {old_topk} -> 1: {n} experts do not "
            f"split into {n_group} groups, and the router does not route by group "
            f"(`{r.group_method_key}` = {getattr(config, r.group_method_key, None)!r}), so its choice is unchanged"]


def export_config(config: Any, model_class: type) -> tuple[Any, ExportInfo]:
    """A copy of `config` made vanilla (uniform) or pointing to its own code (per_layer)."""
    spec = spec_for_model([c.__name__ for c in model_class.__mro__], config, f"class {model_class.__name__}")
    cfg = copy.deepcopy(config)
    info = model_info_from_config(cfg)
    counts = {l: int(info.experts_per_layer[l]) for l in info.moe_layers}
    live = set(counts.values())
    base = base_model_class(model_class)
    out = ExportInfo(spec.name, "uniform" if len(live) <= 1 else "per_layer", counts,
                     getattr(cfg, ORIGINAL_KEY, None), getattr(cfg, REMOVAL_KEY, None), _is_stock(base))
    out.zeroed = dict(info.extra.get("pruned_experts") or {})
    if out.kind == "uniform":
        if live:
            n = live.pop()
            _set_count(cfg, spec, n)
            out.adjustments = consistent_groups(cfg, spec, n)
    else:
        _set_count(cfg, spec, max(live))
        setattr(cfg, PER_LAYER_KEY, [counts.get(l) for l in range(info.num_layers)])
    if not out.stock:
        if not _is_stock(type(config)):
            out.auto_map["AutoConfig"] = f"{_source_file(type(config)).stem}.{type(config).__name__}"
        out.auto_map["AutoModelForCausalLM"] = f"{_source_file(base).stem}.{base.__name__}"
    if out.kind == "per_layer":
        out.auto_map["AutoModelForCausalLM"] = f"{REMOTE_MODULE}.{base.__name__}"
    if out.auto_map:
        cfg.auto_map = dict(out.auto_map)
    elif getattr(cfg, "auto_map", None) is not None:
        delattr(cfg, "auto_map")
    return cfg, out


def _write_config(config: Any, spec: ArchSpec, path: Path) -> None:
    """config.json as ``PreTrainedConfig.save_pretrained`` writes it, without its auto-class side effects.

    transformers 5 writes some expert counts under a new name (Qwen3-MoE: ``num_local_experts``, read
    back through ``attribute_map`` as ``num_experts``); the architecture's own name is written too, with
    the same value, so readers that know only that name (older transformers, serving stacks) see it.
    """
    if hasattr(config, "validate"):
        config.validate()
    d = json.loads(config.to_json_string(use_diff=True))
    stored = getattr(config, "attribute_map", {}).get(spec.experts_key)
    if stored in d:
        d[spec.experts_key] = d[stored]
    atomic_write_text(path / "config.json", json.dumps(d, indent=2, sort_keys=True) + "\n")


# ---- folders ---------------------------------------------------------------------------------------
def finalize_checkpoint_dir(path: str | Path, config: Any, model_class: type,
                            report: Optional[dict] = None) -> ExportInfo:
    """Write config.json, the code files and PRUNING.md of a checkpoint whose weights are in `path`.

    `model_class` is the class the weights belong to (wrappers are looked through); `report` is the
    run's results (``results.json`` shape; optional) for PRUNING.md.
    """
    from .pruning_card import render
    path = Path(path)
    cfg, info = export_config(config, model_class)
    base = base_model_class(model_class)
    stale = path / f"{REMOTE_MODULE}.py"
    if stale.exists():
        stale.unlink()
    for f in _code_files([type(config), base]):
        if f.parent.resolve() != path.resolve():
            shutil.copy2(f, path / f.name)
    spec = spec_for_model([base.__name__], config, "export")
    if info.kind == "per_layer":
        atomic_write_text(stale, remote_code(base, spec))
    _write_config(cfg, spec, path)
    atomic_write_text(path / REPORT_NAME, render(info, report))
    return info


def save_pruned(model: nn.Module, tokenizer: Any, path: str | Path, report: Optional[dict] = None) -> Path:
    """Atomic save of a (pruned) model: weights, tokenizer, exported config, code, PRUNING.md."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        finalize_checkpoint_dir(tmp, model.config, type(model), report)
        atomic_replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
