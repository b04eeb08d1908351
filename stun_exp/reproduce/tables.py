"""Run records -> the paper's table with our numbers, the paper's and the difference.

Deterministic: rows are sorted (index keys in order; methods in the experiment file's order),
numbers use one fixed format, and nothing time- or machine-dependent is written, so building
twice from the same run folders gives byte-identical Markdown, LaTeX and CSV.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional

import pandas as pd

from stun_exp.reproduce.collect import matches
from stun_exp.reproduce.spec import Experiment

RUNS_COL = "runs"
UNITS_COL = "units"      # independent units (training seeds) behind a row, with `unit:` set
UNIT = "__unit"          # a run row's unit value
PER_UNIT = "__per_unit"  # an aggregated row's per-unit means (for the paired gap)
DERIVED = ("mean_of", "sum_of", "diff_of")


def _num(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _key(v: Any) -> Any:
    """Canonical row-key value: numbers rounded (0.4 from YAML == 0.4000000001 from a run)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):   # null in YAML / missing in a run
        return None
    f = _num(v) if not isinstance(v, bool) else None
    return round(f, 6) if f is not None else str(v)


def method_of(exp: Experiment, rec: dict[str, Any]) -> Optional[dict[str, Any]]:
    for m in exp.methods:
        if matches(rec, m.get("match", {})):
            return m
    return None


def key_path(exp: Experiment, key: str, mode: str) -> Optional[str]:
    v = exp.keys[key]
    return v.get(mode) if isinstance(v, dict) else v


def run_rows(exp: Experiment, runs: pd.DataFrame, mode: str,
             hashes: Optional[set[str]] = None) -> list[dict[str, Any]]:
    """One row per selected run: its row keys and its column values (scaled).

    A run is selected when it matches the mode's `select` values and, when ``hashes`` is given (the
    config hashes of the experiment's own jobs), when its config hash is one of them: then runs
    made with other settings (another calibration size, say) never leak into the table.
    """
    sel = exp.modes[mode].select if mode in exp.modes else {}
    out = []
    for rec in runs.to_dict("records") if len(runs) else []:
        if not matches(rec, sel) or (hashes is not None and rec.get("config_hash") not in hashes):
            continue
        m = method_of(exp, rec)
        if m is None:
            continue
        row: dict[str, Any] = {}
        for k in exp.index:
            row[k] = m["label"] if k == "method" else _key(m.get("set", {}).get(k, rec.get(key_path(exp, k, mode))))
        for c in exp.columns:
            path = column_path(c, mode)
            v = _num(rec.get(path)) if path else None
            row[c["name"]] = None if v is None else v * float(c.get("scale", 1))
        _derived(exp, row, mode)
        if exp.unit:
            row[UNIT] = _key(rec.get(exp.unit))
        out.append(row)
    return out


def column_path(col: dict[str, Any], mode: str) -> Optional[str]:
    """The run-record path of a column in this mode (None: not measured in this mode)."""
    return col.get(mode, col.get("path"))


def _derived(exp: Experiment, row: dict[str, Any], mode: str) -> None:
    """mean_of / sum_of / diff_of columns over the source columns this mode measures.

    mean_of and sum_of skip sources this mode does not measure; any missing value gives None.
    diff_of: [a, b] is a - b.
    """
    by_name = {c["name"]: c for c in exp.columns}
    measured = lambda n: column_path(by_name[n], mode) or any(op in by_name[n] for op in DERIVED)  # noqa: E731
    for c in exp.columns:
        for op in DERIVED:
            if op not in c:
                continue
            srcs = c[op] if op == "diff_of" else [s for s in c[op] if measured(s)]
            vals = [row.get(s) for s in srcs]
            if not vals or any(v is None for v in vals):
                row[c["name"]] = None
            elif op == "diff_of":
                row[c["name"]] = vals[0] - vals[1]
            else:
                row[c["name"]] = sum(vals) / (len(vals) if op == "mean_of" else 1)


def measured_columns(exp: Experiment, mode: str) -> list[str]:
    """Columns this mode measures (a toy has no MMLU column); derived ones need a measured source."""
    by_name = {c["name"]: c for c in exp.columns}

    def measured(name: str) -> bool:
        c = by_name[name]
        srcs = [s for op in DERIVED for s in c.get(op, [])]
        return bool(column_path(c, mode)) or any(measured(s) for s in srcs)
    return [c for c in exp.column_names() if measured(c)]


def sd_name(col: str) -> str:
    """Column holding the sample standard deviation of ``col`` over the runs (seeds) of a row."""
    return f"{col} sd"


def ci_name(col: str) -> str:
    """Column holding the half-width of the 95% t-interval of ``col``'s mean over the units of a row."""
    return f"{col} ci95"


def ci95(xs: list[float]) -> Optional[float]:
    """Half-width of the two-sided 95% Student-t interval of the mean of ``xs`` (None below 2)."""
    if len(xs) < 2:
        return None
    from scipy.stats import t
    return float(t.ppf(0.975, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))


def _spread(vals: dict[str, Any], c: str, xs: list[float], with_ci: bool) -> None:
    vals[c] = sum(xs) / len(xs) if xs else None
    vals[sd_name(c)] = statistics.stdev(xs) if len(xs) > 1 else None
    if with_ci:
        vals[ci_name(c)] = ci95(xs)


def aggregate(exp: Experiment, rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Mean and sample std over runs sharing the same row keys (seeds); records how many runs each row has.

    With ``exp.unit``: runs are first averaged within each unit (say the calibration seeds of one
    trained toy), and the mean, std and 95% CI are taken over the unit means."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in exp.index), []).append(r)
    agg = {}
    for key, rs in groups.items():
        vals: dict[str, Any] = {RUNS_COL: len(rs)}
        if exp.unit:
            per_unit = _unit_means(exp, rs)
            vals[PER_UNIT], vals[UNITS_COL] = per_unit, len(per_unit)
        for c in exp.column_names():
            if exp.unit:
                xs = [m[c] for m in vals[PER_UNIT].values() if m[c] is not None]
            else:
                xs = [r[c] for r in rs if r[c] is not None]
            _spread(vals, c, xs, bool(exp.unit))
        agg[key] = vals
    return agg


def _unit_means(exp: Experiment, rs: list[dict[str, Any]]) -> dict[Any, dict[str, Optional[float]]]:
    by_unit: dict[Any, list[dict[str, Any]]] = {}
    for r in rs:
        by_unit.setdefault(r.get(UNIT), []).append(r)
    out = {}
    for u, us in by_unit.items():
        out[u] = {}
        for c in exp.column_names():
            xs = [r[c] for r in us if r[c] is not None]
            out[u][c] = sum(xs) / len(xs) if xs else None
    return out


def add_gap(exp: Experiment, table: dict[tuple, dict[str, Any]]) -> None:
    """Extra rows ``A - B`` for the `gap` setting (e.g. STUN+Wanda minus Wanda per expert count).

    With ``exp.unit`` the gap is paired: A - B within each unit both rows have, then mean, std and
    95% CI over those units."""
    g = exp.gap
    if not g:
        return
    pos = exp.index.index(g["key"])
    label = f"{g['minuend']} - {g['subtrahend']}"
    for key, a in list(table.items()):
        if key[pos] != g["minuend"]:
            continue
        bkey = key[:pos] + (g["subtrahend"],) + key[pos + 1:]
        if bkey not in table:
            continue
        b = table[bkey]
        if exp.unit:
            shared = [u for u in a[PER_UNIT] if u in b[PER_UNIT]]
            diff: dict[str, Any] = {RUNS_COL: None, UNITS_COL: len(shared)}
            for c in exp.column_names():
                xs = [a[PER_UNIT][u][c] - b[PER_UNIT][u][c] for u in shared
                      if a[PER_UNIT][u][c] is not None and b[PER_UNIT][u][c] is not None]
                _spread(diff, c, xs, True)
        else:
            diff = {c: (a[c] - b[c]) if a[c] is not None and b[c] is not None else None
                    for c in exp.column_names()}
            diff[RUNS_COL] = None
        table[key[:pos] + (label,) + key[pos + 1:]] = diff


def paper_table(exp: Experiment) -> dict[tuple, dict[str, Any]]:
    out = {}
    for r in exp.paper.get("rows", []):
        key = tuple(r.get(k) if k == "method" else _key(r.get(k)) for k in exp.index)
        out[key] = {c: _num(r.get(c)) for c in exp.column_names()}
    return out


def _sort_key(exp: Experiment, key: tuple) -> tuple:
    order = {m["label"]: i for i, m in enumerate(exp.methods)}
    parts = []
    for k, v in zip(exp.index, key):
        if k == "method":
            parts.append((order.get(v, len(order)), str(v)))
        else:
            f = _num(v)
            parts.append((0 if v is None else 1, f if f is not None else 0.0, "" if f is not None else str(v)))
    return tuple(parts)


def build_table(exp: Experiment, runs: pd.DataFrame, mode: str,
                hashes: Optional[set[str]] = None) -> pd.DataFrame:
    """Index keys, then per column: ours, ``<col> (paper)`` and ``Δ <col>`` (when the paper has it)."""
    ours = aggregate(exp, run_rows(exp, runs, mode, hashes))
    add_gap(exp, ours)
    paper = paper_table(exp)
    shown = measured_columns(exp, mode)
    with_paper = [c for c in shown if any(p[c] is not None for p in paper.values())]
    with_sd = [c for c in shown if exp.std and any(o.get(sd_name(c)) is not None for o in ours.values())]
    with_ci = [c for c in shown if exp.unit and any(o.get(ci_name(c)) is not None for o in ours.values())]
    rows = []
    for key in sorted(set(ours) | set(paper), key=lambda k: _sort_key(exp, k)):
        o, p = ours.get(key, {}), paper.get(key, {})
        row: dict[str, Any] = dict(zip(exp.index, key))
        for c in shown:
            row[c] = o.get(c)
            if c in with_sd:
                row[sd_name(c)] = o.get(sd_name(c))
            if c in with_ci:
                row[ci_name(c)] = o.get(ci_name(c))
            if c in with_paper:
                row[f"{c} (paper)"] = p.get(c)
                row[f"Δ {c}"] = o[c] - p[c] if o.get(c) is not None and p.get(c) is not None else None
        if exp.unit:
            row[UNITS_COL] = o.get(UNITS_COL) or 0
        row[RUNS_COL] = o.get(RUNS_COL) or 0
        if not o and all(p.get(c) is None for c in with_paper):
            continue    # a paper row with nothing in the columns this mode shows (MMLU-only in toy)
        rows.append(row)
    cols = list(exp.index) + [x for c in shown for x in
                              [c] + ([sd_name(c)] if c in with_sd else []) + ([ci_name(c)] if c in with_ci else [])
                              + ([f"{c} (paper)", f"Δ {c}"] if c in with_paper else [])]
    cols += ([UNITS_COL] if exp.unit else []) + [RUNS_COL]
    return pd.DataFrame(rows, columns=cols)


# ---- rendering ------------------------------------------------------------------------------
def fmt_cell(v: Any, col: str, exp: Experiment) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if col in (RUNS_COL, UNITS_COL):
        return str(int(v))
    if col in exp.index:
        f = _num(v)
        return f"{f:g}" if f is not None else str(v)
    return exp.float_format.format(float(v))


def _cells(df: pd.DataFrame, exp: Experiment) -> list[list[str]]:
    return [[fmt_cell(v, c, exp) for c, v in zip(df.columns, row)]
            for row in df.astype(object).itertuples(index=False)]


def header_lines(exp: Experiment, mode: str, n_runs: int) -> list[str]:
    src = exp.paper.get("source", "none recovered")
    ver = exp.paper.get("verified", False)
    lines = [f"Mode: {mode}. Built from {n_runs} complete run folder(s).",
             f"Paper numbers: {src} (verified: {str(ver).lower()})."]
    if mode == "toy":
        lines.append("Toy counterpart: the paper's numbers are for the real model; compare trends, "
                     "not absolute values.")
    return lines


def to_markdown(df: pd.DataFrame, exp: Experiment, mode: str, n_runs: int) -> str:
    head = [f"# {exp.title} ({mode})", ""] + header_lines(exp, mode, n_runs) + [""]
    align = ["---" if c in exp.index else "---:" for c in df.columns]
    lines = ["| " + " | ".join(df.columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in _cells(df, exp)]
    return "\n".join(head + lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("Δ", r"$\Delta$"), ("–", "--")):
        s = s.replace(a, b)
    return s


def to_latex(df: pd.DataFrame, exp: Experiment, mode: str, n_runs: int) -> str:
    spec = "".join("l" if c in exp.index else "r" for c in df.columns)
    lines = ["% " + ln for ln in header_lines(exp, mode, n_runs)]
    lines += [r"\begin{tabular}{" + spec + "}", r"\toprule",
              " & ".join(_tex(str(c)) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(x) for x in r) + r" \\" for r in _cells(df, exp)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, float_format="%.6f", lineterminator="\n")
