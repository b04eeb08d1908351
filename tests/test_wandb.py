"""W&B: the run appears at its start, progress is logged as it happens, offline files land in the run
folder (both runtimes), and a W&B failure warns and loses nothing."""
from __future__ import annotations

import json
import logging

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stun_exp.pipeline import run_pipeline
from stun_exp.run import CONF_DIR
from stun_exp.tracking.wandb_logger import RunLogger, sweep_group

RESULTS = {"metrics": {"toy_arith/exact_match": 0.5}, "sparsity": {"decoder_linear": 0.4}, "timings": {"x": 1.0}}


def _cfg(mode):
    return OmegaConf.create({"name": "wandb", "project": "t", "entity": None, "mode": mode, "group": None,
                             "tags": ["a"]})


class FakeRun:
    """Records what RunLogger sends (the W&B client writes offline records asynchronously)."""

    def __init__(self):
        self.logged, self.summary, self.saved, self.finished = [], {}, [], None

    def log(self, row, step=None):
        self.logged.append((step, row))

    def save(self, path, base_path=None, policy=None):
        self.saved.append(path)

    def finish(self, exit_code=0):
        self.finished = exit_code


def test_run_logger_logs_stages_progress_and_summary(tmp_path):
    lg = RunLogger(FakeRun())
    run = lg.run
    lg.stage("model", 1.5)
    lg.progress("unstructured", {"layer": 0, "achieved": 0.5})
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    lg.finish(RESULTS, [{"layer": 0, "experts_after": 6}], [tmp_path / "results.json"])
    rows = [r for _, r in run.logged]
    assert rows[0] == {"time/model": 1.5, "stage": "model"}
    assert rows[1] == {"unstructured/layer": 0, "unstructured/achieved": 0.5}
    assert [s for s, _ in run.logged] == sorted(s for s, _ in run.logged)      # steps only increase
    assert run.summary["metrics/toy_arith/exact_match"] == 0.5 and run.summary["sparsity/decoder_linear"] == 0.4
    assert run.saved == [str(tmp_path / "results.json")] and run.finished == 0


def test_a_failed_run_is_marked_failed(tmp_path):
    run = FakeRun()
    RunLogger(run).fail(RuntimeError("boom"))
    assert run.finished == 1 and "boom" in run.summary["error"]


def _offline_run(run_dir):
    [run] = list((run_dir / "wandb").glob("offline-run-*"))
    return run


def test_wandb_failure_warns_and_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with caplog.at_level(logging.WARNING):
        lg = RunLogger.start(_cfg("not-a-mode"), tmp_path, {})
        lg.stage("model", 1.0)
        lg.finish(RESULTS, [], [])
    assert lg.run is None and "W&B start failed" in caplog.text


def test_logger_none_does_nothing(tmp_path):
    lg = RunLogger.start(OmegaConf.create({"name": "none"}), tmp_path, {})
    lg.stage("x", 1.0)
    lg.finish(RESULTS, [], [])
    assert not (tmp_path / "wandb").exists()


def test_sweep_jobs_share_a_group(tmp_path):
    assert sweep_group(tmp_path / "out" / "multirun" / "2026-01-01" / "10-00-00" / "3") == "2026-01-01/10-00-00"
    assert sweep_group(tmp_path / "out" / "runs" / "2026-01-01" / "x") is None


@pytest.mark.parametrize("runtime", ["default", "streaming"])
def test_a_run_with_wandb_offline_keeps_local_files_and_logs_layers(runtime, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("STUN_EXP_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=toy_tiny", "eval=none", "calib.nsamples=4", "calib.seqlen=32", f"runtime={runtime}",
            "logger=wandb", "logger.mode=offline", f"out_root={tmp_path}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    res = run_pipeline(cfg, str(run_dir))
    assert json.loads((run_dir / "results.json").read_text())["complete"] and res["runtime"] in (
        "in_memory", "streaming")
    run = _offline_run(run_dir)                  # `wandb sync` uploads this folder later
    assert (run / "files" / "results.json").is_file() and list(run.glob("*.wandb"))


def test_per_layer_table_joins_experts_sparsity_and_kurtosis():
    from stun_exp.pipeline import per_layer_table
    res = {"census": {"dense": {"experts": {"0": 8}}, "pruned": {"experts": {"0": 6}}},
           "sparsity": {"expert_per_layer": {"0": 0.25}},
           "unstructured_pruning": {"per_layer": {"0": {"achieved": 0.31}}},
           "kurtosis": {"dense": {"per_layer": {"0": {"expert_pooled": 3.2}}}, "after_expert": None}}
    [row] = per_layer_table(res)
    assert row == {"layer": 0, "experts_before": 8, "experts_after": 6, "expert_sparsity": 0.25,
                   "unstructured_sparsity": 0.31, "kurtosis_dense": 3.2, "kurtosis_after_expert": None,
                   "kurtosis_after_unstructured_nonzero": None}
