"""Typed config schemas: one dataclass per component, stored in Hydra's ConfigStore.

Pattern (every component YAML follows it)::

    # conf/expert_pruner/frequency.yaml
    defaults:
      - schema_frequency      # the dataclass registered below: type checks + unknown-key errors
      - _self_
    expert_sparsity: 0.25

Each schema dataclass carries ``_target_`` (the class ``hydra.utils.instantiate`` builds) and a
``validate(info)`` method that raises ``ConfigError`` naming the key, the value and what is
allowed. ``info`` is a ``ModelInfo`` (read from the model config, no weights) or None for the
checks that need no model facts. Modules declare schemas with ``@schema(group, name)``; this
module's ``register_all`` imports them and fills the ConfigStore.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from hydra.core.config_store import ConfigStore

from stun_exp.errors import ConfigError

_SCHEMAS: dict[tuple[str, str], type] = {}

# Modules that declare schemas. A module listed here that does not exist yet is skipped, so
# groups can be added incrementally.
SCHEMA_MODULES = [
    "stun_exp.config.core",
    "stun_exp.toy.config",
    "stun_exp.pruning.expert.configs",
    "stun_exp.pruning.weights.configs",
    "stun_exp.distill.configs",
    "stun_exp.evaluation.configs",
    "stun_exp.streaming.config",
]


def schema(group: Optional[str], name: str) -> Callable[[type], type]:
    """Class decorator: register a dataclass as the schema ``schema_<name>`` of ``group``
    (``group=None``: a primary config, e.g. the root schema ``schema_root``)."""
    def deco(cls: type) -> type:
        _SCHEMAS[(group, name)] = cls
        return cls
    return deco


def register_all() -> None:
    """Import every schema module and store its dataclasses in Hydra's ConfigStore."""
    for mod in SCHEMA_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    cs = ConfigStore.instance()
    for (group, name), cls in _SCHEMAS.items():
        cs.store(group=group, name=f"schema_{name}", node=cls)
    from stun_exp.config.sparsity import register_resolver
    register_resolver()


def schemas() -> dict[tuple[str, str], type]:
    return dict(_SCHEMAS)


# ---- shared validation helpers --------------------------------------------------------------
def check_range(key: str, value: Any, lo: float, hi: float, lo_open: bool = False,
                hi_open: bool = True) -> None:
    """Raise ConfigError unless lo <= value < hi (bounds openness configurable). NaN never passes."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ConfigError(key, value, f"a number in {lb}{lo}, {hi}{rb}")


def check_choice(key: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(key, value, choices)


def check_finite(key: str, value: Any) -> None:
    """NaN and +-inf are refused: no schema field means anything by them unless it says so."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, value, "a finite number")


@dataclass
class Validatable:
    """Base for schemas: subclasses override ``validate``.

    ``NONFINITE_OK`` names the float fields where inf is meaningful (e.g. STUN's ``threshold=inf``:
    merge every pair the cap allows); every other float field is checked finite by ``check_fields``
    before ``validate`` runs.
    """
    NONFINITE_OK: ClassVar[frozenset[str]] = frozenset()

    def check_fields(self, prefix: str = "") -> None:
        """Generic checks every schema gets: finite floats (also inside lists and dicts)."""
        for f in dataclasses.fields(self):
            if f.name in self.NONFINITE_OK:
                continue
            _check_nested(f"{prefix}.{f.name}" if prefix else f.name, getattr(self, f.name))

    def validate(self, info: Optional[Any] = None, prefix: str = "") -> None:  # noqa: D401
        return None


def _check_nested(key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_nested(f"{key}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_nested(key, v)
    else:
        check_finite(key, value)
