"""Forward passes and wall time of expert pruners as the expert count n grows (the O(1) vs O(kⁿ/√n) claim).

A random tiny Mixtral (2 layers, hidden 32, expert width 16, top-2) with n ∈ {8, 16, 32, 64, 128} experts;
25 % of the experts are removed. STUN router mode runs 0 forward passes, STUN co-activation one
calibration pass, Lu et al. C(n, r) MoE-block passes per layer and calibration batch (run only where
C(n, r) <= --lu-budget, else the count is printed). CPU, well under 2 minutes:

    OMP_NUM_THREADS=1 python benchmarks/bench_expert_pruning.py [--ns 8 16 32 64 128] [--lu-budget 2000]

A second table (``--saliency-only`` prints just this one) compares the planning cost of REAP's
saliency pass with STUN router mode and routing frequency on one model (Mixtral-like, 32 experts,
top-2, hidden 128, expert width 256, 2 layers; 16 x 64 calibration tokens, batch 8 for every
calibrated method), plus REAP's statistic computed as REAP's own observer does it (every expert on
every token). Each measurement runs in a forked child of the process that built the model: wall
time and the peak RSS rise over the loaded model (polled every millisecond). Methods alternate
round by round (--rounds); the table gives medians and ratios to frequency.
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


# ---- REAP's saliency pass vs STUN router mode vs frequency ---------------------------------------
def _saliency_methods(batch: int) -> dict:
    from stun_exp.pruning.expert.baselines import FrequencyPruner
    from stun_exp.pruning.expert.reap import ReapPruner

    class ReapEveryExpert(ReapPruner):
        """The same statistics, every expert evaluated on every token (what REAP's observer computes)."""
        characteristic = True

    return {"frequency": lambda: FrequencyPruner(expert_sparsity=SPARSITY, calib_batch_size=batch),
            "stun router": lambda: StunPruner(distance="router", expert_sparsity=SPARSITY),
            "reap (routed tokens)": lambda: ReapPruner(expert_sparsity=SPARSITY, calib_batch_size=batch),
            "reap (every expert)": lambda: ReapEveryExpert(expert_sparsity=SPARSITY, calib_batch_size=batch)}


def _measure_child(make, model, calib, conn) -> None:
    import threading

    import psutil
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    res = run(make(), model, calib)
    stop.set()
    th.join()
    conn.send({"wall": res["wall"], "mib": max(peak[0], proc.memory_info().rss, base) / 2**20 - base / 2**20,
               "full": res["full"], "kept": res["kept"]})
    conn.close()


def saliency_table(rounds: int) -> None:
    import multiprocessing as mp
    import statistics
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        num_local_experts=32, num_experts_per_tok=2, router_jitter_noise=0.0)
    model = MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for l in get_adapter(model).moe_layers:
            get_adapter(model).router_weight(l).normal_()
    calib = torch.randint(0, 64, (16, 64), generator=torch.Generator().manual_seed(0))
    methods = _saliency_methods(batch=8)
    ctx = mp.get_context("fork")
    got: dict[str, list[dict]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, make in methods.items():
            a, b = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_measure_child, args=(make, model, calib, b))
            p.start()
            got[name].append(a.recv())
            p.join()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "mib")} for k, v in got.items()}
    ref = med["frequency"]
    head = (f"{'method (32 experts, 25% removed)':<34} {'full passes':>11} {'wall s':>8} {'x freq':>7} "
            f"{'peak MiB':>9} {'x freq':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for k, v in med.items():
        r = got[k][0]
        print(f"{k:<34} {r['full']:>11} {v['wall']:>8.3f} {v['wall'] / ref['wall']:>7.2f} {v['mib']:>9.1f} "
              f"{(v['mib'] / ref['mib']) if ref['mib'] > 0 else float('nan'):>7.2f}")
    print(f"(medians of {rounds} alternating rounds; peak MiB = RSS rise over the loaded model)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lu-budget", type=int, default=2000)
    ap.add_argument("--calib", type=int, nargs=2, default=[8, 32], metavar=("SEQS", "LEN"))
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the saliency table")
    ap.add_argument("--saliency-only", action="store_true", help="print only the REAP/STUN/frequency table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.saliency_only:
        saliency_table(args.rounds)
        return
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
    saliency_table(args.rounds)


if __name__ == "__main__":
    main()
