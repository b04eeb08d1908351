"""The code's shape: no import cycles, `models/` knows nothing of pruning, no private names imported
across packages, and ruff is clean. Imports inside functions count too: a lazy import hides a cycle
from Python, not from the reader.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "stun_exp"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path, mod: str, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported stun_exp module, imported names) for every import statement in the file."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("stun_exp")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if not base.startswith("stun_exp"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            out += [(s, []) for s in subs] or [(base, names)]
    return [(target if target in known else _owner(target, known), names) for target, names in out]


def _owner(name: str, known: set[str]) -> str:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {t for t, _ in imports(p, m, known) if t and t != m and not m.startswith(t + ".")}
            for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_models_know_nothing_of_pruning():
    bad = {m: sorted(t for t in ts if t.startswith(("stun_exp.pruning", "stun_exp.pipeline")))
           for m, ts in graph().items() if m.startswith("stun_exp.models")}
    assert not {m: t for m, t in bad.items() if t}


def test_no_private_names_across_packages():
    mods = modules()
    known = set(mods)
    bad = []
    for m, p in mods.items():
        for target, names in imports(p, m, known):
            same_pkg = target.rpartition(".")[0] == m.rpartition(".")[0] or target == m.rpartition(".")[0]
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not same_pkg:
                    bad.append(f"{m} imports {target}.{n}")
    assert not bad, bad


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "stun_exp", "tests", "benchmarks", "scripts"],
                       cwd=ROOT, capture_output=True, text=True)
    if "No module named ruff" in r.stderr:
        pytest.fail("ruff is not installed: it is part of the test extras (pip install -e '.[test]')")
    assert r.returncode == 0, r.stdout[-3000:]
