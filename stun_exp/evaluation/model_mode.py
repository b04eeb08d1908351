"""The state a model must be in while it is scored (shared by lm-eval and perplexity)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

ROUTER_FLAGS = ("output_router_logits",)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """model.eval(), no grad, router-logit outputs off; everything restored afterwards."""
    cfg = getattr(model, "config", None)
    saved = {f: getattr(cfg, f) for f in ROUTER_FLAGS if cfg is not None and hasattr(cfg, f)}
    was_training = model.training
    try:
        for f in saved:
            setattr(cfg, f, False)
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for f, v in saved.items():
            setattr(cfg, f, v)
        model.train(was_training)
