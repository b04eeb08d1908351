"""Evaluation: lm-eval on the in-memory model, perplexity, task suites (see suite.evaluate)."""
from __future__ import annotations

from typing import Any


def evaluate(ctx_or_model: Any, tokenizer: Any, eval_cfg: Any, model_dir: str | None = None) -> dict:
    """See stun_exp.evaluation.suite.evaluate (imported lazily: lm-eval is slow to import)."""
    from stun_exp.evaluation.suite import evaluate as _evaluate
    return _evaluate(ctx_or_model, tokenizer, eval_cfg, model_dir)


def check_available(eval_cfg: Any, model_cfg: Any = None) -> None:
    """See stun_exp.evaluation.availability.check_available."""
    from stun_exp.evaluation.availability import check_available as _check
    _check(eval_cfg, model_cfg=model_cfg)
