"""`std: true` experiments: '<col> sd' is the sample standard deviation over the runs of a row."""
from __future__ import annotations

import math

import pandas as pd

from stun_exp.reproduce.spec import parse_experiment
from stun_exp.reproduce.tables import build_table

EXP = {
    "name": "sd", "index": ["sparsity", "method"], "keys": {"sparsity": "config.sparsity"}, "std": True,
    "methods": [{"label": "Wanda", "match": {"config.unstructured_pruner.name": "wanda"}}],
    "columns": [{"name": "Arith", "path": "metrics.a", "scale": 100}],
    "paper": {"source": "test"},
    "modes": {"toy": {"select": {}, "sweeps": [["model=toy"]]}},
}


def _runs(values: list[float], sparsity: float = 0.4) -> list[dict]:
    return [{"config.unstructured_pruner.name": "wanda", "config.sparsity": sparsity, "metrics.a": v,
             "config_hash": f"h{i}-{sparsity}"} for i, v in enumerate(values)]


def test_sd_matches_naive_sample_std() -> None:
    xs = [0.30, 0.42, 0.51]
    df = build_table(parse_experiment(EXP), pd.DataFrame(_runs(xs) + _runs([0.2], 0.65)), "toy")
    mean = sum(x * 100 for x in xs) / 3
    naive = math.sqrt(sum((x * 100 - mean) ** 2 for x in xs) / (3 - 1))
    row = df[df.sparsity == 0.4].iloc[0]
    assert abs(row["Arith"] - mean) < 1e-9 and abs(row["Arith sd"] - naive) < 1e-9
    assert pd.isna(df[df.sparsity == 0.65].iloc[0]["Arith sd"])       # one run: no std


def test_sd_columns_absent_without_opt_in() -> None:
    df = build_table(parse_experiment({**EXP, "std": False}), pd.DataFrame(_runs([0.3, 0.5])), "toy")
    assert "Arith sd" not in df.columns
