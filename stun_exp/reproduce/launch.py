"""Launch an experiment's sweeps through the ``stun-exp`` Hydra app, reusing finished runs.

Each sweep (a list of overrides, comma lists swept by Hydra's basic sweeper) is expanded into
its jobs here, each job's config is composed and hashed exactly as the runner hashes it
(``tracking.run_record.config_hash``), and a sweep whose every job already has a complete run
folder under ``out_root`` is not launched at all. Otherwise the whole sweep runs as one
subprocess multirun with ``resume=true``: the runner itself skips the finished jobs. The sweep
folder is fixed per (experiment, mode, sweep index), so an interrupted sweep resumes in place.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from stun_exp.reproduce.spec import Experiment

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def expand_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of one multirun: the cartesian product of every sweep override's values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        vals = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in vals])
    return [list(c) for c in itertools.product(*choices)]


def job_hashes(jobs: list[list[str]]) -> list[Optional[str]]:
    """config_hash of each job's config as the runner records it (None where it cannot be composed here).

    One Hydra composition per distinct set of group choices (``config.compose``): an experiment's
    jobs mostly differ only in values."""
    from stun_exp.config.compose import Composer
    from stun_exp.config.schema import register_all
    from stun_exp.config.sparsity import effective
    from stun_exp.tracking.run_record import config_hash
    try:
        register_all()
    except Exception:  # noqa: BLE001 - a broken schema module: nothing can be composed
        return [None] * len(jobs)
    out: list[Optional[str]] = []
    with Composer(CONF_DIR) as composer:
        for job in jobs:
            try:
                out.append(config_hash(effective(composer.compose(job))[0]))
            except Exception:  # noqa: BLE001 - the runner will report a bad override itself
                out.append(None)
    return out


def job_hash(overrides: list[str]) -> Optional[str]:
    return job_hashes([overrides])[0]


def expected_hashes(exp: Experiment, mode: str) -> tuple[set[str], int]:
    """Config hashes of every job of the experiment's sweeps in ``mode``, and how many jobs could
    not be composed here (those cannot be matched by hash)."""
    hashes = job_hashes([job for sweep in exp.modes[mode].sweeps for job in expand_jobs(sweep)])
    return {h for h in hashes if h is not None}, sum(h is None for h in hashes)


def complete_hashes(out_root: Path) -> set[str]:
    out = set()
    for p in sorted(out_root.glob("**/results.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if r.get("complete") and r.get("config_hash"):
            out.add(r["config_hash"])
    return out


def sweep_command(exp: Experiment, mode: str, i: int, sweep: list[str], out_root: Path) -> list[str]:
    sweep_dir = out_root / "reproduce" / exp.name / mode / f"sweep{i}"
    return [sys.executable, "-m", "stun_exp.run", "--multirun", *sweep, f"out_root={out_root}",
            "resume=true", f"hydra.sweep.dir={sweep_dir}"]


def sweep_failures(cmd: list[str]) -> list[str]:
    """Failure reasons the runner's sweep summary records for this sweep (it keeps going on errors)."""
    sweep_dir = next((c.split("=", 1)[1] for c in cmd if c.startswith("hydra.sweep.dir=")), None)
    p = Path(sweep_dir) / "sweep_summary.json" if sweep_dir else None
    if p is None or not p.is_file():
        return []
    try:
        summary = json.loads(p.read_text())
    except (OSError, ValueError):
        return []
    return [f"job {f.get('job')}: {f.get('reason')}" for f in summary.get("failed", [])]


def plan_sweeps(exp: Experiment, mode: str, out_root: Path) -> list[tuple[list[str], int, int]]:
    """(command, jobs, jobs already complete) per sweep of the experiment's mode."""
    done = complete_hashes(out_root)
    plans = []
    for i, sweep in enumerate(exp.modes[mode].sweeps):
        hashes = job_hashes(expand_jobs(sweep))
        n_done = sum(1 for h in hashes if h is not None and h in done)
        plans.append((sweep_command(exp, mode, i, sweep, out_root), len(hashes), n_done))
    return plans


def launch(exp: Experiment, mode: str, out_root: Path, dry_run: bool = False) -> list[dict]:
    """Run every sweep that still has unfinished jobs; returns what was done per sweep."""
    report = []
    for cmd, n, n_done in plan_sweeps(exp, mode, out_root):
        entry = {"command": " ".join(cmd[1:]), "jobs": n, "already_complete": n_done, "returncode": None,
                 "failed": []}
        if n_done < n and not dry_run:
            print(f"[reproduce] {exp.name}/{mode}: {n - n_done} of {n} job(s) to run: {' '.join(cmd[2:])}",
                  flush=True)
            entry["returncode"] = subprocess.run(cmd, cwd=str(CONF_DIR.parent)).returncode
            entry["failed"] = sweep_failures(cmd)
        report.append(entry)
    return report
