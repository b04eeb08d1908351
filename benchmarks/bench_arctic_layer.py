"""Per-layer cost of STUN phase 1 (router mode), Wanda and OWL on one Arctic-shaped decoder layer.

Arctic (Snowflake, 480B): hidden 7168, 128 experts of intermediate 4864, top-2, 35 layers, bf16,
plus attention and a parallel residual MLP. One such layer (~13.8B parameters, ~27.5 GB in bf16) is
built with random weights in the project's Arctic stand-in (``tests/arctic_like.py``: the remote
code's ModuleList layout, plain causal attention) and pruned by the project's own pruners on the
sequential engine, with 128 x 4096-token random calibration sequences (or ``--nsamples``).

    python benchmarks/bench_arctic_layer.py                 # full shape on CUDA, scaled down on CPU
    python benchmarks/bench_arctic_layer.py --scale cpu     # the scaled-down shape anywhere

Times are per decoder layer; ``x35`` multiplies by Arctic's 35 layers (STUN phase 1 does global
work too: the threshold search reclusters every layer per step, so its x35 is an estimate) and,
when fewer than 128 samples are used, scales the engine passes linearly to 128 samples.
Paper (STUN, Table/Sec. on Arctic, one H100): Wanda 0.58 h, OWL 1.12 h.

OWL's outlier ratio streams over the matrices of a layer (two passes), so a layer's pooled scores are
never held at once.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stun_exp.context import Counters, RunContext  # noqa: E402
from stun_exp.models.adapter import get_adapter  # noqa: E402
from stun_exp.pruning.weights.pruners import UnstructuredPruner  # noqa: E402

SHAPES = {
    "full": dict(hidden_size=7168, num_local_experts=128, intermediate_size=4864, num_attention_heads=56,
                 vocab_size=32000, nsamples=128, seqlen=4096),
    "cpu": dict(hidden_size=512, num_local_experts=16, intermediate_size=384, num_attention_heads=8,
                vocab_size=1024, nsamples=8, seqlen=256),
}
PAPER_H = {"wanda": 0.58, "owl": 1.12}
N_LAYERS = 35



def build_layer(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from tests.arctic_like import ArcticConfig, ArcticForCausalLM
    cfg = ArcticConfig(num_hidden_layers=1, num_experts_per_tok=2, moe_layer_frequency=1, use_residual=True,
                       max_position_embeddings=shape["seqlen"],
                       **{k: v for k, v in shape.items() if k not in ("nsamples", "seqlen")})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ArcticForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)     # allocate once, in the final dtype
    reinit(model)
    return model.eval()


@torch.no_grad()
def reinit(model: torch.nn.Module) -> None:
    """Random weights (std 0.02, norms 1), drawn on the device."""
    for p in model.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn) -> tuple[float, float]:
    """(seconds, peak GPU GiB) of fn()."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return time.perf_counter() - t, peak


def stun_phase1(ctx: RunContext, expert_sparsity: float) -> dict:
    """STUN router-mode plan + surgery for the one layer."""
    from stun_exp.models.surgery import apply_plan
    from stun_exp.pruning.expert.stun import StunPruner
    plan = StunPruner(distance="router", expert_sparsity=expert_sparsity).plan(ctx)
    apply_plan(ctx.adapter, plan)
    return {"experts_after": plan.experts_after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=["auto", "full", "cpu"], default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--methods", default="wanda,owl,stun", help="stun last: it removes experts")
    ap.add_argument("--json", default=None, help="write the rows here too")
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    scale = a.scale if a.scale != "auto" else ("full" if device.type == "cuda" else "cpu")
    shape = dict(SHAPES[scale])
    shape["nsamples"] = a.nsamples or shape["nsamples"]
    shape["seqlen"] = a.seqlen or shape["seqlen"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; shape: {scale} {shape}; dtype {dtype}", flush=True)

    t0 = time.perf_counter()
    model = build_layer(shape, device, dtype)
    adapter = get_adapter(model)
    nparams = sum(p.numel() for p in model.model.layers[0].parameters())
    calib = torch.randint(0, shape["vocab_size"], (shape["nsamples"], shape["seqlen"]),
                          generator=torch.Generator().manual_seed(1))
    ctx = RunContext(None, model, None, adapter, calib, device, counters=Counters())
    print(f"layer: {nparams / 1e9:.2f}B params built in {time.perf_counter() - t0:.1f}s", flush=True)

    rows = []
    sample_scale = 128 / shape["nsamples"]
    for method in a.methods.split(","):
        reinit(model)
        if method == "stun":
            secs, peak = timed(device, lambda: stun_phase1(ctx, 0.125))
            x35 = secs * N_LAYERS
        else:
            pr = UnstructuredPruner(name=method, score="wanda", allocation="owl" if method == "owl" else "uniform")
            secs, peak = timed(device, lambda pr=pr: pr.prune(ctx, sparsity=0.5))
            x35 = secs * N_LAYERS * sample_scale
        rows.append({"method": method, "device": name, "scale": scale, "nsamples": shape["nsamples"],
                     "seqlen": shape["seqlen"], "layer_s": round(secs, 2), "peak_gpu_gib": round(peak, 1),
                     "x35_h": round(x35 / 3600, 3), "paper_h": PAPER_H.get(method)})
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict]) -> None:
    print("\n| method | device | shape | samples x seqlen | per layer (s) | peak GPU (GiB) | x35 layers (h)"
          " | paper, 1 H100 (h) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        paper = "-" if r["paper_h"] is None else f"{r['paper_h']:.2f}"
        print(f"| {r['method']} | {r['device']} | {r['scale']} | {r['nsamples']} x {r['seqlen']} | "
              f"{r['layer_s']:.2f} | {r['peak_gpu_gib']} | {r['x35_h']:.3f} | {paper} |")
    print("x35: per-layer time x 35 layers, engine passes scaled linearly to 128 samples.")


if __name__ == "__main__":
    main()
