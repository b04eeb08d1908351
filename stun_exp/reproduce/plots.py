"""Line plots from a built table: one series per method, ours solid, the paper's dashed.

Used for accuracy vs sparsity, the structured-share interpolation curve (the paper's Figure 1) and
the STUN-vs-unstructured gap vs number of experts. Optional plot keys: ``only`` (draw just these
series, e.g. the gap rows), ``errorbar`` (a column suffix such as ``ci95``: draw ``<y> ci95`` as
error bars), ``hline`` (a reference line, e.g. 0 for "no gap"), ``xscale: log2`` and ``where`` (a
row filter). PNGs are written without a timestamp or software tag, so rebuilding from the same runs
gives the same bytes on the same matplotlib.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from stun_exp.reproduce.spec import Experiment


def x_positions(df: pd.DataFrame, x: str) -> dict[Any, float]:
    """Numeric x values map to themselves; categorical ones (model names) to 0, 1, ... in table order."""
    vals = [v for v in df[x].tolist() if v is not None and not pd.isna(v)]
    try:
        return {v: float(v) for v in vals}
    except (TypeError, ValueError):
        return {v: float(i) for i, v in enumerate(dict.fromkeys(vals))}


def _series(df: pd.DataFrame, x: str, y: str, series: str | None,
            baseline: str | None = None) -> dict[str, tuple[list, list]]:
    """{series name: (xs, ys)} in table order; the `baseline` row (e.g. unpruned at sparsity 0)
    starts every other series instead of standing alone."""
    out: dict[str, tuple[list, list]] = {}
    if y not in df.columns:
        return out
    pos = x_positions(df, x)
    base: list[tuple[float, float]] = []
    for _, r in df.iterrows():
        if r[y] is None or pd.isna(r[y]) or r[x] not in pos:
            continue
        name = str(r[series]) if series else y
        if baseline is not None and name == baseline:
            base.append((pos[r[x]], float(r[y])))
            continue
        xs, ys = out.setdefault(name, ([], []))
        xs.append(pos[r[x]])
        ys.append(float(r[y]))
    if base and not out:
        out[baseline] = ([], [])  # only the baseline was measured: still draw it
    return {k: tuple(zip(*sorted(set(zip(*v)) | set(base)))) for k, v in out.items()}  # type: ignore[misc]


def _isnum(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def select_rows(df: pd.DataFrame, where: dict[str, Any] | None) -> pd.DataFrame:
    """Rows whose index keys equal ``where``'s values (a plot spec's optional filter; null matches
    rows without that key, e.g. runs with no unstructured phase)."""
    if not where or not len(df):
        return df
    from stun_exp.reproduce.tables import _key
    keep = [all(_key(r[k]) == _key(v) for k, v in where.items()) for _, r in df.iterrows()]
    return df[keep]


def plot(exp: Experiment, df: pd.DataFrame, spec: dict[str, Any], mode: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = select_rows(df, spec.get("where"))
    x, y, series = spec["x"], spec["y"], spec.get("series")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    base = spec.get("baseline")
    only = spec.get("only")
    if only is not None and series:
        df = df[df[series].astype(str).isin([str(o) for o in only])]
    ours = _series(df, x, y, series, base)
    paper = _series(df, x, f"{y} (paper)", series, base)
    err = _series(df, x, f"{y} {spec['errorbar']}", series, base) if spec.get("errorbar") else {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # Toy numbers live on another scale than the real model's: the paper's go on a right-hand axis
    # so that both trends stay readable.
    pax = ax.twinx() if mode == "toy" and paper and ours else ax
    ptag = "paper, right axis" if pax is not ax else "paper"
    for i, name in enumerate(dict.fromkeys([*ours, *paper])):
        col = colors[i % len(colors)]
        # a point without an interval (one unit) gets no bar, the others keep theirs
        yerr = [dict(zip(*err[name])).get(xv, math.nan) for xv in ours[name][0]] \
            if name in ours and name in err else []
        if any(math.isfinite(e) for e in yerr):
            ax.errorbar(*ours[name], yerr=yerr, marker="o", color=col, capsize=4,
                        label=f"{name} (ours, ±{spec['errorbar']})")
        elif name in ours:
            ax.plot(*ours[name], marker="o", color=col, label=f"{name} (ours)")
        if name in paper:
            pax.plot(*paper[name], marker="s", linestyle="--", color=col, alpha=0.7, label=f"{name} ({ptag})")
    if pax is not ax:
        pax.set_ylabel(f"{spec.get('ylabel', y)} (paper)")
    pos = x_positions(df, x)
    if any(float(k) != v if _isnum(k) else True for k, v in pos.items()):
        ax.set_xticks(list(pos.values()), [str(k) for k in pos], fontsize=8)
    if spec.get("xscale") == "log2":
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(pos.values()), [f"{v:g}" for v in pos.values()], fontsize=8)
    if spec.get("hline") is not None:
        ax.axhline(float(spec["hline"]), color="grey", linewidth=0.8)
    ax.set_xlabel(spec.get("xlabel", x))
    ax.set_ylabel(spec.get("ylabel", y))
    ax.set_title(f"{spec.get('title', exp.title)} [{mode}]", fontsize=10)
    ax.grid(alpha=0.3)
    if ours or paper:
        handles = [h for a in {id(ax): ax, id(pax): pax}.values() for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
