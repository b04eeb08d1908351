"""Forward passes and wall time of expert pruners as the expert count n grows (the O(1) vs O(kⁿ/√n) claim).

A random tiny Mixtral (2 layers, hidden 32, expert width 16, top-2) with n ∈ {8, 16, 32, 64, 128} experts;
25 % of the experts are removed. STUN router mode runs 0 forward passes, STUN co-activation one
calibration pass, Lu et al. C(n, r) MoE-block passes per layer and calibration batch (run only where
C(n, r) <= --lu-budget, else the count is printed). CPU, well under 2 minutes:

    OMP_NUM_THREADS=1 python benchmarks/bench_expert_pruning.py [--ns 8 16 32 64 128] [--lu-budget 2000]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from stun_exp.context import RunContext  # noqa: E402
from stun_exp.models.adapter import get_adapter  # noqa: E402
from stun_exp.pruning.expert.lu import LuCombinatorialPruner  # noqa: E402
from stun_exp.pruning.expert.selection import n_kept  # noqa: E402
from stun_exp.pruning.expert.stun import StunPruner  # noqa: E402

SPARSITY = 0.25


def build(n: int, layers: int, seed: int = 0) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_local_experts=n, num_experts_per_tok=2, router_jitter_noise=0.0)
    model = MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for l in get_adapter(model).moe_layers:
            get_adapter(model).router_weight(l).normal_()
    return model


def run(pruner, model, calib) -> dict:
    ctx = RunContext(cfg=None, model=model, tokenizer=None, adapter=get_adapter(model), calib=calib,
                     device=torch.device("cpu"))
    t = time.perf_counter()
    plan = pruner.plan(ctx)
    return {"wall": time.perf_counter() - t, "full": ctx.counters.full_model_forwards,
            "moe": ctx.counters.moe_block_forwards, "kept": plan.experts_after,
            "hit": plan.meta.get("search", {}).get("hit", True),
            "rule": (plan.meta.get("search", {}).get("fallback_rule") or "").split(":")[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lu-budget", type=int, default=2000)
    ap.add_argument("--calib", type=int, nargs=2, default=[8, 32], metavar=("SEQS", "LEN"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib = torch.randint(0, 64, tuple(args.calib), generator=torch.Generator().manual_seed(0))
    head = f"{'n':>4} {'method':<18} {'full passes':>11} {'MoE passes':>11} {'kept':>5} {'wall s':>8}  note"
    print(head + "\n" + "-" * len(head))
    for n in args.ns:
        r = n_kept(SPARSITY, n)
        rows = [("stun router", StunPruner(distance="router", expert_sparsity=SPARSITY)),
                ("stun coactivation", StunPruner(distance="coactivation", expert_sparsity=SPARSITY,
                                                 calib_batch_size=args.calib[0]))]
        for name, pruner in rows:
            res = run(pruner, build(n, args.layers), calib)
            note = "" if res["hit"] else f"no tau hits the target exactly: '{res['rule']}' fallback"
            print(f"{n:>4} {name:<18} {res['full']:>11} {res['moe']:>11} {res['kept']:>5} {res['wall']:>8.3f}  {note}")
        cand = math.comb(n, r)
        if cand <= args.lu_budget:
            res = run(LuCombinatorialPruner(expert_sparsity=SPARSITY, calib_batch_size=args.calib[0],
                                            max_candidates=args.lu_budget), build(n, args.layers), calib)
            print(f"{n:>4} {'lu layerwise':<18} {res['full']:>11} {res['moe']:>11} {res['kept']:>5} "
                  f"{res['wall']:>8.3f}  C({n},{r}) = {cand} candidates/layer")
        else:
            passes = cand * args.layers
            print(f"{n:>4} {'lu layerwise':<18} {1:>11} {passes:>11.3g} {'-':>5} {'-':>8}  "
                  f"not run: C({n},{r}) = {cand:.3g} candidates/layer > budget {args.lu_budget}")


if __name__ == "__main__":
    main()
