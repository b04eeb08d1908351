"""Same config twice -> identical expert plan, identical masks (digest) and identical metrics on CPU."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from stun_exp.pipeline import run_pipeline
from stun_exp.run import CONF_DIR


def _run(tmp_path, name, overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    d = tmp_path / name
    d.mkdir()
    res = run_pipeline(cfg, str(d))
    return res, json.loads((d / "expert_plan.json").read_text())


@pytest.mark.parametrize("runtime", ["default", "streaming"])
def test_same_config_twice_is_identical(tmp_path, monkeypatch, runtime):
    monkeypatch.setenv("STUN_EXP_CACHE", str(tmp_path / "cache"))
    overrides = [f"runtime={runtime}", "model=toy_tiny", "calib.nsamples=4", "calib.seqlen=32", "eval=toy", "eval.limit=6",
                 "dense_baseline=false", "expert_pruner=stun", "expert_pruner.distance=coactivation",
                 "expert_pruner.expert_sparsity=0.25", "unstructured_pruner=owl", "sparsity=0.5", "seed=3"]
    a, plan_a = _run(tmp_path, "a", overrides)
    b, plan_b = _run(tmp_path, "b", overrides)
    strip = lambda p: {k: v for k, v in p.items() if k != "meta"}          # noqa: E731 (meta has wall times)
    assert strip(plan_a) == strip(plan_b) and plan_a["experts_after"] == 6
    assert plan_a["meta"]["search"] == plan_b["meta"]["search"]
    assert a["mask_digest"] == b["mask_digest"]
    assert a["metrics"] == b["metrics"] and a["metrics"]
    assert a["config_hash"] == b["config_hash"]
    c, _ = _run(tmp_path, "c", [*overrides[:-1], "calib.seed=1"])   # another calibration draw
    assert c["mask_digest"] != a["mask_digest"]
