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

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

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


def schema(group: str, name: str) -> Callable[[type], type]:
    """Class decorator: register a dataclass as the schema ``schema_<name>`` of ``group``."""
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


def schemas() -> dict[tuple[str, str], type]:
    return dict(_SCHEMAS)


# ---- shared validation helpers --------------------------------------------------------------
def check_range(key: str, value: Any, lo: float, hi: float, lo_open: bool = False,
                hi_open: bool = True) -> None:
    """Raise ConfigError unless lo <= value < hi (bounds openness configurable)."""
    ok = value is not None and (value > lo if lo_open else value >= lo) and (
        value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ConfigError(key, value, f"a number in {lb}{lo}, {hi}{rb}")


def check_choice(key: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(key, value, choices)


@dataclass
class Validatable:
    """Base for schemas: subclasses override ``validate``."""

    def validate(self, info: Optional[Any] = None, prefix: str = "") -> None:  # noqa: D401
        return None
