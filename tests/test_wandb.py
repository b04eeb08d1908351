"""W&B logging: offline runs land in the run folder; a W&B failure warns and loses nothing."""
from __future__ import annotations

import logging

from omegaconf import OmegaConf

from stun_exp.tracking.files import atomic_write_json
from stun_exp.tracking.wandb_logger import log_run

RESULTS = {"metrics": {"toy_arith/exact_match": 0.5}, "sparsity": {"decoder_linear": 0.4}, "timings": {"x": 1.0}}


def _cfg(mode):
    return OmegaConf.create({"name": "wandb", "project": "t", "entity": None, "mode": mode, "group": None,
                             "tags": []})


def test_offline_run_writes_files_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    atomic_write_json(tmp_path / "results.json", RESULTS)
    out = log_run(_cfg("offline"), tmp_path, {"seed": 0}, RESULTS, [{"layer": 0, "experts_after": 6}],
                  [tmp_path / "results.json"])
    assert out is not None
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (runs[0] / "files" / "results.json").is_file()


def test_wandb_failure_warns_and_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with caplog.at_level(logging.WARNING):
        assert log_run(_cfg("not-a-mode"), tmp_path, {}, RESULTS) is None
    assert "W&B logging failed" in caplog.text


def test_logger_none_does_nothing(tmp_path):
    assert log_run(OmegaConf.create({"name": "none"}), tmp_path, {}, RESULTS) is None
    assert not (tmp_path / "wandb").exists()


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
