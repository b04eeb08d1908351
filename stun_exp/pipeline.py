"""The stages of one run, in design.md order. ``run_pipeline`` is what ``stun_exp.run.run`` calls."""
from __future__ import annotations

import logging
import random
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stun_exp.analysis import sparsity as ledger
from stun_exp.config.sparsity import normalise as normalise_sparsity
from stun_exp.config.sparsity import resolve as resolve_sparsity
from stun_exp.config.validate import validate
from stun_exp.context import RunContext
from stun_exp.tracking import run_record
from stun_exp.tracking.files import atomic_write_json, atomic_write_text

log = logging.getLogger("stun_exp")


class Timer:
    """Wall time per stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage: %s", name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - t, 3)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from stun_exp.errors import ConfigError
        raise ConfigError("device", name, "cpu or auto on a machine without a CUDA device")
    return torch.device(name)


def load_model(cfg: DictConfig, device: torch.device) -> tuple[Any, Any, Path | None, str | None]:
    """(model, tokenizer, model_dir, pretrained_path). The toy is built (or read from its cache) here."""
    from stun_exp.models.loading import load_pretrained
    pretrained = None
    if cfg.model.kind == "toy":
        from stun_exp.toy.build import ensure_toy, ensure_toy_pair
        if cfg.model.finetune_domain:
            path, pretrained = ensure_toy_pair(cfg.model)
        else:
            path = ensure_toy(cfg.model)
        model, tok = load_pretrained(str(path), dtype=torch.float32, device=str(device))
        return model, tok, Path(path), (str(pretrained) if pretrained else None)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    model, tok = load_pretrained(cfg.model.name_or_path, dtype=dtype, device=str(device),
                                 trust_remote_code=cfg.model.trust_remote_code, device_map=cfg.model.device_map)
    return model, tok, None, cfg.model.pretrained_path


def evaluate(cfg: DictConfig, model: Any, tok: Any, model_dir: Path | None) -> dict[str, Any]:
    if cfg.eval.name == "none":
        return {}
    from stun_exp.evaluation import evaluate as ev
    return ev(model, tok, cfg.eval, model_dir=model_dir)


def dense_metrics(cfg: DictConfig, model: Any, tok: Any, model_dir: Path | None) -> dict[str, Any]:
    """Dense-model metrics, cached next to the toy (keyed by eval config) so warm runs skip them."""
    if not cfg.dense_baseline or cfg.eval.name == "none":
        return {}
    key = run_record.config_hash({"model": OmegaConf.to_container(cfg.model, resolve=True),
                                  "eval": OmegaConf.to_container(cfg.eval, resolve=True)})
    cache = (model_dir / "dense_eval" / f"{key}.json") if model_dir else None
    if cache and cache.is_file():
        return run_record.read_json(cache)
    metrics = evaluate(cfg, model, tok, model_dir)
    if cache:
        atomic_write_json(cache, metrics)
    return metrics


def stage_expert(cfg: DictConfig, ctx: RunContext, run_dir: Path | None) -> dict[str, Any]:
    from stun_exp.models.surgery import apply_plan
    if cfg.expert_pruner.name == "none":
        return {}
    node = cfg.expert_pruner
    if "pretrained_path" in node and node.pretrained_path is None and ctx.info.get("pretrained_path"):
        node = OmegaConf.merge(node, {"pretrained_path": ctx.info["pretrained_path"]})
    pruner = instantiate(node, _convert_="all")
    t = time.perf_counter()
    plan = pruner.plan(ctx)
    plan.meta.setdefault("wall_time_s", round(time.perf_counter() - t, 3))
    plan.meta["forward_passes"] = ctx.counters.as_dict()
    apply_plan(ctx.adapter, plan)
    ctx.info["expert_plan"] = plan
    if run_dir:
        atomic_write_text(run_dir / "expert_plan.json", plan.to_json() + "\n")
    return {"method": plan.method, "experts_before": plan.experts_before, "experts_after": plan.experts_after,
            "removal": plan.removal, "meta": plan.meta}


def stage_unstructured(cfg: DictConfig, ctx: RunContext, dense_census: dict, request: Any) -> dict[str, Any]:
    if cfg.unstructured_pruner.name == "none":
        return {}
    pruner = instantiate(cfg.unstructured_pruner, _convert_="all")
    split = None
    if request.total is not None:
        split = ledger.derive_unstructured_ratio(request.total, dense_census, ctx.adapter, pruner.is_targeted)
        log.info("total target %.3f: expert phase %.4f, unstructured ratio %.4f", request.total,
                 split["structured_share"], split["unstructured_ratio"])
    report = pruner.prune(ctx, sparsity=split["unstructured_ratio"] if split else request.ratio)
    report["split"] = split
    report["targeted"] = ledger.targeted_counts(ctx.adapter, pruner.is_targeted)
    return report


def applied_sparsity(request: Any, unstructured: dict, sp: dict) -> dict[str, Any]:
    """What was asked, what ratio the unstructured pruner applied, and what was achieved."""
    return {"request": request.as_dict(),
            "applied_unstructured_ratio": unstructured.get("sparsity"),
            "achieved_targeted": sp.get("targeted"), "achieved_total": sp.get("decoder_linear"),
            "achieved_expert": sp.get("expert")}


def stage_distill(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    if cfg.distill.name == "none":
        return {}
    return instantiate(cfg.distill, _convert_="all").distill(ctx)


def analyse(ctx: RunContext, dense_census: dict, unstructured: dict) -> dict[str, Any]:
    now = ledger.census(ctx.model, ctx.adapter)
    sp = ledger.sparsity_report(dense_census, now, unstructured.get("targeted"))
    return {"sparsity": sp, "census": {"dense": dense_census, "pruned": now},
            "mask_digest": ledger.mask_digest(ctx.adapter)}


def kurtosis(ctx: RunContext, nonzero_only: bool = False) -> dict[str, Any]:
    from stun_exp.analysis.kurtosis import kurtosis_report
    return kurtosis_report(ctx.adapter, nonzero_only=nonzero_only)


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_pipeline(cfg: DictConfig, run_dir_s: str | None, info: Any = None) -> dict[str, Any]:
    """One run. ``info`` is the ModelInfo of an already validated config (validated here if None)."""
    timer, run_dir = Timer(), (Path(run_dir_s) if run_dir_s else None)
    with timer.stage("validate"):
        info = info if info is not None else validate(cfg)
        from stun_exp.config.inputs import check_inputs
        check_inputs(cfg, info)
        request = resolve_sparsity(cfg)
        for knob, src in (("sparsity", request.total_source), ("unstructured_pruner.sparsity", request.ratio_source)):
            if src.startswith("stepped aside"):
                log.info("%s: its default %s", knob, src)
        cfg = normalise_sparsity(cfg, request)
    if cfg.runtime.streaming:
        from stun_exp.streaming import run_streaming
        return run_streaming(cfg, run_dir_s)
    chash = run_record.config_hash(cfg)
    if run_dir:
        from stun_exp.tracking.sweep import check_run_dir
        skipped = check_run_dir(cfg, run_dir, chash)
        if skipped is not None:
            return skipped
    seed_everything(int(cfg.seed))
    device = pick_device(cfg.device)
    with timer.stage("model"):
        model, tok, model_dir, pretrained = load_model(cfg, device)
        from stun_exp.models.adapter import get_adapter
        adapter = get_adapter(model)
    with timer.stage("calib"):
        from stun_exp.data.calib import load_calibration
        calib = load_calibration(cfg.calib, tok, int(cfg.model.seed) if cfg.model.kind == "toy" else 0)
    ctx = RunContext(cfg, model, tok, adapter, calib, device, str(run_dir) if run_dir else None)
    ctx.info.update(pretrained_path=pretrained, model_dir=str(model_dir) if model_dir else None, model_info=info)
    if cfg.distill.name != "none":
        ctx.dense_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    dense_census = ledger.census(model, adapter)
    kurt = {"dense": kurtosis(ctx)}
    with timer.stage("dense_eval"):
        dense = dense_metrics(cfg, model, tok, model_dir)
    with timer.stage("expert_pruning"):
        expert = stage_expert(cfg, ctx, run_dir)
    kurt["after_expert"] = kurtosis(ctx) if expert else None
    with timer.stage("unstructured_pruning"):
        unstructured = stage_unstructured(cfg, ctx, dense_census, request)
    with timer.stage("distill"):
        distill = stage_distill(cfg, ctx)
    with timer.stage("analyse"):
        analysis = analyse(ctx, dense_census, unstructured)
        kurt["after_unstructured_nonzero"] = kurtosis(ctx, nonzero_only=True) if unstructured else None
    with timer.stage("evaluate"):
        metrics = evaluate(cfg, model, tok, model_dir)
    eval_settings = metrics.pop("eval_settings", None)
    dense.pop("eval_settings", None)
    results = {
        "complete": False, "config_hash": chash, "seed": int(cfg.seed),
        "config": run_record.resolved_dict(cfg), "metrics": metrics, "dense_metrics": dense,
        "eval_settings": eval_settings,
        "sparsity": analysis["sparsity"], "census": analysis["census"], "mask_digest": analysis["mask_digest"],
        "sparsity_applied": applied_sparsity(request, unstructured, analysis["sparsity"]),
        "expert_pruning": expert,
        "unstructured_pruning": unstructured, "distill": distill, "kurtosis": kurt,
        "counters": ctx.counters.as_dict(), "timings": timer.times, "memory": peak_memory(),
        "environment": run_record.environment(), "run_dir": str(run_dir) if run_dir else None,
    }
    results["summary"] = summary_table(dense, metrics, analysis["sparsity"])
    if run_dir:
        record(cfg, ctx, run_dir, results)
    print(results["summary"], flush=True)
    return results


def record(cfg: DictConfig, ctx: RunContext, run_dir: Path, results: dict[str, Any]) -> None:
    """Local files first (checkpoint, results.json with complete=true last), then W&B."""
    if cfg.save_checkpoint:
        from stun_exp.models.loading import save_pretrained
        save_pretrained(ctx.model, ctx.tokenizer, run_dir / "checkpoint", report=results)
    results["complete"] = True
    run_record.write_results(run_dir, results)
    from stun_exp.tracking.wandb_logger import log_run
    files = [run_dir / "results.json", run_dir / "expert_plan.json"]
    log_run(cfg.logger, run_dir, results["config"], results, per_layer_table(results), files)


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
    """A small Markdown table: dense vs pruned metrics and the sparsity ledger."""
    import pandas as pd
    keys = sorted(k for k in set(dense) | set(pruned) if isinstance(pruned.get(k, dense.get(k)), (int, float))
                  and not isinstance(pruned.get(k, dense.get(k)), bool) and not k.endswith("_tokens"))
    rows = [{"metric": k, "dense": dense.get(k), "pruned": pruned.get(k),
             "delta": (pruned[k] - dense[k]) if k in dense and k in pruned else None} for k in keys]
    for name in ("decoder_linear", "all_params", "active_params", "targeted", "expert"):
        if sp.get(name) is not None:
            rows.append({"metric": f"sparsity/{name}", "dense": 0.0, "pruned": sp[name], "delta": sp[name]})
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f")

