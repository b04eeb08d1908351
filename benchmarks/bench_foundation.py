"""What a newcomer sees: the main job on a fresh clone, cold (empty cache) and warm, plus the tests.

    python benchmarks/bench_foundation.py [--setup] [--repeat N] [--tests] [--threads-env 1]

Clones the committed HEAD of this repository into a temp dir (so only what git ships is there: the
shipped toy must come from the clone, not from a local cache), points ``STUN_EXP_CACHE`` at an empty
temp dir, and times ``stun-exp`` there: cold (the toy is copied out of the package, the dense model
is evaluated) and then warm (toy and dense metrics cached). ``--setup`` runs ``bash
scripts/setup.sh`` in the clone first and uses its ``.venv/bin/stun-exp`` (needs the package index);
without it the clone runs with this interpreter (``python -m stun_exp.run`` from the clone).
Checks that nothing was trained (the toy's build record says it came from the package and no
"training the toy" line was printed) and prints the summary table and the machine load around each
run: on a shared machine, the load matters as much as the code.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict) -> dict:
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if r.returncode != 0:
        print(r.stdout[-1500:], r.stderr[-3000:], file=sys.stderr)
    return {"seconds": round(secs, 1), "rc": r.returncode, "load_1min_before": round(load0, 2),
            "load_1min_after": round(os.getloadavg()[0], 2), "stdout": r.stdout, "stderr": r.stderr}


def stage_times(run_dir_root: Path) -> dict:
    """Stage timings of the newest run folder (from its results.json)."""
    files = sorted(run_dir_root.glob("runs/*/*/results.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()).get("timings", {}) if files else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="run scripts/setup.sh in the clone (installs .venv)")
    ap.add_argument("--repeat", type=int, default=1, help="cold+warm pairs (each cold one on a new empty cache)")
    ap.add_argument("--tests", action="store_true", help="also time the test suite in the clone")
    ap.add_argument("--threads-env", default=None, help="set OMP_NUM_THREADS for the runs (default: unset)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stun-exp-fresh-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                              text=True).stdout.strip()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
        if a.threads_env:
            env["OMP_NUM_THREADS"] = a.threads_env
        rows = []
        if a.setup:
            rows.append(("bash scripts/setup.sh", run(["bash", "scripts/setup.sh"], clone, env)))
            job = [str(clone / ".venv/bin/stun-exp")]
            py = str(clone / ".venv/bin/python")
        else:
            env["PYTHONPATH"] = str(clone)
            py = sys.executable
            job = [py, "-m", "stun_exp.run"]
        for i in range(a.repeat):
            cache = Path(tmp) / f"cache{i}"
            env["STUN_EXP_CACHE"] = str(cache)
            out = Path(tmp) / f"out{i}"
            cold = run(job + [f"out_root={out}"], clone, env)
            cold["stages"] = stage_times(out)
            trained = "training the toy" in cold["stderr"]
            metas = list(cache.glob("toy/*/toy_meta.json"))
            source = json.loads(metas[0].read_text()).get("source", "trained here") if metas else None
            rows.append((f"main job, cold (empty cache) #{i + 1}", cold))
            warm = run(job + [f"out_root={out}"], clone, env)
            warm["stages"] = stage_times(out)
            rows.append((f"main job, warm #{i + 1}", warm))
            print(f"[bench] run {i + 1}: trained anything: {trained}; toy source: {source}", flush=True)
        if a.tests:
            rows.append(("test suite (pytest -q)", run([py, "-m", "pytest", "-q"], clone, env)))
    print(f"commit {head}; {os.cpu_count()} CPUs; OMP_NUM_THREADS={a.threads_env or 'unset'}")
    print(f"{'what':38s} {'seconds':>8s} {'rc':>3s} {'load before/after':>18s}  stages (s)")
    for name, r in rows:
        st = " ".join(f"{k}={v:.0f}" for k, v in r.get("stages", {}).items() if v >= 0.5)
        print(f"{name:38s} {r['seconds']:8.1f} {r['rc']:3d} {r['load_1min_before']:8.2f}/{r['load_1min_after']:<8.2f}  {st}")
    last = next((r for n, r in reversed(rows) if n.startswith("main job")), None)
    if last is not None:
        table = re.findall(r"^\|.*\|$", last["stdout"], flags=re.M)
        print("\nthe main job's table (last run):\n" + "\n".join(table))


if __name__ == "__main__":
    main()
