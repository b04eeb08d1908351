"""Build the toy from nothing into a temporary cache; print build time, steps/s and dense scores.

Usage: python benchmarks/bench_toy_build.py [--config toy] [--seed 0] [--train-steps N]
       [--set key=value ...] [--threads 2] [--keep DIR] [--lm-eval]
Always trains, even the config that ships pretrained. Prints the up-front estimate
``ensure_toy`` would print (measured s/step x steps) next to the real training time.
Scores: the quick in-process check (``evaluate_toy_quick``) always; with ``--lm-eval`` also the
toy tasks through lm-eval (local task YAMLs, HFLM wrapping the in-memory model).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def lm_eval_scores(model_dir: Path, batch_size: int = 32) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, MixtralForCausalLM

    from stun_exp.toy.tasks import TASKS, task_dir
    model = MixtralForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    tm = TaskManager(include_path=str(task_dir(model_dir)), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=tm, num_fewshot=0)
    return {t: {k: v for k, v in m.items() if isinstance(v, float)} for t, m in res["results"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="toy", help="conf/model/<name>.yaml")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--set", nargs="*", default=[], help="other key=value overrides of the model config")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--keep", default=None, help="copy the built model dir here")
    ap.add_argument("--lm-eval", action="store_true")
    a = ap.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    from omegaconf import OmegaConf

    from stun_exp.toy.build import ensure_pretrained, read_meta
    from stun_exp.toy.cli import parse_overrides
    from stun_exp.toy.config import as_toy_cfg
    from stun_exp.toy.train import cpu_name, measure_step_seconds
    raw = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{a.config}.yaml")
    cfg = {k: v for k, v in OmegaConf.to_container(raw).items() if k != "defaults"}
    cfg.update({k: v for k, v in (("seed", a.seed), ("train_steps", a.train_steps), ("lr", a.lr)) if v is not None})
    cfg.update(parse_overrides(a.set))
    tmp = tempfile.mkdtemp(prefix="toy-bench-")
    cfg["cache_dir"] = tmp
    per_step, _ = measure_step_seconds(as_toy_cfg(cfg))
    t0 = time.time()
    path = ensure_pretrained(cfg, use_shipped=False)
    total = time.time() - t0
    meta = read_meta(path)
    tr = meta["training"]
    print(json.dumps({"config": meta["config"], "build_total_s": round(total, 1),
                      "prep_s": tr.get("prep_seconds"), "train_s": tr["train_seconds"],
                      "steps_per_s": tr["steps_per_s"], "tokens_per_s": round(tr["tokens"] / tr["train_seconds"]),
                      "estimated_train_s": round(per_step * tr["steps"], 1),
                      "threads": tr["threads"], "final_loss": tr["final_loss"],
                      "quick_scores": meta.get("dense_scores_quick"), "cpu": cpu_name(),
                      "load_avg": os.getloadavg()}, indent=1))
    if a.lm_eval:
        t1 = time.time()
        print("lm-eval:", json.dumps(lm_eval_scores(path), indent=1), f"({time.time() - t1:.0f} s)")
    if a.keep:
        shutil.copytree(path, Path(a.keep) / path.name, dirs_exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
