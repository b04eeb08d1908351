"""Peak resident memory and wall time vs depth: in-memory vs streaming pruning (STUN router + Wanda).

Random Mixtral-style MoEs of equal width and 4, 8, 16, 32 decoder layers are written as sharded
safetensors (one shard per layer, written layer by layer so that making them needs no big memory).
Each (mode, depth) runs in a fresh child process, which reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) and wall time; the import baseline is measured the same way.

* ``memory``:    the runner with ``runtime=default`` (whole model in memory), checkpoint saved
* ``streaming``: the runner with ``runtime=streaming`` (one decoder layer materialised at a time)
Both: STUN router distance (25% of experts) then Wanda at its own ratio 0.5, no evaluation.

Target: streaming peak RSS grows <= 1.3x from 4 to 32 layers.

"Done when": a deeper model whose weights are several times a memory cap (cap = weight bytes / 3,
checked by a watchdog thread that kills the child as soon as its RSS passes the cap, and by the final
peak RSS) is pruned and then evaluated (streaming perplexity on a few windows) in streaming mode.

    python benchmarks/bench_scale.py                    # full table (a few minutes on 2 CPU cores)
    python benchmarks/bench_scale.py --depths 4,8 --cap-layers 24
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
             router_jitter_noise=0.0)
NSAMPLES, SEQLEN = 4, 64


# ---- checkpoint generation (layer by layer) ------------------------------------------------------
def make_checkpoint(path: Path, n_layers: int, seed: int = 0) -> int:
    """A random MixtralForCausalLM checkpoint with `n_layers` layers; returns its weight bytes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import MixtralConfig, MixtralForCausalLM

    from stun_exp.streaming.checkpoint import ShardedWriter
    cfg = MixtralConfig(num_hidden_layers=n_layers, **WIDTH)
    with init_empty_weights():
        skel = MixtralForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    w = ShardedWriter(path, n_layers + 1)
    for l, layer in enumerate(skel.model.layers):
        w.write({f"model.layers.{l}.{k}": _random(k, v.shape, gen) for k, v in layer.state_dict().items()})
    w.write({k: _random(k, v.shape, gen) for k, v in skel.state_dict().items() if ".layers." not in k})
    w.close()
    cfg.save_pretrained(path)
    return w.total_size


def _random(name: str, shape, gen):
    import torch
    if len(shape) == 1:
        return torch.ones(shape)
    std = 1.0 if name.endswith("gate.weight") else 0.02    # decisive routers, as tests/tiny_models.py
    return torch.randn(shape, generator=gen) * std


# ---- child process -------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _watchdog(cap: int) -> None:
    """Kill this process (exit 3) the moment its RSS passes `cap` bytes."""
    def loop() -> None:
        while True:
            rss = _rss_bytes()
            if rss > cap:
                print(json.dumps({"error": f"RSS {rss / 2**20:.0f} MiB passed the cap {cap / 2**20:.0f} MiB"}),
                      flush=True)
                os._exit(3)
            time.sleep(0.01)
    threading.Thread(target=loop, daemon=True).start()


def child(mode: str, src: str, out: str, cap: int | None, evaluate: bool) -> dict:
    if cap:
        _watchdog(cap)
    import torch
    torch.set_num_threads(1)
    calib = torch.randint(0, WIDTH["vocab_size"], (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    res: dict = {}
    if mode != "baseline":
        r = run_runner(mode, src, out, calib)
        res["sparsity"] = round(r["sparsity"]["decoder_linear"], 4)
        if mode == "streaming":
            res["peak_live_layers"] = r["streaming"]["peak_live_layers"]
    res["prune_s"] = round(time.perf_counter() - t, 2)
    if evaluate:
        from stun_exp.streaming.evaluate import streaming_perplexity
        t = time.perf_counter()
        ids = torch.randint(0, WIDTH["vocab_size"], (4 * SEQLEN,), generator=torch.Generator().manual_seed(2))
        res["ppl"] = round(streaming_perplexity(out, ids, SEQLEN)["ppl"], 2)
        res["eval_s"] = round(time.perf_counter() - t, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res.update(mode=mode, import_rss_mb=round(base / 2**20), peak_rss_mb=round(peak / 2**20))
    if cap:
        res["cap_mb"] = round(cap / 2**20)
        if peak > cap:
            res["error"] = "peak RSS above the cap"
    return res


def run_runner(mode: str, src: Path, out: Path, calib) -> dict:
    """One run of the stun-exp runner on the checkpoint ``src``, its pruned checkpoint written to ``out``."""
    import tempfile

    import torch
    from hydra import compose, initialize_config_dir

    from stun_exp.config.schema import register_all
    from stun_exp.pipeline import run_pipeline
    from stun_exp.run import CONF_DIR
    register_all()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    torch.save(calib, work / "calib.pt")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=hf", f"model.name_or_path={src}", "calib=tokens", f"calib.path={work / 'calib.pt'}",
            f"calib.nsamples={NSAMPLES}", f"calib.seqlen={SEQLEN}", "expert_pruner=stun",
            "expert_pruner.expert_sparsity=0.25", "unstructured_pruner=wanda", "unstructured_pruner.sparsity=0.5",
            "eval=none", "dense_baseline=false", "save_checkpoint=true", f"out_root={work}",
            "runtime=" + ("streaming" if mode == "streaming" else "default"),
            *([f"runtime.output_dir={out}"] if mode == "streaming" else [])])
    (work / "run").mkdir()
    res = run_pipeline(cfg, str(work / "run"))
    if mode == "memory":
        shutil.move(res["checkpoint"], out)
    return res


def run_child(mode: str, src: Path, out: Path, cap: int | None = None, evaluate: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(out)] + (
        ["--cap", str(cap)] if cap else []) + (["--eval"] if evaluate else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    res = json.loads(last[-1]) if last else {"error": p.stderr[-800:]}
    res.update(rc=p.returncode, wall_s=round(wall, 2))
    return res


def make(src: Path, n_layers: int) -> int:
    """make_checkpoint in a child: the driver never imports torch, so children fork from a small
    process (ru_maxrss survives exec: a child forked from a big parent starts with its peak)."""
    r = run_child("make", src, Path(str(n_layers)))
    if "weight_bytes" not in r:
        raise RuntimeError(f"checkpoint generation failed: {r}")
    return int(r["weight_bytes"])


# ---- driver --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"))
    ap.add_argument("--cap", type=int, default=None)
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--depths", default="4,8,16,32")
    ap.add_argument("--cap-layers", type=int, default=48, help="depth of the 'weights > 3x cap' model")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    if a.child:
        mode, src, out = a.child
        res = ({"weight_bytes": make_checkpoint(Path(src), int(out))} if mode == "make"
               else child(mode, src, out, a.cap, a.eval))
        print(json.dumps(res), flush=True)
        return
    import tempfile
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = depth_table(work, [int(d) for d in a.depths.split(",")])
        done_when(work, a.cap_layers)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    _ = rows


def depth_table(work: Path, depths: list[int]) -> list[dict]:
    base = run_child("baseline", work, work / "none")
    print(f"import baseline (torch + transformers + stun_exp): peak RSS {base['peak_rss_mb']} MiB", flush=True)
    rows = []
    for d in depths:
        src = work / f"src{d}"
        wbytes = make(src, d)
        for mode in ("memory", "streaming"):
            r = run_child(mode, src, work / f"out{d}-{mode}")
            r.update(layers=d, weights_mb=round(wbytes / 2**20))
            rows.append(r)
            print(json.dumps(r), flush=True)
            shutil.rmtree(work / f"out{d}-{mode}", ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    print("\n| layers | weights (MiB) | mode | peak RSS (MiB) | RSS / RSS@4 | prune (s) | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    first = {r["mode"]: r["peak_rss_mb"] for r in rows if r["layers"] == depths[0]}
    for r in rows:
        ratio = r["peak_rss_mb"] / first[r["mode"]]
        print(f"| {r['layers']} | {r['weights_mb']} | {r['mode']} | {r['peak_rss_mb']} | {ratio:.2f}x | "
              f"{r.get('prune_s')} | {r['wall_s']} |")
    last = {r["mode"]: r["peak_rss_mb"] for r in rows if r["layers"] == depths[-1]}
    g = last["streaming"] / first["streaming"]
    print(f"\nstreaming peak RSS {depths[0]} -> {depths[-1]} layers: {g:.2f}x (target <= 1.3x: "
          f"{'met' if g <= 1.3 else 'NOT met'}); in-memory: {last['memory'] / first['memory']:.2f}x", flush=True)
    return rows


def done_when(work: Path, n_layers: int) -> None:
    src = work / "big"
    wbytes = make(src, n_layers)
    cap = wbytes // 3
    r = run_child("streaming", src, work / "big-out", cap=cap, evaluate=True)
    ok = r["rc"] == 0 and "error" not in r and r["peak_rss_mb"] * 2**20 <= cap
    print(f"\nweights {wbytes / 2**20:.0f} MiB ({n_layers} layers), RSS cap {cap / 2**20:.0f} MiB "
          f"(weights = {wbytes / cap:.1f}x cap): streaming prune + perplexity -> {json.dumps(r)}")
    print(f"done-when check: {'PASSED' if ok else 'FAILED'} (peak RSS {r.get('peak_rss_mb')} MiB <= cap "
          f"{cap / 2**20:.0f} MiB, pruned and evaluated)", flush=True)


if __name__ == "__main__":
    main()
