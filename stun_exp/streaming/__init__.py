"""Streaming mode: prune and evaluate checkpoints far larger than memory, one decoder layer at a time.

Public entry points: ``prune_streaming`` (library), ``streaming_perplexity`` and ``run_streaming(cfg,
run_dir)`` (the pipeline's streaming branch, same results shape as ``pipeline.run_pipeline``).
"""
__all__ = ["prune_streaming", "run_streaming", "streaming_perplexity"]


def __getattr__(name: str):
    """Lazy re-exports: importing the package (its config schema) must not import torch."""
    if name == "prune_streaming":
        from .prune import prune_streaming
        return prune_streaming
    if name == "run_streaming":
        from .run import run_streaming
        return run_streaming
    if name == "streaming_perplexity":
        from .evaluate import streaming_perplexity
        return streaming_perplexity
    raise AttributeError(name)
