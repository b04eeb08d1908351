"""Streaming mode: prune and evaluate checkpoints far larger than memory, one decoder layer at a time.

Public entry points: ``prune_streaming`` (library), ``streaming_perplexity`` and ``run_streaming(cfg,
run_dir)`` (the pipeline's streaming branch, same results shape as ``pipeline.run_pipeline``).
"""
from .prune import prune_streaming

__all__ = ["prune_streaming", "run_streaming", "streaming_perplexity"]


def __getattr__(name: str):
    """Lazy re-exports (run_streaming pulls in Hydra; streaming_perplexity the eval helpers)."""
    if name == "run_streaming":
        from .run import run_streaming
        return run_streaming
    if name == "streaming_perplexity":
        from .evaluate import streaming_perplexity
        return streaming_perplexity
    raise AttributeError(name)
