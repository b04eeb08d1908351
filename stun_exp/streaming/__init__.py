"""Streaming mode: prune and evaluate checkpoints far larger than memory, one decoder layer at a time.

``runtime.StreamingRuntime`` is the runtime the runner uses with ``runtime=streaming``;
``evaluate.streaming_perplexity`` evaluates a checkpoint the same way. Importing the package (its
config schema) must not import torch: the modules are imported where they are used.
"""
