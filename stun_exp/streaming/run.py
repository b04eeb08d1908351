"""``run_streaming(cfg, run_dir) -> dict``: the pipeline's streaming branch (``runtime.streaming=true``).

Same stages and results keys as ``pipeline.run_pipeline``; what differs:
* the model is never loaded whole: ``prune_streaming`` reads the checkpoint layer by layer and
  writes the pruned checkpoint (``runtime.output_dir``, default ``<run>/checkpoint``);
* ``eval=ppl`` runs ``streaming_perplexity`` on that checkpoint (``runtime.eval_max_windows``);
  other eval kinds load the pruned checkpoint in memory (they need the whole model: a model too big
  for one GPU needs ``device_map="auto"`` loading, see the report) ;
* no dense baseline, kurtosis or distillation (each needs the whole model); they are recorded as
  empty / null.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("stun_exp")


def _source(cfg: DictConfig) -> tuple[str, bool]:
    """(checkpoint dir, trust_remote_code)."""
    if cfg.model.kind == "toy":
        from stun_exp.toy.build import ensure_toy
        return str(ensure_toy(cfg.model)), False
    from stun_exp.models.loading import resolve_source
    src, local = resolve_source(cfg.model.name_or_path)
    if not Path(src).is_dir():
        from huggingface_hub import snapshot_download
        src = snapshot_download(src, local_files_only=True)
    return src, bool(cfg.model.get("trust_remote_code", False))


def _dtype(cfg: DictConfig, device: torch.device) -> Optional[torch.dtype]:
    """As ``pipeline.load_model``: toy fp32; else auto = bf16 on CUDA, fp32 on CPU."""
    if cfg.model.kind == "toy":
        return torch.float32
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]


def _runtime(cfg: DictConfig) -> Any:
    from stun_exp.streaming.config import RuntimeConfig
    node = cfg.get("runtime") or {}
    rt = RuntimeConfig(**{k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                          if k in RuntimeConfig.__dataclass_fields__}) if node else RuntimeConfig(streaming=True)
    rt.validate()
    return rt


def _evaluate(cfg: DictConfig, rt: Any, ckpt: Path, tok: Any, device: torch.device, dtype: Any,
              trust: bool, offload: Optional[str]) -> dict[str, Any]:
    if cfg.eval.name == "none":
        return {}
    if cfg.eval.name == "ppl":
        from stun_exp.evaluation.perplexity import dataset_tokens
        from stun_exp.streaming.evaluate import streaming_perplexity
        out: dict[str, Any] = {}
        for name in cfg.eval.datasets:
            ids = dataset_tokens(name, tok, int(cfg.eval.seqlen), int(cfg.eval.get("c4_nsamples", 256)))
            r = streaming_perplexity(ckpt, ids, int(cfg.eval.seqlen), device, dtype, rt.eval_max_windows,
                                     offload, trust)
            out[f"ppl/{name}"] = r["ppl"]
            out[f"ppl/{name}/windows"] = r["windows"]
        return out
    from stun_exp.evaluation import evaluate as ev
    from stun_exp.models.loading import load_pretrained
    model, tok2 = load_pretrained(str(ckpt), dtype=dtype, device=str(device), trust_remote_code=trust)
    return ev(model, tok2 or tok, cfg.eval, model_dir=None)


def run_streaming(cfg: DictConfig, run_dir_s: Optional[str]) -> dict[str, Any]:
    """Streaming counterpart of ``pipeline.run_pipeline`` (same results shape, plus ``streaming``)."""
    from stun_exp import pipeline as P
    from stun_exp.config.validate import validate
    from stun_exp.data.calib import load_calibration
    from stun_exp.models.loading import _load_tokenizer
    from stun_exp.streaming.prune import prune_streaming
    from stun_exp.tracking import run_record
    from stun_exp.tracking.files import atomic_write_text

    timer, run_dir = P.Timer(), (Path(run_dir_s) if run_dir_s else None)
    with timer.stage("validate"):
        validate(cfg)
        rt = _runtime(cfg)
    chash = run_record.config_hash(cfg)
    P.seed_everything(int(cfg.seed))
    device = P.pick_device(cfg.device)
    src, trust = _source(cfg)
    dtype = _dtype(cfg, device)
    tok = _load_tokenizer(src, True, trust)
    with timer.stage("calib"):
        calib = load_calibration(cfg.calib, tok, int(cfg.model.seed) if cfg.model.kind == "toy" else 0)
    tmp = tempfile.TemporaryDirectory() if run_dir is None else None
    base = run_dir or Path(tmp.name)
    offload = (rt.offload_dir or str(base / "activations")) if rt.offload_activations else None
    ckpt = Path(rt.output_dir) if rt.output_dir else base / "checkpoint"
    expert = instantiate(cfg.expert_pruner, _convert_="all") if cfg.expert_pruner.name != "none" else None
    un = instantiate(cfg.unstructured_pruner, _convert_="all")
    with timer.stage("streaming_prune"):
        res = prune_streaming(src, ckpt, expert, un, calib, device, dtype,
                              None if cfg.sparsity is None else float(cfg.sparsity), offload, trust, cfg)
    plan = res.pop("expert_plan")
    if run_dir and plan is not None:
        atomic_write_text(run_dir / "expert_plan.json", plan.to_json() + "\n")
    with timer.stage("evaluate"):
        metrics = _evaluate(cfg, rt, ckpt, tok, device, dtype, trust, offload)
    timer.times.update({f"streaming/{k}": v for k, v in res["timings"].items()})
    results = {
        "complete": False, "config_hash": chash, "seed": int(cfg.seed), "config": run_record.resolved_dict(cfg),
        "metrics": metrics, "dense_metrics": {}, "sparsity": res["sparsity"], "census": res["census"],
        "expert_pruning": res["expert_pruning"], "unstructured_pruning": res["unstructured_pruning"],
        "distill": {}, "kurtosis": {"dense": None, "after_expert": None, "after_unstructured_nonzero": None},
        "counters": res["counters"], "timings": timer.times, "memory": P.peak_memory(),
        "environment": run_record.environment(), "run_dir": str(run_dir) if run_dir else None,
        "streaming": res["streaming"],
    }
    results["summary"] = P.summary_table({}, metrics, res["sparsity"])
    if run_dir:
        results["complete"] = True
        run_record.write_results(run_dir, results)
    if tmp is not None:
        tmp.cleanup()
    print(results["summary"], flush=True)
    return results
