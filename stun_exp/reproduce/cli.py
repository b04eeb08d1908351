"""``stun-exp-reproduce <table>``: run a paper table's sweep (reusing finished runs), then rebuild it.

    stun-exp-reproduce arctic                      # toy counterpart: launch missing runs, build tables
    stun-exp-reproduce arctic --mode real          # the real-model sweep (needs the models and a GPU)
    stun-exp-reproduce all --no-run                # rebuild every table from existing run folders only
    stun-exp-reproduce kurtosis --dry-run          # print the sweeps and how many jobs are done

Writes ``<out>/<table>_<mode>.{md,tex,csv}`` and ``<out>/<table>_<mode>_<plot>.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from stun_exp.errors import ConfigError


def build(exp_name: str, mode: str, runs_root: Path, out: Path, exp_dir: Optional[Path] = None,
          match: str = "hash") -> list[Path]:
    """Build one experiment's table files and plots from the run folders under ``runs_root``.

    match="hash": only runs whose config hash is one of the experiment's jobs (exact settings);
    match="select": every run matching the experiment's `select` values and methods.
    """
    from stun_exp.reproduce.collect import collect_runs
    from stun_exp.reproduce.plots import plot
    from stun_exp.reproduce.spec import load_experiment
    from stun_exp.reproduce.tables import build_table, run_rows, to_csv, to_latex, to_markdown

    exp = load_experiment(exp_name, exp_dir)
    runs = collect_runs(runs_root)
    hashes = None
    if match == "hash":
        from stun_exp.reproduce.launch import expected_hashes
        hashes, failed = expected_hashes(exp, mode)
        if failed:
            print(f"[reproduce] warning: {failed} job(s) of {exp.name}/{mode} could not be composed here; "
                  "their runs cannot be matched (use --match select)", file=sys.stderr)
    df = build_table(exp, runs, mode, hashes)
    n = len(run_rows(exp, runs, mode, hashes))
    stem = out / f"{exp.name}_{mode}"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for suffix, text in ((".md", to_markdown(df, exp, mode, n)), (".tex", to_latex(df, exp, mode, n)),
                         (".csv", to_csv(df))):
        p = stem.with_suffix(suffix)
        p.write_text(text)
        files.append(p)
    for spec in exp.plots:
        files.append(plot(exp, df, spec, mode, out / f"{exp.name}_{mode}_{spec['file']}.png"))
    return files


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="stun-exp-reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", help="experiment name (experiments/<name>.yaml) or 'all'")
    ap.add_argument("--mode", choices=["toy", "real"], default="toy")
    ap.add_argument("--no-run", action="store_true", help="build from existing run folders only")
    ap.add_argument("--dry-run", action="store_true", help="print the sweeps and their done counts")
    ap.add_argument("--out", default="docs/tables", help="where tables and plots go")
    ap.add_argument("--out-root", default="outputs", help="run folders (the runner's out_root)")
    ap.add_argument("--experiments", default=None, help="folder of experiment YAMLs")
    ap.add_argument("--match", choices=["hash", "select"], default="hash",
                    help="hash: only runs of the experiment's own jobs (default); select: any run that "
                         "matches the experiment's select values and methods")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    from stun_exp.reproduce.spec import available, load_experiment
    exp_dir = Path(a.experiments) if a.experiments else None
    failures: list[str] = []
    try:
        names = available(exp_dir) if a.table == "all" else [a.table]
        for name in names:
            exp = load_experiment(name, exp_dir)
            if a.mode not in exp.modes:
                raise ConfigError("--mode", a.mode, list(exp.modes))
            if not a.no_run:
                from stun_exp.reproduce.launch import launch
                for r in launch(exp, a.mode, Path(a.out_root).resolve(), dry_run=a.dry_run):
                    print(f"[reproduce] {r['already_complete']}/{r['jobs']} done before; rc={r['returncode']}; "
                          f"{len(r['failed'])} failed: {r['command']}", flush=True)
                    failures += r["failed"] + ([] if r["returncode"] in (0, None) else [r["command"]])
            if not a.dry_run:
                for p in build(name, a.mode, Path(a.out_root), Path(a.out), exp_dir, a.match):
                    print(f"[reproduce] wrote {p}", flush=True)
    except ConfigError as e:
        print(f"stun-exp-reproduce: error: {e}", file=sys.stderr)
        return 2
    if failures:
        print(f"stun-exp-reproduce: {len(failures)} job(s) failed (tables built from the runs that "
              f"finished); first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
