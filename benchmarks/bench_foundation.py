"""Foundation timings: toy build from nothing, main job cold and warm, test-suite time.

    .venv/bin/python benchmarks/bench_foundation.py [--skip-tests] [--reuse-toy]

Cold = no cached dense-model metrics (the toy is built, or copied from the cache with --reuse-toy);
warm = toy and dense metrics cached. --reuse-toy skips the ~10 min build and prints the build time
the cached toy recorded when it was built (and where). Every other number is measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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


def copy_cached_toy(dest_cache: str) -> tuple[str, float]:
    """Copy the default toy from the user's cache (without its dense-eval cache)."""
    from stun_exp.toy.build import ensure_toy, read_meta
    from stun_exp.toy.config import ToyModelCfg
    src = ensure_toy(ToyModelCfg())                     # cached: returns at once
    dst = Path(dest_cache) / "toy" / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("dense_eval"))
    meta = read_meta(src)
    where = meta.get("built_on", "this machine")
    return f"toy build (recorded at build time, {where})", float(meta["training"]["build_seconds"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--reuse-toy", action="store_true", help="copy the cached toy instead of building it")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, STUN_EXP_CACHE=tmp, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   WANDB_MODE="disabled")
        out = f"out_root={tmp}/out"
        rows = []
        if args.reuse_toy:
            name, sec = copy_cached_toy(tmp)
            rows.append((name, sec, 0))
        else:
            build = [py, "-c", "from stun_exp.toy.build import ensure_toy; from stun_exp.toy.config import "
                     "ToyModelCfg; ensure_toy(ToyModelCfg())"]
            rows.append(("toy build from nothing", *timed(build, env)))
        rows.append(("main job, cold (toy cached, dense eval not)", *timed([py, "-m", "stun_exp.run", out], env)))
        rows.append(("main job, warm (toy + dense eval cached)", *timed([py, "-m", "stun_exp.run", out], env)))
        if not args.skip_tests:
            rows.append(("test suite (pytest)", *timed([py, "-m", "pytest", "-q"], env)))
    print(f"{'what':56s} {'seconds':>9s} {'exit':>5s}")
    for name, sec, rc in rows:
        print(f"{name:56s} {sec:9.1f} {rc:5d}")
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
