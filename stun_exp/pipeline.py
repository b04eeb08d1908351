"""The stages of one run, written once for every runtime. ``run_pipeline`` is what ``run.run`` calls.

    validate   values, files, datasets, sizes (before anything loads); the sparsity knob that applies
    resume     a finished identical run is skipped (``resume=true``), a finished folder is never reused
    model      the runtime loads the tokenizer, the calibration set, then the model
    dense      census, kurtosis (cached per checkpoint) and the dense baseline (cached per model + eval for the toy)
    expert     the expert pruner's plan (by what it needs), applied by surgery
    unstructured   the unstructured pruner on the sequential layer engine the runtime provides
    distill    optional expert-wise distillation (in memory)
    write      streaming: every layer written; in memory: nothing
    analyse    the sparsity ledger, kurtosis of the non-zero weights, mask digest
    save       the checkpoint (``save_checkpoint``; streaming always writes one) with PRUNING.md
    evaluate   lm-eval / perplexity of the pruned model
    record     results.json (complete=true last), then W&B

The runtime (``runtime.py``) decides how the model is held: whole in memory, or one decoder layer at
a time from its checkpoint (``runtime=streaming``). W&B sees the run from its start.
"""
from __future__ import annotations

import logging
import random
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stun_exp.analysis import sparsity as ledger
from stun_exp.config.sparsity import effective as effective_config
from stun_exp.config.validate import validate
from stun_exp.context import RunContext
from stun_exp.runtime import InMemoryRuntime, Runtime
from stun_exp.tracking import run_record
from stun_exp.tracking.files import atomic_write_json, atomic_write_text
from stun_exp.tracking.wandb_logger import RunLogger

log = logging.getLogger("stun_exp")


class Timer:
    """Wall time per stage, in the order the stages ran; each finished stage is reported to W&B."""

    def __init__(self, logger: Optional[RunLogger] = None) -> None:
        self.times: dict[str, float] = {}
        self.logger = logger

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage: %s", name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - t, 3)
            if self.logger is not None:
                self.logger.stage(name, self.times[name])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """cpu / cuda / cuda:<i> / auto (availability was checked with the inputs)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_runtime(cfg: DictConfig, device: torch.device) -> Runtime:
    if cfg.runtime.streaming:
        from stun_exp.streaming.runtime import StreamingRuntime
        return StreamingRuntime(cfg, device)
    return InMemoryRuntime(cfg, device)


# ---- stages -------------------------------------------------------------------------------------
def prepare(cfg: DictConfig, info: Any = None) -> tuple[DictConfig, Any, Any]:
    """Validate (values, then inputs) and resolve the sparsity knob; returns the config that runs."""
    info = info if info is not None else validate(cfg)
    from stun_exp.config.inputs import check_inputs
    check_inputs(cfg, info)
    cfg, request = effective_config(cfg)
    for knob, src in (("sparsity", request.total_source), ("unstructured_pruner.sparsity", request.ratio_source)):
        if src.startswith("stepped aside"):
            log.info("%s: its default %s", knob, src)
    return cfg, info, request


def dense_metrics(cfg: DictConfig, rt: Runtime) -> dict[str, Any]:
    """Dense-model metrics, cached next to the toy (keyed by model + eval config) so warm runs skip them."""
    if not cfg.dense_baseline or cfg.eval.name == "none":
        return {}
    key = run_record.config_hash({"model": OmegaConf.to_container(cfg.model, resolve=True),
                                  "eval": OmegaConf.to_container(cfg.eval, resolve=True)})
    cache = (rt.model_dir / "dense_eval" / f"{key}.json") if rt.model_dir else None
    if cache and cache.is_file():
        return run_record.read_json(cache)
    metrics = rt.evaluate(cfg.eval, dense=True)
    if cache:
        atomic_write_json(cache, metrics)
    return metrics


def dense_analysis(cfg: DictConfig, rt: Runtime) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dense model's census and kurtosis, read once per checkpoint (``analysis.dense_cache``)."""
    from stun_exp.analysis import dense_cache

    def compute() -> dict[str, Any]:
        rep = rt.weight_report(digest=False)
        return {"census": rep["census"], "kurtosis": rep["kurtosis"]}
    if not cfg.analysis_cache:
        return dense_cache.cached_report(None, None, compute)
    key = dense_cache.cache_key(rt.source, OmegaConf.to_container(cfg.model, resolve=True), str(rt.dtype),
                                rt.device.type, rt.name)
    return dense_cache.cached_report(dense_cache.default_cache_dir(), key, compute)


def stage_expert(cfg: DictConfig, ctx: RunContext, rt: Runtime, run_dir: Optional[Path]) -> dict[str, Any]:
    if cfg.expert_pruner.name == "none":
        return {}
    node = cfg.expert_pruner
    if "pretrained_path" in node and node.pretrained_path is None and ctx.info.get("pretrained_path"):
        node = OmegaConf.merge(node, {"pretrained_path": ctx.info["pretrained_path"]})
    pruner = instantiate(node, _convert_="all")
    t = time.perf_counter()
    plan = rt.plan_experts(pruner, ctx)
    plan.meta.setdefault("wall_time_s", round(time.perf_counter() - t, 3))
    plan.meta["forward_passes"] = ctx.counters.as_dict()
    rt.apply_plan(plan)
    ctx.info["expert_plan"] = plan
    if run_dir:
        atomic_write_text(run_dir / "expert_plan.json", plan.to_json() + "\n")
    kept = {str(l): len(lp.groups) for l, lp in sorted(plan.layers.items())}
    ctx.progress("expert", {"experts_after": plan.experts_after, "experts_kept": kept})
    return {"method": plan.method, "experts_before": plan.experts_before, "experts_after": plan.experts_after,
            "removal": plan.removal, "meta": plan.meta}


def stage_unstructured(pruner: Any, ctx: RunContext, dense_census: dict, mid: Optional[dict],
                       request: Any) -> dict[str, Any]:
    """The unstructured pruner at its own ratio, or at the one that lands the total target (derived from
    the weight report taken after the expert phase)."""
    if pruner is None:
        return {}
    split = None
    if request.total is not None:
        now_nz = mid["census"]["decoder_linear_nonzero"]
        split = ledger.ratio_from_counts(request.total, dense_census, now_nz, *mid["targeted"])
        log.info("total target %.3f: expert phase %.4f, unstructured ratio %.4f", request.total,
                 split["structured_share"], split["unstructured_ratio"])
    report = pruner.prune(ctx, sparsity=split["unstructured_ratio"] if split else request.ratio)
    report["split"] = split
    return report


def stage_distill(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    if cfg.distill.name == "none":
        return {}
    return instantiate(cfg.distill, _convert_="all").distill(ctx)


def applied_sparsity(request: Any, unstructured: dict, sp: dict) -> dict[str, Any]:
    """What was asked, what ratio the unstructured pruner applied, and what was achieved."""
    return {"request": request.as_dict(),
            "applied_unstructured_ratio": unstructured.get("sparsity"),
            "achieved_targeted": sp.get("targeted"), "achieved_total": sp.get("decoder_linear"),
            "achieved_expert": sp.get("expert")}


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---- the run ------------------------------------------------------------------------------------
def run_pipeline(cfg: DictConfig, run_dir_s: Optional[str], info: Any = None) -> dict[str, Any]:
    """One run. ``info`` is the ModelInfo of an already validated config (validated here if None)."""
    run_dir = Path(run_dir_s) if run_dir_s else None
    t_validate = time.perf_counter()
    cfg, info, request = prepare(cfg, info)
    chash = run_record.config_hash(cfg)
    if run_dir:
        from stun_exp.tracking.sweep import check_run_dir
        skipped = check_run_dir(cfg, run_dir, chash)
        if skipped is not None:
            return skipped
    logger = RunLogger.start(cfg.logger, run_dir, run_record.resolved_dict(cfg))
    timer = Timer(logger)
    timer.times["validate"] = round(time.perf_counter() - t_validate, 3)
    try:
        results = _run(cfg, run_dir, chash, request, timer, logger)
    except BaseException as e:
        logger.fail(e)
        raise
    return results


def _run(cfg: DictConfig, run_dir: Optional[Path], chash: str, request: Any, timer: Timer,
         logger: RunLogger) -> dict[str, Any]:
    seed_everything(int(cfg.seed))
    if cfg.model.get("threads") is not None:       # the model's thread count (the toy: 1, see its config)
        torch.set_num_threads(int(cfg.model.threads))
    device = pick_device(cfg.device)
    rt = make_runtime(cfg, device)
    rt.bind(run_dir)
    try:
        return _stages(cfg, rt, device, run_dir, chash, request, timer, logger)
    except BaseException:
        rt.discard()
        raise


def _stages(cfg: DictConfig, rt: Runtime, device: torch.device, run_dir: Optional[Path], chash: str,
            request: Any, timer: Timer, logger: RunLogger) -> dict[str, Any]:
    with timer.stage("calib"):
        from stun_exp.data.calib import load_calibration
        tok = rt.load_tokenizer()
        calib = load_calibration(cfg.calib, tok, int(cfg.model.seed) if cfg.model.kind == "toy" else 0)
    with timer.stage("model"):
        rt.load()
    ctx = RunContext(cfg, rt.model, tok, rt.adapter, calib, device, str(run_dir) if run_dir else None,
                     runtime=rt, on_progress=logger.progress)
    ctx.info.update(pretrained_path=rt.pretrained_path, model_dir=str(rt.model_dir) if rt.model_dir else None)
    if cfg.distill.name != "none":
        ctx.dense_state = {k: v.detach().to("cpu", copy=True) for k, v in rt.model.state_dict().items()}
    pruner = instantiate(cfg.unstructured_pruner, _convert_="all") if cfg.unstructured_pruner.name != "none" \
        else None
    targeted = pruner.is_targeted if pruner is not None else None
    with timer.stage("dense_analysis"):
        rep, dense_cache = dense_analysis(cfg, rt)
        dense_census, kurt = rep["census"], {"dense": rep["kurtosis"], "after_expert": None}
    with timer.stage("dense_eval"):
        dense = dense_metrics(cfg, rt)
    with timer.stage("expert_pruning"):
        expert = stage_expert(cfg, ctx, rt, run_dir)
    mid = None
    if expert or (pruner is not None and request.total is not None):
        with timer.stage("analyse_after_expert"):
            mid = rt.weight_report(is_targeted=targeted, digest=False)
            kurt["after_expert"] = mid["kurtosis"] if expert else None
    with timer.stage("unstructured_pruning"):
        unstructured = stage_unstructured(pruner, ctx, dense_census, mid, request)
    with timer.stage("distill"):
        distill = stage_distill(cfg, ctx)
    with timer.stage("write"):
        rt.write(ctx)
    with timer.stage("analyse"):
        final = rt.weight_report(nonzero_only=pruner is not None, is_targeted=targeted)
        now, digest = final["census"], final["mask_digest"]
        if pruner is not None:
            unstructured["targeted"] = final["targeted"]
        sp = ledger.sparsity_report(dense_census, now, unstructured.get("targeted"))
        kurt["after_unstructured_nonzero"] = final["kurtosis"] if pruner is not None else None
    results = {
        "complete": False, "config_hash": chash, "seed": int(cfg.seed), "runtime": rt.name,
        "config": run_record.resolved_dict(cfg), "dense_metrics": dense, "metrics": {},
        "sparsity": sp, "census": {"dense": dense_census, "pruned": now}, "mask_digest": digest,
        "dense_analysis": dense_cache,
        "sparsity_applied": applied_sparsity(request, unstructured, sp),
        "expert_pruning": expert, "unstructured_pruning": unstructured, "distill": distill, "kurtosis": kurt,
    }
    with timer.stage("save"):
        ckpt = rt.finish(run_dir, results)
    with timer.stage("evaluate"):
        metrics = rt.evaluate(cfg.eval, dense=False) if cfg.eval.name != "none" else {}
    if ckpt is not None and not cfg.save_checkpoint:      # streaming evaluated it; the user asked not to keep it
        import shutil
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt = None
    results["eval_settings"] = metrics.pop("eval_settings", None)
    dense.pop("eval_settings", None)
    results.update(metrics=metrics, checkpoint=str(ckpt) if ckpt else None, counters=ctx.counters.as_dict(),
                   timings=timer.times, memory=peak_memory(), environment=run_record.environment(),
                   run_dir=str(run_dir) if run_dir else None)
    if rt.facts() is not None:
        results["streaming"] = rt.facts()
    results["summary"] = summary_table(dense, metrics, sp)
    if run_dir:
        results["complete"] = True
        run_record.write_results(run_dir, results)
    logger.finish(results, per_layer_table(results), [run_dir / "results.json", run_dir / "expert_plan.json"]
                  if run_dir else [])
    print(results["summary"], flush=True)
    return results


def per_layer_table(results: dict[str, Any]) -> list[dict]:
    """One row per MoE layer: experts kept, unstructured sparsity, expert kurtosis before/after."""
    census, kurt = results["census"], results.get("kurtosis") or {}
    up = (results.get("unstructured_pruning") or {}).get("per_layer", {})
    rows = []
    for l, s in results["sparsity"].get("expert_per_layer", {}).items():
        row = {"layer": int(l), "experts_before": census["dense"]["experts"][l],
               "experts_after": census["pruned"]["experts"][l], "expert_sparsity": s,
               "unstructured_sparsity": up.get(l, {}).get("achieved")}
        for stage in ("dense", "after_expert", "after_unstructured_nonzero"):
            per = (kurt.get(stage) or {}).get("per_layer", {}).get(l, {})
            row[f"kurtosis_{stage}"] = per.get("expert_pooled")
        rows.append(row)
    return rows


def summary_table(dense: dict, pruned: dict, sp: dict) -> str:
    """A small Markdown table: dense vs pruned metrics and the sparsity ledger (formatted here:
    importing pandas for ten rows would cost a noticeable share of a small run)."""
    keys = sorted(k for k in set(dense) | set(pruned) if isinstance(pruned.get(k, dense.get(k)), (int, float))
                  and not isinstance(pruned.get(k, dense.get(k)), bool) and not k.endswith("_tokens"))
    rows = [{"metric": k, "dense": dense.get(k), "pruned": pruned.get(k),
             "delta": (pruned[k] - dense[k]) if k in dense and k in pruned else None} for k in keys]
    for name in ("decoder_linear", "all_params", "active_params", "targeted", "expert"):
        if sp.get(name) is not None:
            rows.append({"metric": f"sparsity/{name}", "dense": 0.0, "pruned": sp[name], "delta": sp[name]})
    return markdown_table(rows, ["metric", "dense", "pruned", "delta"])


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """Rows as a Markdown table: text left-aligned, numbers right-aligned with 4 decimals, None blank."""
    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4f}" if isinstance(v, (int, float)) else str(v)
    body = [[cell(r.get(c)) for c in cols] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]
    width = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(cols)]

    def line(vals: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(vals, width, numeric)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else (":" + "-" * (w + 1))
                          for w, num in zip(width, numeric)) + "|"
    return "\n".join([line(cols), rule] + [line(b) for b in body])
