"""End-to-end: the Hydra app on the tiny toy, a 2-job multirun, and fast one-line config errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=toy_tiny", "calib.nsamples=4", "calib.seqlen=32"]


def stun_exp(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, STUN_EXP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "stun_exp.run", *args, f"out_root={tmp_path / 'out'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def results(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "out").glob("**/results.json"))


def test_single_run_writes_a_complete_run_folder(tmp_path):
    r = stun_exp([*TINY, "eval=toy", "eval.limit=8", "expert_pruner=frequency", "expert_pruner.expert_sparsity=0.25",
                  "unstructured_pruner=magnitude", "sparsity=0.4", "save_checkpoint=true"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    [res_path] = results(tmp_path)
    run_dir = res_path.parent
    res = json.loads(res_path.read_text())
    assert res["complete"] and "runs" in run_dir.parts
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    plan = json.loads((run_dir / "expert_plan.json").read_text())
    assert plan["experts_before"] == 8 and plan["experts_after"] == 6        # 4 experts x 2 layers, 25% removed
    assert res["sparsity"]["decoder_linear"] == pytest.approx(0.4, abs=0.005)
    assert res["sparsity"]["expert"] == pytest.approx(0.25)
    assert set(res["metrics"]) == set(res["dense_metrics"]) and res["metrics"]
    assert "| metric" in r.stdout and "sparsity/decoder_linear" in r.stdout
    from stun_exp.models.loading import load_pretrained
    model, tok = load_pretrained(str(run_dir / "checkpoint"))
    assert model.config.num_experts_per_layer == [3, 3]


@pytest.mark.parametrize("runtime", ["default", "streaming"])
def test_two_job_multirun_and_resume(tmp_path, runtime):
    args = ["-m", *TINY, f"runtime={runtime}", "eval=none", "expert_pruner=none", "unstructured_pruner=magnitude", "sparsity=null",
            "hydra.sweep.dir=" + str(tmp_path / "out" / "sweep"), "unstructured_pruner.sparsity=0.2,0.5"]
    r = stun_exp(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads(p.read_text()) for p in results(tmp_path)]
    assert sorted(round(x["sparsity"]["targeted"], 2) for x in res) == [0.2, 0.5]
    summary = json.loads((tmp_path / "out" / "sweep" / "sweep_summary.json").read_text())
    assert len(summary["done"]) == 2
    r = stun_exp([*args, "resume=true"], tmp_path)                    # rerun: both jobs are skipped
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "sweep" / "sweep_summary.json").read_text())
    assert len(summary["skipped"]) == 2 and not summary["done"]


def test_bad_value_fails_fast_with_one_line(tmp_path):
    """Through the installed `stun-exp` console script, from another directory (as a user runs it)."""
    script = Path(sys.executable).with_name("stun-exp")
    assert script.is_file(), "the package is not installed with its console script"
    env = dict(os.environ, STUN_EXP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    # -X importtime lists every module imported: fast means torch, transformers and numpy never are
    r = subprocess.run([sys.executable, "-X", "importtime", str(script), "expert_pruner=frequency",
                        "expert_pruner.expert_sparsity=1.5"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    err = [line for line in lines if not line.startswith("import time:")]
    assert len(err) == 1 and "expert_pruner.expert_sparsity=1.5" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "hydra" in imported and not imported & {"torch", "transformers", "numpy"}
    assert not (tmp_path / "cache").exists()                          # nothing was built or loaded


@pytest.mark.parametrize("extra", [[], ["hydra.mode=RUN"], ["hydra.mode=MULTIRUN"], ["sparsity=0.2,0.6"]])
def test_preflight_hands_hydra_the_mode_its_own_probe_would_find(tmp_path, extra):
    """A single run skips Hydra's mode probe (a whole compose) with the value the preflight read;
    sweeps are left to the probe. The probe is restored after the run."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    from stun_exp.config.preflight import preflight
    from stun_exp.run import CONF_DIR, _mode_known
    overrides = ["eval=none", f"out_root={tmp_path / 'out'}", *extra]
    sweep_or_multirun = extra in (["hydra.mode=MULTIRUN"], ["sparsity=0.2,0.6"])
    found = preflight(overrides, CONF_DIR)
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(task_name="probe", config_search_path=create_config_search_path(str(CONF_DIR)))
    try:
        probed = hydra.get_mode("config", overrides)
        assert (found is None) == sweep_or_multirun
        if found is not None:
            assert found == {"hydra_mode": probed}
            original = Hydra.get_mode
            with _mode_known(found["hydra_mode"]):
                assert hydra.get_mode("config", ["no_such_key=1"]) == probed
            assert Hydra.get_mode is original
    finally:
        GlobalHydra.instance().clear()
