"""Streaming mode: prune and evaluate checkpoints far larger than memory, one decoder layer at a time.

Public entry points: ``prune_streaming`` (library), ``streaming_perplexity`` and ``run_streaming(cfg,
run_dir)`` (the pipeline's streaming branch, same results shape as ``pipeline.run_pipeline``).
"""
from .prune import prune_streaming

__all__ = ["prune_streaming"]
