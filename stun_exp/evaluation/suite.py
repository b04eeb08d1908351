"""The evaluation stage the runner calls: one entry point for every ``eval`` config.

``evaluate(ctx_or_model, tokenizer, eval_cfg, model_dir=None) -> dict`` returns a flat dict of
floats keyed ``"<task>/<metric>"`` (``toy_arith/exact_match``, ``arc_challenge/acc_norm``,
``gsm8k/exact_match_strict-match``, ``wikitext2/ppl``, ``heldout/ppl``) plus one key
``"eval_settings"`` (a nested dict: tasks, effective few-shot counts, limit, batch size, seeds,
sequence lengths, lm-eval version) for results.json.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from stun_exp.errors import ConfigError
from stun_exp.evaluation.configs import LmEvalBase, PplEval, ToyEval, build_eval_config
from stun_exp.evaluation.lm_eval_bridge import run_lm_eval
from stun_exp.evaluation.perplexity import dataset_tokens, perplexity, text_file_tokens

SETTINGS_KEY = "eval_settings"


def _unpack(ctx_or_model: Any, tokenizer: Any, model_dir: Optional[str]) -> tuple[Any, Any, Optional[str]]:
    """Accept a RunContext (model, tokenizer and the toy's dir taken from it) or a bare model."""
    if hasattr(ctx_or_model, "model") and hasattr(ctx_or_model, "tokenizer"):
        ctx = ctx_or_model
        info = getattr(ctx, "info", {}) or {}
        return ctx.model, tokenizer or ctx.tokenizer, model_dir or info.get("model_dir")
    return ctx_or_model, tokenizer, model_dir


def toy_task_dir(cfg: ToyEval, model_dir: Optional[str]) -> Path:
    """Folder holding the toy's lm-eval task YAMLs and heldout.txt."""
    if cfg.task_dir:
        return Path(cfg.task_dir)
    if model_dir is None:
        raise ConfigError("eval", "toy", "a toy model (eval=toy needs the toy's directory for its task "
                          "files; set eval.task_dir or use eval=paper/ppl/none for other models)")
    from stun_exp.toy.tasks import task_dir
    return Path(task_dir(model_dir))


def _lm_eval(model: Any, tok: Any, cfg: LmEvalBase, include_path: Optional[str]) -> dict[str, Any]:
    return run_lm_eval(model, tok, cfg.tasks, num_fewshot=cfg.num_fewshot, metrics=cfg.metrics,
                       include_path=include_path, include_defaults=include_path is None,
                       limit=cfg.limit, batch_size=cfg.batch_size, max_length=cfg.max_length,
                       seeds=cfg.seeds())


def _ppl(model: Any, ids: Any, seqlen: int, batch_size: int, name: str) -> dict[str, float]:
    r = perplexity(model, ids, seqlen, batch_size)
    return {f"{name}/ppl": r["ppl"], f"{name}/ppl_tokens": r["tokens"]}


def evaluate(ctx_or_model: Any, tokenizer: Any, eval_cfg: Any, model_dir: Optional[str] = None) -> dict:
    """Run the evaluation ``eval_cfg`` (DictConfig or schema object) asks for; {} for eval=none."""
    cfg = build_eval_config(eval_cfg)
    model, tok, model_dir = _unpack(ctx_or_model, tokenizer, model_dir)
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    settings: dict[str, Any] = {"name": cfg.name}
    if isinstance(cfg, ToyEval):
        tdir = toy_task_dir(cfg, model_dir)
        if cfg.tasks:
            res = _lm_eval(model, tok, cfg, str(tdir))
            settings["lm_eval"] = res.pop("settings")
            out.update(res)
        if cfg.ppl:
            out.update(_ppl(model, text_file_tokens(tdir / "heldout.txt", tok), cfg.ppl_seqlen,
                            cfg.ppl_batch_size, "heldout"))
            settings["ppl"] = {"file": str(tdir / "heldout.txt"), "seqlen": cfg.ppl_seqlen}
    elif isinstance(cfg, LmEvalBase):
        res = _lm_eval(model, tok, cfg, None)
        settings["lm_eval"] = res.pop("settings")
        out.update(res)
    elif isinstance(cfg, PplEval):
        for name in cfg.datasets:
            ids = dataset_tokens(name, tok, cfg.seqlen, cfg.c4_nsamples)
            out.update(_ppl(model, ids, cfg.seqlen, cfg.batch_size, name))
        settings["ppl"] = {"datasets": list(cfg.datasets), "seqlen": cfg.seqlen,
                           "c4_nsamples": cfg.c4_nsamples}
    else:
        return {}
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    out[SETTINGS_KEY] = settings
    return out
