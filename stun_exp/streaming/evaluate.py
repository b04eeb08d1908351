"""Perplexity of a checkpoint far larger than memory: windows pass the decoder one layer at a time.

The windows go through ``StreamingEngine`` (nothing selected, nothing pruned, outputs propagated),
then the final norm and the head run per window. Same windows and NLL as
``evaluation.perplexity.perplexity`` (batch 1), so the numbers agree with the in-memory model.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Optional

import torch

from ..evaluation.perplexity import window_nll, windows
from .engine import StreamingEngine
from .store import LayerStore


def final_norm(store: LayerStore) -> torch.nn.Module:
    """The norm after the last decoder layer (``<parent of layers>.norm``)."""
    parent = store.adapter.spec.layers_path.rsplit(".", 1)[0]
    base = functools.reduce(getattr, parent.split("."), store.model) if parent else store.model
    return base.norm


@torch.no_grad()
def streaming_perplexity(path: str | Path, ids: torch.Tensor, seqlen: int, device: str | torch.device = "cpu",
                         dtype: Optional[torch.dtype] = None, max_windows: Optional[int] = None,
                         offload_dir: Optional[str] = None, trust_remote_code: bool = False,
                         store: Optional[LayerStore] = None) -> dict[str, Any]:
    """ppl / nll per token / tokens / windows of the checkpoint at `path` on the 1-D stream `ids`."""
    device = torch.device(device)
    win = windows(ids, seqlen)
    if max_windows is not None:
        win = win[:max_windows]
    store = store or LayerStore(path, dtype=dtype, trust_remote_code=trust_remote_code)
    engine = StreamingEngine(store, win, device, select=lambda t: False, desc="ppl", offload_dir=offload_dir,
                             keep_final=True)
    engine.run(lambda l, targets, stats: False)
    h = engine.final_hidden
    norm, head = final_norm(store).to(device), store.model.get_output_embeddings().to(device)
    total = 0.0
    for j in range(win.shape[0]):
        logits = head(norm(h[j:j + 1].to(device)))
        total += float(window_nll(logits, win[j:j + 1].to(device)).sum())
    if engine.offload is not None:
        engine.offload.cleanup()
    count = win.shape[0] * (seqlen - 1)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": float(count),
            "windows": float(win.shape[0]), "seqlen": float(seqlen), "peak_live_layers": store.peak_live}
