"""Foundation timings: toy build from nothing, main job cold and warm, test-suite time.

    .venv/bin/python benchmarks/bench_foundation.py [--skip-tests]

Cold = empty cache (builds the toy, evaluates the dense model); warm = toy and dense metrics cached.
Prints a table of measured wall times; nothing here is estimated.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict) -> tuple[float, int]:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
    return time.perf_counter() - t, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, STUN_EXP_CACHE=tmp, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   WANDB_MODE="disabled")
        out = f"out_root={tmp}/out"
        rows = []
        build = [py, "-c", "from stun_exp.toy.build import ensure_toy; from stun_exp.toy.config import ToyModelCfg;"
                 "ensure_toy(ToyModelCfg())"]
        rows.append(("toy build from nothing", *timed(build, env)))
        rows.append(("main job, cold (toy cached, dense eval not)", *timed([py, "-m", "stun_exp.run", out], env)))
        rows.append(("main job, warm (toy + dense eval cached)", *timed([py, "-m", "stun_exp.run", out], env)))
        if not args.skip_tests:
            rows.append(("test suite (pytest)", *timed([py, "-m", "pytest", "-q"], env)))
    print(f"{'what':48s} {'seconds':>9s} {'exit':>5s}")
    for name, sec, rc in rows:
        print(f"{name:48s} {sec:9.1f} {rc:5d}")


if __name__ == "__main__":
    main()
