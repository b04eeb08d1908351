"""`unit:` experiments: runs averaged within a unit (training seed), then mean and 95% t-interval over
units; gap rows paired per unit. Checked against a naive computation on hand-made runs."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from stun_exp.reproduce.spec import parse_experiment
from stun_exp.reproduce.tables import build_table

EXP = {
    "name": "unit", "index": ["experts", "method"], "keys": {"experts": "config.model.num_experts"},
    "unit": "config.model.seed",
    "methods": [{"label": "W", "match": {"config.expert_pruner.name": "none"}},
                {"label": "S", "match": {"config.expert_pruner.name": "stun"}}],
    "gap": {"key": "method", "minuend": "S", "subtrahend": "W"},
    "columns": [{"name": "acc", "path": "metrics.a", "scale": 100}],
    "modes": {"toy": {"select": {}, "sweeps": [["model=toy"]]}},
}
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}   # Student t quantiles, 0.975


def _runs(method: str, values: dict[int, list[float]]) -> list[dict]:
    """values: training seed -> one value per calibration seed."""
    return [{"config.expert_pruner.name": method, "config.model.num_experts": 16, "config.model.seed": s,
             "metrics.a": v, "config_hash": f"{method}-{s}-{i}"} for s, vs in values.items() for i, v in enumerate(vs)]


def _naive(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, T975[len(xs) - 1] * sd / math.sqrt(len(xs))


def test_mean_and_ci_over_units_and_paired_gap() -> None:
    w = {0: [0.50, 0.52, 0.54], 1: [0.60, 0.62], 2: [0.40, 0.40, 0.43]}
    s = {0: [0.55, 0.57, 0.56], 1: [0.61, 0.60], 2: [0.50, 0.48, 0.49]}
    df = build_table(parse_experiment(EXP), pd.DataFrame(_runs("none", w) + _runs("stun", s)), "toy")
    unit_mean = lambda d: {k: 100 * sum(v) / len(v) for k, v in d.items()}  # noqa: E731
    wm, sm = unit_mean(w), unit_mean(s)
    rows = {r["method"]: r for r in df.to_dict("records")}
    for label, means in (("W", wm), ("S", sm)):
        m, ci = _naive(list(means.values()))
        assert rows[label]["acc"] == pytest.approx(m) and rows[label]["acc ci95"] == pytest.approx(ci)
        assert rows[label]["units"] == 3 and rows[label]["runs"] == 8
    m, ci = _naive([sm[k] - wm[k] for k in wm])
    gap = rows["S - W"]
    assert gap["acc"] == pytest.approx(m) and gap["acc ci95"] == pytest.approx(ci) and gap["units"] == 3


def test_gap_pairs_only_shared_units_and_one_unit_has_no_interval() -> None:
    w = {0: [0.5], 1: [0.6]}
    s = {1: [0.7]}
    df = build_table(parse_experiment(EXP), pd.DataFrame(_runs("none", w) + _runs("stun", s)), "toy")
    gap = {r["method"]: r for r in df.to_dict("records")}["S - W"]
    assert gap["acc"] == pytest.approx(10.0) and gap["units"] == 1 and pd.isna(gap["acc ci95"])


def test_without_unit_the_table_is_unchanged() -> None:
    exp = {k: v for k, v in EXP.items() if k != "unit"}
    df = build_table(parse_experiment(exp), pd.DataFrame(_runs("none", {0: [0.5, 0.7]})), "toy")
    assert "units" not in df.columns and "acc ci95" not in df.columns
    assert df.iloc[0]["acc"] == pytest.approx(60.0) and df.iloc[0]["runs"] == 2


def test_every_shipped_experiment_loads_and_a_split_label_is_refused() -> None:
    import yaml

    from stun_exp.errors import ConfigError
    from stun_exp.reproduce.spec import available, load_experiment
    for name in available():
        load_experiment(name)
    bad = yaml.safe_load("""
name: x
index: [method]
methods:
  - {label: STUN (router, same count per layer), match: {config.expert_pruner.name: stun}}
columns: [{name: a, path: metrics.a}]
modes: {toy: {sweeps: []}}
""")
    with pytest.raises(ConfigError, match="quote a label"):
        parse_experiment(bad, "bad.yaml")
