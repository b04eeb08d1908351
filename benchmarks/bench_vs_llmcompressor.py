"""stun-exp against llm-compressor on the same pruning job, end to end, pair by pair.

The job: a random-weight Mixtral checkpoint, Wanda or SparseGPT over every decoder Linear with the
router kept dense, 50 % unstructured or 2:4, the same calibration tokens (16 x 256 by default,
saved with torch.save so stun-exp reads them with ``calib=tokens``). Each tool runs in its own
subprocess: stun-exp through its CLI (``python -m stun_exp.run ...``, stage times from the run's
results.json ``timings``), llm-compressor through ``oneshot`` in a separate virtual environment
(it pins an older transformers). Runs alternate (A B, then B A, ...) so drift of the machine's
load hits both tools alike; medians over ``--repeats``.

Printed per (shape, method, pattern), for each tool: pruning stage, model load, analysis, whole
process (wall time of the subprocess), peak RSS, achieved sparsity over the pruned matrices, and
the layer-output reconstruction error; then the ratios stun-exp / llm-compressor, and stun-exp's
analysis time as a share of the same run's pruning stage, twice: on the even repeats (0, 2, ...:
its cache is emptied before them, so the run reads the dense model, census and kurtosis before
pruning, then the pruned model after) and on the odd ones (the dense analysis from the
per-checkpoint cache, only the pruned model read, as a sweep over one checkpoint sees it); the
median of each. Both pruned
checkpoints are scored by the SAME code here (a faster answer cannot be a worse one): each
decoder layer of the pruned model gets the DENSE model's inputs to that layer (calibration tokens)
and the error is ||y_pruned - y_dense||^2 / ||y_dense||^2, averaged over layers.

What each tool's figures include: stun-exp "model" = ``load_pretrained`` plus the first import
of transformers' modelling code (it imports lazily); llm-compressor "model load" =
``from_pretrained`` inside ``load_quantizable_moe`` after ``import llmcompressor`` (which has
already imported that code, counted in its "import" figure). "whole" is comparable: process start
to exit, the pruned checkpoint saved by both, each tool's own modules byte-compiled beforehand (pip
compiles llm-compressor's at install; stun-exp's source tree is compiled by this script).

    python benchmarks/bench_vs_llmcompressor.py                 # both shapes, 3 repeats (long)
    python benchmarks/bench_vs_llmcompressor.py --quick         # small shape, Wanda + SparseGPT 50 %, 1 repeat
    python benchmarks/bench_vs_llmcompressor.py --venv /path/to/venv --work /tmp/bench --threads 2

The venv is created on first use: ``python -m venv`` + ``pip install torch==<--torch> llmcompressor==<--llmc>``
(the CPU wheel: pass ``--torch-index https://download.pytorch.org/whl/cpu`` where pip's own
configuration would pick a CUDA build); when that torch pin does not resolve, pip picks the newest
torch llm-compressor's own pins accept. The versions found in the venv are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, expert intermediate, experts, layers (top-2, vocab 4096)
    "small": (512, 1024, 8, 4),
    "wide": (1024, 512, 16, 2),
    "tiny": (128, 256, 8, 2),        # smoke test of the script only (not a default)
}
LLMC_VERSION, TORCH_VERSION = "0.14.0.1", "2.13.0"

BUILD = r"""
import sys, torch
from transformers import MixtralConfig, MixtralForCausalLM
out, H, I, E, L, n, T = sys.argv[1], *map(int, sys.argv[2:8])
torch.manual_seed(0)
cfg = MixtralConfig(vocab_size=4096, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                    num_attention_heads=H // 64, num_key_value_heads=H // 128, num_local_experts=E,
                    num_experts_per_tok=2, max_position_embeddings=max(1024, T), router_jitter_noise=0.0,
                    tie_word_embeddings=False)
model = MixtralForCausalLM(cfg).float().eval()
model.save_pretrained(out)
g = torch.Generator().manual_seed(1)
torch.save(torch.randint(0, 4096, (n, T), generator=g), out + "/calib_ids.pt")
print(sum(p.numel() for p in model.parameters()))
"""

LLMC_RUN = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import load_quantizable_moe
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
model_dir, calib, method, pattern, out = sys.argv[1:6]
# oneshot wants a processor with a dataset; the ids are given, so a word-level stand-in will do
vocab = {f"t{i}": i for i in range(4096)}
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                              unk_token="t0", pad_token="t0")
t1 = time.perf_counter()
with load_quantizable_moe():
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
t2 = time.perf_counter()
ids = torch.load(calib)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
mod = cls(sparsity=0.5, mask_structure="0:0" if pattern == "50%" else pattern, targets=["Linear"],
          ignore=["lm_head", "re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$"])
oneshot(model=model, processor=tok, dataset=ds, recipe=mod, num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False, pipeline="sequential")
t3 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model.save_pretrained(out, save_compressed=False)
t4 = time.perf_counter()
print("BENCH_JSON " + json.dumps({"import": t1 - t0, "model": t2 - t1, "prune": t3 - t2, "save": t4 - t3,
                                  "peak_rss_mb": rss}))
"""

SCORE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from stun_exp.models.adapter import get_adapter
from stun_exp.models.loading import load_pretrained
from transformers import AutoModelForCausalLM
dense_dir, calib, outs = sys.argv[2], sys.argv[3], sys.argv[4:]
ids = torch.load(calib)
dense, _ = load_pretrained(dense_dir, dtype=torch.float32)
ad = get_adapter(dense)
inputs = {}
hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.setdefault(i, []).append(
    (a, kw)), with_kwargs=True) for i, layer in enumerate(ad.layers)]
with torch.no_grad():
    for j in range(ids.shape[0]):
        dense(input_ids=ids[j:j + 1], use_cache=False)
for h in hooks:
    h.remove()

def first(o):
    return o[0] if isinstance(o, (tuple, list)) else o

def layer_err(model):
    errs = []
    with torch.no_grad():
        for i, (dl, pl) in enumerate(zip(ad.layers, get_adapter(model).layers)):
            num = den = 0.0
            for a, kw in inputs[i]:
                y, yp = first(dl(*a, **kw)), first(pl(*a, **kw))
                num += float(((yp - y) ** 2).sum()); den += float((y ** 2).sum())
            errs.append(num / den)
    return sum(errs) / len(errs), errs

def sparsity(model):
    a = get_adapter(model)
    numel = zeros = 0
    for l in range(len(a.layers)):
        for t in a.linear_targets(l):
            if t.kind != "router":
                numel += t.weight.numel(); zeros += int((t.weight == 0).sum())
    return zeros / numel

def mixtral_keys(path):
    # llm-compressor saves linearized experts as experts.N.{gate,up,down}_proj; Mixtral checkpoints
    # name them w1 / w3 / w2. A renamed copy (same tensors) lets one loader read both tools' output.
    import os, shutil
    from safetensors.torch import load_file, save_file
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    names = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
    sds = {f: load_file(os.path.join(path, f)) for f in files}
    if not any(".experts.0.gate_proj." in k for sd in sds.values() for k in sd):
        return path
    dst = path.rstrip("/") + "-mixtral-keys"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(path, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for f, sd in sds.items():
        out = {}
        for k, v in sd.items():
            for a, b in names.items():
                if ".experts." in k:
                    k = k.replace(a, b)
            out[k] = v
        save_file(out, os.path.join(dst, f), metadata={"format": "pt"})
    return dst

res = {}
for path in outs:
    m, info = AutoModelForCausalLM.from_pretrained(mixtral_keys(path), dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise SystemExit(f"{path}: checkpoint does not load cleanly: {info}")
    m.eval()
    mean, per = layer_err(m)
    res[path] = {"sparsity": sparsity(m), "layer_err": mean, "layer_err_per_layer": per}
print("BENCH_JSON " + json.dumps(res))
"""


def sh(cmd: list[str], env: dict | None = None, timeout: int = 7200) -> tuple[str, float]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p.stdout, wall


def bench_json(out: str) -> dict:
    line = next(l for l in out.splitlines()[::-1] if l.startswith("BENCH_JSON "))
    return json.loads(line[len("BENCH_JSON "):])


def ensure_venv(venv: Path, torch_version: str, llmc_version: str, torch_index: str | None) -> Path:
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import torch, transformers, llmcompressor; print(torch.__version__, "
             "transformers.__version__, llmcompressor.__version__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        pass
    else:
        print(f"creating {venv} (llmcompressor=={llmc_version}, torch=={torch_version} CPU) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        cpu = ["--extra-index-url", torch_index] if torch_index else []
        if subprocess.run(pip + cpu + [f"torch=={torch_version}", f"llmcompressor=={llmc_version}", "psutil"]).returncode:
            print(f"torch=={torch_version} did not resolve with llmcompressor=={llmc_version}; "
                  "letting pip choose within llm-compressor's pins", flush=True)
            subprocess.run(pip + cpu + [f"llmcompressor=={llmc_version}", "psutil"], check=True)
    out = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-3:]
    print(f"llm-compressor venv {venv}: torch {out[0]}, transformers {out[1]}, llmcompressor {out[2]}", flush=True)
    return py


def run_stun(model_dir: Path, calib: Path, method: str, pattern: str, run_dir: Path, env: dict) -> dict:
    nm = [] if pattern == "50%" else [f"unstructured_pruner.nm={pattern}"]
    cmd = [sys.executable, "-m", "stun_exp.run", "model=hf", f"model.name_or_path={model_dir}", "calib=tokens",
           f"calib.path={calib}", "calib.nsamples=" + str(_calib_shape(calib)[0]),
           "calib.seqlen=" + str(_calib_shape(calib)[1]), "expert_pruner=none", f"unstructured_pruner={method}",
           "unstructured_pruner.prune_router=false", "sparsity=null", "unstructured_pruner.sparsity=0.5",
           *nm, "eval=none", "dense_baseline=false", "save_checkpoint=true", f"out_root={run_dir.parent}",
           f"hydra.run.dir={run_dir}"]
    shutil.rmtree(run_dir, ignore_errors=True)   # a finished run of an earlier benchmark would be refused
    _, wall = sh(cmd, env={**env, "PYTHONPATH": str(ROOT)})
    r = json.loads((run_dir / "results.json").read_text())
    t = r["timings"]
    analysis = sum(t.get(k, 0.0) for k in ("dense_analysis", "analyse_after_expert", "analyse"))
    return {"prune": t["unstructured_pruning"], "model": t["model"], "analysis": analysis, "whole": wall,
            "peak_rss_mb": r["memory"]["peak_rss_mb"], "checkpoint": str(run_dir / "checkpoint"),
            "dense_cache": r["dense_analysis"]["cache"]}


_SHAPE_CACHE: dict = {}


def _calib_shape(calib: Path) -> tuple[int, int]:
    if calib not in _SHAPE_CACHE:
        import torch
        _SHAPE_CACHE[calib] = tuple(torch.load(calib).shape)
    return _SHAPE_CACHE[calib]


def run_llmc(py: Path, model_dir: Path, calib: Path, method: str, pattern: str, out: Path, env: dict) -> dict:
    script = out.parent / "llmc_run.py"
    script.write_text(LLMC_RUN)
    shutil.rmtree(out, ignore_errors=True)
    stdout, wall = sh([str(py), str(script), str(model_dir), str(calib), method, pattern, str(out)], env=env)
    r = bench_json(stdout)
    return {"prune": r["prune"], "model": r["model"], "analysis": 0.0, "whole": wall, "import": r["import"],
            "peak_rss_mb": r["peak_rss_mb"], "checkpoint": str(out), "dense_cache": "-"}


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=os.environ.get("LLMC_VENV", str(ROOT / ".venv-llmcompressor")),
                    help="llm-compressor's own virtual environment (created on first use)")
    ap.add_argument("--work", default="/tmp/bench_vs_llmc")
    ap.add_argument("--shapes", nargs="+", default=["small", "wide"], choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=["wanda", "sparsegpt"])
    ap.add_argument("--patterns", nargs="+", default=["50%", "2:4"], choices=["50%", "2:4"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for both tools (default: torch's)")
    ap.add_argument("--torch", default=TORCH_VERSION)
    ap.add_argument("--llmc", default=LLMC_VERSION)
    ap.add_argument("--torch-index", default=None,
                    help="extra pip index for the CPU torch wheel, e.g. https://download.pytorch.org/whl/cpu "
                         "(default: pip's own configuration)")
    ap.add_argument("--quick", action="store_true", help="small shape, 50%% only, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.patterns, args.repeats = ["small"], ["50%"], 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "stun_exp_cache"      # stun-exp's dense-analysis cache, emptied before even repeats
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "STUN_EXP_CACHE": str(cache)}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    py = ensure_venv(Path(args.venv), args.torch, args.llmc, args.torch_index)
    # stun-exp's modules byte-compiled up front, as pip compiles llm-compressor's at install: where
    # PYTHONDONTWRITEBYTECODE is set, a source checkout would otherwise be recompiled in every run
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "stun_exp")], check=True,
                   capture_output=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()} at start; threads={args.threads or 'default'}")
    table = []
    for shape in args.shapes:
        H, I, E, L = SHAPES[shape]
        model_dir = work / f"mixtral_{shape}"
        calib = model_dir / "calib_ids.pt"
        if not calib.exists():   # built by the older transformers, so both tools read it
            out, _ = sh([str(py), "-c", BUILD, str(model_dir), str(H), str(I), str(E), str(L),
                         str(args.nsamples), str(args.seqlen)], env=env)
            print(f"built {model_dir}: {int(out.split()[-1]) / 1e6:.1f} M parameters")
        for method in args.methods:
            for pattern in args.patterns:
                tag = f"{shape}/{method}/{pattern}"
                rows: dict[str, list[dict]] = {"stun-exp": [], "llm-compressor": []}
                for r in range(args.repeats):
                    if r % 2 == 0:      # this repeat's stun-exp run reads the dense model
                        shutil.rmtree(cache, ignore_errors=True)
                    order = ["stun-exp", "llm-compressor"] if r % 2 == 0 else ["llm-compressor", "stun-exp"]
                    for tool in order:
                        out = work / "runs" / shape / method / pattern.replace(":", "of").replace("%", "pct") / f"{tool}-{r}"
                        if tool == "stun-exp":
                            rows[tool].append(run_stun(model_dir, calib, method, pattern, out, env))
                        else:
                            rows[tool].append(run_llmc(py, model_dir, calib, method, pattern, out, env))
                        print(f"  {tag} {tool} repeat {r}: prune {rows[tool][-1]['prune']:.2f}s "
                              f"whole {rows[tool][-1]['whole']:.2f}s (load {os.getloadavg()[0]:.1f})", flush=True)
                score_out, _ = sh([sys.executable, "-c", SCORE, str(ROOT), str(model_dir), str(calib),
                                   rows["stun-exp"][0]["checkpoint"], rows["llm-compressor"][0]["checkpoint"]],
                                  env=env)
                scores = bench_json(score_out)
                for tool in rows:
                    sc = scores[rows[tool][0]["checkpoint"]]
                    table.append({"case": tag, "tool": tool, **{k: med(rows[tool], k) for k in
                                  ("prune", "model", "analysis", "whole", "peak_rss_mb")},
                                  "sparsity": sc["sparsity"], "layer_err": sc["layer_err"], "n": len(rows[tool]),
                                  **analysis_split(rows[tool])})
                report(table[-2:])
    print("\nall cases (medians):")
    report(table)


def analysis_split(rows: list[dict]) -> dict:
    """stun-exp's analysis as a share of the same run's pruning stage, median over the runs that
    read the dense model (a cache miss) and over those that found it cached; None where none."""
    def share(state: str):
        got = [r["analysis"] / r["prune"] for r in rows if r["dense_cache"] == state]
        return (statistics.median(got), len(got)) if got else None
    return {"analysis_first": share("miss"), "analysis_cached": share("hit")}


def report(table: list[dict]) -> None:
    head = f"{'case':24} {'tool':15} {'prune s':>8} {'model s':>8} {'analysis':>8} {'whole s':>8} {'RSS MB':>8} " \
           f"{'sparsity':>8} {'layer err':>10}"
    print(head)
    for r in table:
        print(f"{r['case']:24} {r['tool']:15} {r['prune']:8.2f} {r['model']:8.2f} {r['analysis']:8.2f} "
              f"{r['whole']:8.2f} {r['peak_rss_mb']:8.0f} {r['sparsity']:8.4f} {r['layer_err']:10.5f}")
    by_case: dict[str, dict] = {}
    for r in table:
        by_case.setdefault(r["case"], {})[r["tool"]] = r
    for case, d in by_case.items():
        if len(d) == 2:
            a, b = d["stun-exp"], d["llm-compressor"]
            print(f"{case:24} ratio stun-exp/llm-compressor: prune {a['prune'] / b['prune']:.2f}, "
                  f"whole {a['whole'] / b['whole']:.2f}, peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}, "
                  f"layer err {a['layer_err'] / max(b['layer_err'], 1e-30):.3f}")
            share = {k: f"{100 * a[k][0]:.1f} % (median of {a[k][1]})" if a.get(k) is not None else "n/a"
                     for k in ("analysis_first", "analysis_cached")}
            print(f"{case:24} stun-exp analysis / its pruning stage: dense model read {share['analysis_first']}, "
                  f"dense analysis cached {share['analysis_cached']}")


if __name__ == "__main__":
    main()
