"""Fault injection: SIGKILL a multirun at random points, rerun with resume=true, lose nothing.

Every job must end complete exactly once (finished jobs are skipped on rerun, never redone), and
no results.json may be corrupt or half-written.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = "0.1,0.2,0.3,0.4"


def _cmd(sweep_dir: Path, out: Path, runtime: str) -> list[str]:
    return [sys.executable, "-m", "stun_exp.run", "-m", f"runtime={runtime}", "model=toy_tiny", "eval=none",
            "expert_pruner=none",
            "unstructured_pruner=magnitude", "sparsity=null", "calib.nsamples=2", "calib.seqlen=16",
            "resume=true", f"out_root={out}", f"hydra.sweep.dir={sweep_dir}",
            f"unstructured_pruner.sparsity={JOBS}"]


def _env(tmp: Path) -> dict:
    return dict(os.environ, STUN_EXP_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")


def _check_no_corrupt(out: Path) -> int:
    n = 0
    for p in out.glob("**/results.json"):
        json.loads(p.read_text())               # raises on a half-written file
        n += 1
    return n


@pytest.mark.parametrize("runtime", ["default", "streaming"])
def test_sigkill_multirun_then_resume_loses_nothing(tmp_path, runtime):
    rng = random.Random(0)
    sweep, out = tmp_path / "out" / "sweep", tmp_path / "out"
    kills = 0
    for _ in range(3):                          # kill at random points, several times
        p = subprocess.Popen(_cmd(sweep, out, runtime), cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(4.0, 25.0))     # the 4-job sweep takes ~20-60 s: kills land mid-job
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        _check_no_corrupt(out)
    r = subprocess.run(_cmd(sweep, out, runtime), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert not summary["failed"] and not summary["incomplete"]
    assert len(summary["done"]) + len(summary["skipped"]) == 4
    complete = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")):
        res = json.loads((job / "results.json").read_text())
        assert res["complete"]
        complete.setdefault(res["config_hash"], []).append(job.name)
    assert len(complete) == 4 and all(len(v) == 1 for v in complete.values())   # each exactly once
    assert not list(out.glob("**/.results.json.*.tmp"))
    assert not list(out.glob("**/.checkpoint.tmp-*"))        # a killed streaming write leaves no partial folder
    print(f"kills={kills} resumed_skipped={len(summary['skipped'])} redone={len(summary['done'])} lost=0")
