"""``python -m stun_exp.toy`` (also ``stun-exp-toy``): build toys outside a run.

    stun-exp-toy build seed=1 num_experts=16 intermediate_size=128   # one toy into the cache
    stun-exp-toy build-family --experts 8,16,32,64 --seeds 0,1,2 --jobs 2
    stun-exp-toy rebuild                     # retrain the shipped default from scratch, replace it
    stun-exp-toy info                        # the shipped toy's build record

Overrides are ``ToyModelCfg`` fields (``conf/model/toy.yaml`` has the same defaults; a test keeps
them equal). The cache is ``$STUN_EXP_CACHE`` (default ``~/.cache/stun_exp``), the same one runs
use, so a family built here is what ``stun-exp model=toy model.num_experts=16 ...`` loads.
``build-family`` builds toys of equal total expert size (``num_experts x intermediate_size`` =
``--total``, 2048 as the default toy's 8 x 256), otherwise the default recipe, in parallel
processes with one torch thread each (on 2 cores two such processes train ~2x faster than one
process with two threads); already-built keys are skipped, so an interrupted family resumes.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import yaml

from stun_exp.toy.config import ToyModelCfg, as_toy_cfg


def parse_overrides(items: Sequence[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"stun-exp-toy: expected key=value, got '{it}'")
        k, v = it.split("=", 1)
        out[k.removeprefix("model.")] = yaml.safe_load(v)
    return out


def default_cfg(**overrides) -> ToyModelCfg:
    return as_toy_cfg({**asdict(ToyModelCfg()), **overrides})


def family_cfgs(experts: Sequence[int], seeds: Sequence[int], total: int,
                base: Optional[ToyModelCfg] = None) -> list[ToyModelCfg]:
    """Seed-major order, so a family cut short has the same number of seeds at every size."""
    base = base or ToyModelCfg()
    for e in experts:
        if total % e:
            raise SystemExit(f"stun-exp-toy: --total {total} is not a multiple of {e} experts")
    return [replace(base, num_experts=e, intermediate_size=total // e, seed=s) for s in seeds for e in experts]


def _label(cfg: ToyModelCfg) -> str:
    return f"{cfg.num_experts}x{cfg.intermediate_size} seed {cfg.seed}"


def cmd_build(a: argparse.Namespace) -> int:
    from stun_exp.toy.build import ensure_pretrained, read_meta
    cfg = default_cfg(**parse_overrides(a.overrides))
    path = ensure_pretrained(cfg)
    meta = read_meta(path)
    print(json.dumps({"dir": str(path), "key": meta["key"], "training": meta.get("training"),
                      "dense_scores_quick": meta.get("dense_scores_quick"), "source": meta.get("source")},
                     indent=1), flush=True)
    return 0


def _child(cfg: ToyModelCfg, log_dir: Path, nice: int) -> tuple[int, float, Path]:
    """Build one toy in a child process with one torch thread, niced; returns (rc, seconds, log)."""
    ov = [f"{k}={json.dumps(v)}" for k, v in asdict(cfg).items()
          if k != "kind" and v != getattr(ToyModelCfg(), k)]
    log = log_dir / f"toy-{cfg.num_experts}x{cfg.intermediate_size}-seed{cfg.seed}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.time()
    with open(log, "a") as fh:
        rc = subprocess.call([sys.executable, "-m", "stun_exp.toy", "build", *ov], stdout=fh,
                             stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: os.nice(nice))
    return rc, time.time() - t, log


def cmd_build_family(a: argparse.Namespace) -> int:
    from stun_exp.toy.build import config_key, ensure_pretrained, is_cached, toy_root
    from stun_exp.toy.shipped import shipped_key
    base = default_cfg(**parse_overrides(a.overrides))
    cfgs = family_cfgs([int(x) for x in a.experts.split(",")], [int(x) for x in a.seeds.split(",")], a.total, base)
    shipped = [c for c in cfgs if not is_cached(c) and config_key(c) == shipped_key()]
    todo = [c for c in cfgs if not is_cached(c) and c not in shipped]
    print(f"[family] {len(cfgs)} toys: {len(cfgs) - len(todo) - len(shipped)} already built, {len(shipped)} "
          f"shipped with the package; training {len(todo)} with {a.jobs} parallel job(s), 1 torch thread "
          f"each, nice {a.nice}", flush=True)
    for c in cfgs:
        state = "to train" if c in todo else "shipped (copied)" if c in shipped else "done"
        print(f"[family]   {_label(c):22s} key {config_key(c)}  {state}")
    if a.dry_run:
        return 0
    for c in shipped:
        ensure_pretrained(c)
    if not todo:
        return 0
    log_dir = Path(a.log_dir) if a.log_dir else toy_root(cfgs[0]) / "family-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[family] logs: {log_dir}", flush=True)
    failed = []

    def one(c: ToyModelCfg) -> None:
        rc, secs, log = _child(c, log_dir, a.nice)
        state = "built" if rc == 0 else f"FAILED (exit {rc})"
        print(f"[family] {state}: {_label(c)} in {secs / 60:.1f} min ({log})", flush=True)
        if rc:
            failed.append(_label(c))
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        list(pool.map(one, todo))
    print(f"[family] done: {len(todo) - len(failed)} built, {len(failed)} failed {failed}", flush=True)
    return 1 if failed else 0


def cmd_rebuild(a: argparse.Namespace) -> int:
    """Train the default toy from nothing (ignoring the shipped one) and ship the result."""
    from stun_exp.toy import shipped
    from stun_exp.toy.build import ensure_pretrained
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    dest = Path(a.dest) if a.dest else shipped.SHIPPED_DIR
    before = shipped.shipped_meta(dest)
    with tempfile.TemporaryDirectory(prefix="toy-rebuild-") as tmp:
        path = ensure_pretrained(replace(ToyModelCfg(), cache_dir=tmp), use_shipped=False)
        meta = shipped.publish(path, dest)
        shutil.rmtree(path, ignore_errors=True)
    same = before is not None and before.get("weights_sha256") == meta["weights_sha256"]
    print(json.dumps({"shipped_dir": str(dest), "key": meta["key"], "weights_sha256": meta["weights_sha256"],
                      "identical_to_previous": same, "training": meta["training"],
                      "dense_scores_quick": meta.get("dense_scores_quick")}, indent=1))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from stun_exp.toy import shipped
    from stun_exp.toy.build import config_key
    meta = shipped.shipped_meta()
    if meta is None:
        print("no shipped toy in this install")
        return 1
    print(json.dumps({**meta, "default_config_key": config_key(ToyModelCfg()),
                      "matches_default": meta["key"] == config_key(ToyModelCfg())}, indent=1))
    return 0


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="stun-exp-toy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or load) one toy: key=value overrides of the default")
    b.add_argument("overrides", nargs="*")
    f = sub.add_parser("build-family", help="toys of equal total expert size x training seeds")
    f.add_argument("overrides", nargs="*", help="key=value changes to the default recipe for every toy")
    f.add_argument("--experts", default="8,16,32,64")
    f.add_argument("--seeds", default="0,1,2")
    f.add_argument("--total", type=int, default=ToyModelCfg().num_experts * ToyModelCfg().intermediate_size,
                   help="num_experts x intermediate_size (default: the default toy's)")
    f.add_argument("--jobs", type=int, default=2, help="parallel build processes (1 torch thread each)")
    f.add_argument("--nice", type=int, default=10, help="niceness of the build processes")
    f.add_argument("--log-dir", default=None, help="default: <cache>/toy/family-logs")
    f.add_argument("--dry-run", action="store_true", help="list the family and what is built")
    r = sub.add_parser("rebuild", help="retrain the shipped default toy from scratch and replace it")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: as recorded for the shipped toy; weights are "
                        "reproducible bit for bit only with the same CPU and thread count)")
    r.add_argument("--dest", default=None, help="where to write it (default: the package's shipped dir)")
    sub.add_parser("info", help="print the shipped toy's build record")
    a = ap.parse_args(argv)
    if a.cmd == "rebuild" and a.threads is None:
        from stun_exp.toy.shipped import shipped_meta
        a.threads = ((shipped_meta() or {}).get("training") or {}).get("threads")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    from stun_exp.errors import ConfigError
    a = parse_args(argv)
    try:
        return {"build": cmd_build, "build-family": cmd_build_family, "rebuild": cmd_rebuild,
                "info": cmd_info}[a.cmd](a)
    except ConfigError as e:          # a bad key=value: one line, before anything trains
        print(f"stun-exp-toy: error: {e}", file=sys.stderr, flush=True)
        return 2
