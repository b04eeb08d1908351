"""The dense analysis cache: keyed by what the numbers depend on, a hit gives the numbers a fresh read
gives, a changed checkpoint is read again, and results.json says which happened."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from stun_exp.analysis import dense_cache
from stun_exp.pipeline import run_pipeline
from stun_exp.run import CONF_DIR
from tests.tiny_models import tiny_model

CALIB = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))


def _save(path: Path, seed: int = 0) -> Path:
    m = tiny_model("mixtral")
    if seed:                                  # other weights, the same names, shapes and file sizes
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    m.save_pretrained(path)
    return path


def _key(src: Path, **kw) -> str:
    args = {"model_cfg": {"kind": "hf"}, "dtype": "torch.float32", "device": "cpu", "runtime": "in_memory"}
    args.update(kw)
    return dense_cache.cache_key(str(src), **args)


def test_key_follows_files_config_dtype_and_runtime(tmp_path):
    src = _save(tmp_path / "m")
    k = _key(src)
    assert k is not None and k == _key(src)
    assert len({k, _key(src, model_cfg={"kind": "hf", "dtype": "bfloat16"}), _key(src, dtype="torch.bfloat16"),
                _key(src, device="cuda"), _key(src, runtime="streaming")}) == 5
    _save(src, seed=1)                        # the same files rewritten (same names and sizes)
    assert _key(src) != k
    assert dense_cache.checkpoint_files(str(tmp_path / "missing-dir")) is None


def test_key_follows_the_analysis_engine(tmp_path, monkeypatch):
    """An install without the C scan rounds the kurtosis differently: it does not reuse its entries."""
    from stun_exp.analysis import weight_report
    src = _save(tmp_path / "m")
    k = _key(src)
    monkeypatch.setattr(weight_report, "native", None if weight_report.native is not None else object())
    assert _key(src) != k


def test_hit_miss_off_and_unreadable_entry(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"census": {"n": 3}, "kurtosis": {"model": {"k": math.nan, "e": 1.25}}}
    first, info1 = dense_cache.cached_report(tmp_path, "abc", compute)
    second, info2 = dense_cache.cached_report(tmp_path, "abc", compute)
    assert (info1["cache"], info2["cache"], len(calls)) == ("miss", "hit", 1)
    assert second["census"] == first["census"] and second["kurtosis"]["model"]["e"] == 1.25
    assert math.isnan(second["kurtosis"]["model"]["k"])
    (tmp_path / dense_cache.SUBDIR / "abc.json").write_text("{not json")
    assert dense_cache.cached_report(tmp_path, "abc", compute)[1]["cache"] == "miss" and len(calls) == 2
    assert dense_cache.cached_report(None, "abc", compute)[1] == {"cache": "off", "key": None}
    assert dense_cache.cached_report(tmp_path, None, compute)[1] == {"cache": "no key", "key": None}
    assert len(calls) == 4


def test_cache_entry_skips_the_fsync_that_results_keep(tmp_path, monkeypatch):
    """A cache entry is recomputed when unreadable, so it is not fsynced (an fsync can wait for the
    journal to commit whatever else is pending); results files still are."""
    import os

    from stun_exp.tracking import files
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    dense_cache.cached_report(tmp_path, "k1", lambda: {"census": {}, "kurtosis": {}})
    assert (tmp_path / dense_cache.SUBDIR / "k1.json").is_file() and synced == []
    files.atomic_write_json(tmp_path / "results.json", {"a": 1})
    assert len(synced) == 1


def _run(tmp: Path, src: Path, name: str, *extra: str) -> dict:
    torch.save(CALIB, tmp / "calib.pt")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=hf", f"model.name_or_path={src}", "calib=tokens", f"calib.path={tmp / 'calib.pt'}",
            "calib.nsamples=4", "calib.seqlen=16", "eval=none", "expert_pruner=none",
            "unstructured_pruner=wanda", "sparsity=null", "unstructured_pruner.sparsity=0.5", f"out_root={tmp}",
            *extra])
    (tmp / name).mkdir()
    run_pipeline(cfg, str(tmp / name))
    return json.loads((tmp / name / "results.json").read_text())


@pytest.mark.parametrize("runtime", ["default", "streaming"])
def test_runs_record_hits_with_the_numbers_of_a_fresh_read(tmp_path, monkeypatch, runtime):
    monkeypatch.setenv("STUN_EXP_CACHE", str(tmp_path / "cache"))
    src = _save(tmp_path / "m")
    rt = f"runtime={runtime}"
    a, b, off = (_run(tmp_path, src, "a", rt), _run(tmp_path, src, "b", rt),
                 _run(tmp_path, src, "off", rt, "analysis_cache=false"))
    assert [r["dense_analysis"]["cache"] for r in (a, b, off)] == ["miss", "hit", "off"]
    for r in (b, off):
        assert r["census"]["dense"] == a["census"]["dense"]
        assert r["kurtosis"]["dense"] == a["kurtosis"]["dense"]
        assert r["sparsity"] == a["sparsity"] and r["mask_digest"] == a["mask_digest"]
    _save(src, seed=1)                        # another checkpoint in the same folder: read again
    c = _run(tmp_path, src, "c", rt)
    assert c["dense_analysis"]["cache"] == "miss" and c["kurtosis"]["dense"] != a["kurtosis"]["dense"]
