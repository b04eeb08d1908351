"""Run folders: atomic writes, config hashing, refusing/skipping finished runs, sweep summaries."""
from __future__ import annotations

import json
import os

import pytest
from omegaconf import OmegaConf

from stun_exp.errors import ConfigError
from stun_exp.tracking import files, run_record, sweep


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "results.json"
    files.atomic_write_json(p, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        files.atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["results.json"]   # no temp file left behind


def test_config_hash_ignores_bookkeeping_keys():
    a = OmegaConf.create({"seed": 0, "sparsity": 0.4, "out_root": "x", "logger": {"name": "none"}})
    b = OmegaConf.create({"seed": 0, "sparsity": 0.4, "out_root": "y", "logger": {"name": "wandb"}})
    c = OmegaConf.create({"seed": 1, "sparsity": 0.4, "out_root": "x", "logger": {"name": "none"}})
    assert run_record.config_hash(a) == run_record.config_hash(b) != run_record.config_hash(c)


def _finished(d, chash):
    files.atomic_write_json(d / "results.json", {"complete": True, "config_hash": chash})


def test_finished_folder_is_refused_unless_resuming(tmp_path):
    _finished(tmp_path, "h1")
    cfg = OmegaConf.create({"resume": False, "out_root": str(tmp_path)})
    with pytest.raises(ConfigError, match="resume=true"):
        sweep.check_run_dir(cfg, tmp_path, "h1")
    cfg.resume = True
    assert sweep.check_run_dir(cfg, tmp_path, "h1")["skipped"] is True


def test_resume_skips_identical_config_elsewhere_and_redoes_incomplete(tmp_path):
    (tmp_path / "old").mkdir()
    _finished(tmp_path / "old", "h1")
    new = tmp_path / "new"
    new.mkdir()
    files.atomic_write_json(new / "results.json", {"complete": False, "config_hash": "h1"})
    cfg = OmegaConf.create({"resume": True, "out_root": str(tmp_path)})
    assert sweep.check_run_dir(cfg, new, "h1")["skipped"] is True
    assert json.loads((new / "skipped.json").read_text())["complete_run"] == str(tmp_path / "old")
    assert sweep.check_run_dir(cfg, new, "h2") is None            # different config: run it


def test_sweep_summary_lists_done_skipped_failed(tmp_path):
    for name in "0123":
        (tmp_path / name).mkdir()
    _finished(tmp_path / "0", "h")
    files.atomic_write_json(tmp_path / "1" / "skipped.json", {"complete_run": "x", "config_hash": "h"})
    sweep.record_failure(str(tmp_path / "2"), ValueError("bad"))
    s = sweep.summarise(tmp_path)
    assert [len(s[k]) for k in ("done", "skipped", "failed", "incomplete")] == [1, 1, 1, 1]
    assert s["failed"][0]["reason"] == "ValueError: bad"
