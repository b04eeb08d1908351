"""An experiment file (``experiments/<name>.yaml``): the sweep, the columns, the paper's numbers.

Shape (every key is checked on load, errors name the file and the key)::

    name: arctic
    title: "..."
    index: [sparsity, method]             # row keys; `method` comes from `methods`
    keys: {sparsity: config.sparsity}     # other row keys: a dotted path into the run record
    methods:                              # a run's method label: first whose `match` holds
      - {label: OWL, match: {config.expert_pruner.name: none, config.unstructured_pruner.name: owl},
         set: {}}                         # `set` overrides row keys (e.g. unpruned -> sparsity 0)
    columns:
      - {name: GSM8K, real: metrics.gsm8k/exact_match_strict-match, toy: metrics.toy_arith/exact_match,
         scale: 100}                      # or {name: avg, mean_of: [...]} / sum_of / diff_of: [a, b]
    gap: {key: method, minuend: STUN+OWL, subtrahend: OWL}      # optional extra rows "A - B"
    std: true                            # optional: "<col> sd" columns, sample std over the runs of a row
    unit: config.model.seed              # optional: the independent unit (e.g. the training seed): runs
                                          # are averaged within a unit first; then mean, "<col> ci95"
                                          # (95% t-interval half-width over units) and a "units" count;
                                          # `gap` rows are paired per unit (A - B on the same unit)
    plots: [{file: acc_vs_sparsity, x: sparsity, y: GSM8K, series: method, baseline: unpruned}]
                                          # baseline: that method's points start every other curve;
                                          # optional where: {key: value} plots only those rows
    paper: {source: ..., verified: false, rows: [{sparsity: 0.4, method: OWL, GSM8K: 63.76}, ...]}
    modes:
      real: {select: {config.model.name_or_path: ...}, sweeps: [[model=arctic, ...], ...]}
      toy:  {select: {config.model.kind: toy}, sweeps: [[model=toy, ...], ...]}

Run records are flattened with ``.`` (``metrics.toy_arith/exact_match``, ``config.sparsity``,
``timings.expert_pruning``), see collect.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from stun_exp.errors import ConfigError

MODES = ("real", "toy")
METHOD_KEYS = {"label", "match", "set"}
TOP_KEYS = {"name", "title", "description", "index", "keys", "methods", "columns", "gap", "plots", "paper",
            "modes", "float_format", "std", "unit"}


@dataclass
class Mode:
    select: dict[str, Any]
    sweeps: list[list[str]]


@dataclass
class Experiment:
    name: str
    title: str
    index: list[str]
    keys: dict[str, str]
    methods: list[dict[str, Any]]
    columns: list[dict[str, Any]]
    modes: dict[str, Mode]
    paper: dict[str, Any] = field(default_factory=dict)
    plots: list[dict[str, Any]] = field(default_factory=list)
    gap: Optional[dict[str, Any]] = None
    float_format: str = "{:.2f}"
    std: bool = False          # also show "<col> sd": the sample std over the runs (seeds) of a row
    unit: Optional[str] = None  # record path of the independent unit (training seed): see the module doc
    path: Optional[str] = None

    def column_names(self) -> list[str]:
        return [c["name"] for c in self.columns]


def experiments_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "experiments"


def available(directory: Optional[Path] = None) -> list[str]:
    return sorted(p.stem for p in (directory or experiments_dir()).glob("*.yaml"))


def load_experiment(name_or_path: str, directory: Optional[Path] = None) -> Experiment:
    """Load and check ``experiments/<name>.yaml`` (or an explicit path)."""
    p = Path(name_or_path)
    if not p.suffix:
        p = (directory or experiments_dir()) / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ConfigError("table", name_or_path, available(directory) or ["(no experiments found)"])
    d = yaml.safe_load(p.read_text())
    return parse_experiment(d, str(p))


def parse_experiment(d: dict[str, Any], where: str = "<dict>") -> Experiment:
    unknown = set(d) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: {sorted(unknown)[0]}", sorted(unknown)[0], sorted(TOP_KEYS))
    for k in ("name", "index", "methods", "columns", "modes"):
        if k not in d:
            raise ConfigError(f"{where}: {k}", None, "a value (required key)")
    modes = {}
    for m, body in d["modes"].items():
        if m not in MODES:
            raise ConfigError(f"{where}: modes", m, list(MODES))
        modes[m] = Mode(select=dict(body.get("select", {})), sweeps=[list(s) for s in body.get("sweeps", [])])
    exp = Experiment(name=d["name"], title=d.get("title", d["name"]), index=list(d["index"]),
                     keys=dict(d.get("keys", {})), methods=list(d["methods"]), columns=list(d["columns"]),
                     modes=modes, paper=dict(d.get("paper", {})), plots=list(d.get("plots", [])),
                     gap=d.get("gap"), float_format=d.get("float_format", "{:.2f}"),
                     std=bool(d.get("std", False)), unit=d.get("unit"), path=where)
    _check(exp, where)
    return exp


def _check(exp: Experiment, where: str) -> None:
    for k in exp.index:
        if k != "method" and k not in exp.keys:
            raise ConfigError(f"{where}: index", k, ["method", *exp.keys])
    for k, v in exp.keys.items():     # a key is a record path, or {real: path, toy: path}
        if isinstance(v, dict) and set(v) - set(MODES):
            raise ConfigError(f"{where}: keys.{k}", sorted(set(v) - set(MODES))[0], list(MODES))
    for m in exp.methods:       # an unquoted label with a comma splits into two keys in a YAML flow map
        extra = set(m) - METHOD_KEYS if isinstance(m, dict) else {"<not a mapping>"}
        if extra or not isinstance(m.get("label"), str) or not isinstance(m.get("match"), dict):
            raise ConfigError(f"{where}: methods", m, "{label: <text>, match: {...}, set: {...}} (quote a "
                              "label that holds a comma)")
    names = exp.column_names()
    for c in exp.columns:
        if "diff_of" in c and len(c["diff_of"]) != 2:
            raise ConfigError(f"{where}: columns.{c['name']}.diff_of", c["diff_of"], "two column names [a, b]")
        for op in ("mean_of", "sum_of", "diff_of"):
            for src in c.get(op, []):
                if src not in names:
                    raise ConfigError(f"{where}: columns.{c['name']}.{op}", src, names)
    for row in exp.paper.get("rows", []):
        for k in row:
            if k not in names and k not in exp.index:
                raise ConfigError(f"{where}: paper.rows", k, [*exp.index, *names])
    if exp.unit is not None and not isinstance(exp.unit, str):
        raise ConfigError(f"{where}: unit", exp.unit, "a run-record path such as config.model.seed")
    for p in exp.plots:
        if p.get("y") not in names:
            raise ConfigError(f"{where}: plots.y", p.get("y"), names)
        for k in ("x", "series"):
            if p.get(k) is not None and p[k] not in exp.index:
                raise ConfigError(f"{where}: plots.{k}", p[k], exp.index)
        for k in p.get("where") or {}:
            if k not in exp.index:
                raise ConfigError(f"{where}: plots.where", k, exp.index)
