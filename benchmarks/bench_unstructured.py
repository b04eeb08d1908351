"""Time and peak memory per decoder layer of the unstructured pruners (one sequential engine).

Two random Mixtral-style MoEs (routers re-drawn N(0,1) so routing is decisive):
  small  hidden 64,  expert width 128, 8 experts, 4 layers
  wide   hidden 512, expert width 1024, 8 experts, 2 layers
Methods: magnitude, wanda, owl (two passes), sparsegpt, moe_pruner, each at 50% and 2:4.
Calibration: random tokens (--nsamples x --seqlen). The model stays on the CPU; the engine moves one
decoder layer at a time to --device (cuda: peak = torch.cuda.max_memory_allocated; cpu: peak RSS
growth sampled every 5 ms, a coarse figure). Per-layer time = mean wall time of one layer
(observe + score/mask or OBS update + re-run); OWL's includes its dense outlier pass.

    OMP_NUM_THREADS=1 python benchmarks/bench_unstructured.py [--device cuda] [--models small wide]
"""
from __future__ import annotations

import argparse
import contextlib
from functools import partial
import os
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from stun_exp.context import RunContext  # noqa: E402
from stun_exp.models.adapter import get_adapter  # noqa: E402
from stun_exp.pruning.weights import pruners as P  # noqa: E402

MODELS = {"small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
          "wide": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8)}
EXPERTS_ONLY = dict(scope="experts", prune_router=False, prune_shared_experts=False, prune_dense_mlp=False)
METHODS = [("magnitude", partial(P.UnstructuredPruner, score="magnitude"), {}),
           ("wanda", partial(P.UnstructuredPruner, score="wanda"), {}),
           ("owl", partial(P.UnstructuredPruner, score="wanda", allocation="owl"), dict(owl_m=5.0, owl_lambda=0.08)),
           ("sparsegpt", partial(P.UnstructuredPruner, score=None, update="sparsegpt"), {}),
           ("moe_pruner", partial(P.UnstructuredPruner, score="moe_pruner"), EXPERTS_ONLY)]


def build(name: str, seed: int = 0) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=256, num_key_value_heads=2, max_position_embeddings=4096,
                        num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0,
                        tie_word_embeddings=False, **MODELS[name])
    model = MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        ad = get_adapter(model)
        for l in ad.moe_layers:
            ad.router_weight(l).normal_()
    return model


class RssPeak:
    """Peak resident-set growth of this process while the block runs (CPU runs)."""

    def __enter__(self) -> "RssPeak":
        import psutil
        self.proc, self.stop = psutil.Process(), False
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.thread.join()

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def run_one(model_name: str, method: tuple, nm: str | None, args: argparse.Namespace) -> dict:
    name, cls, kw = method
    model = build(model_name)
    calib = torch.randint(0, 256, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    device = torch.device(args.device)
    ctx = RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model), calib=calib,
                     device=device)
    pruner = cls(name=name, nm=nm, **kw)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    with (RssPeak() if device.type == "cpu" else contextlib.nullcontext()) as rss:
        rep = pruner.prune(ctx, sparsity=0.5)
    total = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else rss.mb
    per_layer = rep["layer_seconds"]
    return {"model": model_name, "method": name, "pattern": nm or "50%", "layers": len(per_layer),
            "s_per_layer": sum(per_layer) / max(len(per_layer), 1), "max_s_layer": max(per_layer),
            "total_s": total, "peak_mb": peak, "achieved": rep["achieved_sparsity"],
            "layer_fwd": rep["layer_forwards"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for m in args.models:
        for method in (x for x in METHODS if x[0] in args.methods):
            for nm in (None, "2:4"):
                rows.append(run_one(m, method, nm, args))
                r = rows[-1]
                print(f"{r['model']:6} {r['method']:11} {r['pattern']:4} {r['s_per_layer']:8.3f} s/layer "
                      f"(max {r['max_s_layer']:.3f})  peak {r['peak_mb']:8.1f} MB  sparsity {r['achieved']:.4f}  "
                      f"layer fwd {r['layer_fwd']}", flush=True)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"\ndevice: {dev}; calibration {args.nsamples} x {args.seqlen} tokens; torch {torch.__version__}")
    try:
        import pandas as pd
        print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"))
    except ImportError:
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
