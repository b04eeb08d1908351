"""Perplexity over a token stream cut into non-overlapping windows of an explicit length.

Follows the SparseGPT/Wanda evaluation code: the corpus is one token stream, cut into
``numel // seqlen`` windows (the ragged tail is dropped), each window is scored independently
(no carried-over context), and ``ppl = exp(total NLL / predicted tokens)``. Every window predicts
``seqlen - 1`` tokens, so this equals the reference's mean of per-window mean losses.

Corpora (reference conventions):
  * wikitext-2: the raw test split joined with ``"\\n\\n"`` (as Wanda/SparseGPT do);
  * C4: the first 1100 documents of ``en/c4-validation.00000-of-00008.json.gz`` joined with
    spaces, truncated to ``nsamples * seqlen`` tokens (SparseGPT uses 256 windows);
  * a local text file: its whole text as one stream (the toy's heldout.txt).
Hub datasets fail at once offline with a message naming what to cache (no retry loop).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stun_exp.evaluation.model_mode import eval_mode

C4_VAL_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_VAL_DOCS = 1100


def windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """[n_windows, seqlen] non-overlapping windows of a 1-D token stream (tail dropped)."""
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window: logits [B, L, V], ids [B, L] -> [B] (float64)."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return nll.double().sum(dim=1)


def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, batch_size: int = 1,
               max_windows: int | None = None) -> dict[str, float]:
    """Perplexity of ``model`` on a 1-D token stream; returns ppl, nll/token, tokens and windows."""
    win = windows(ids, seqlen)
    if max_windows is not None:
        win = win[:max_windows]
    device = next(model.parameters()).device
    total = 0.0
    with eval_mode(model):   # eval(), no grad, router-logit outputs off (per-layer expert counts)
        for i in range(0, win.shape[0], batch_size):
            batch = win[i:i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total += float(window_nll(logits, batch).sum())
    count = win.shape[0] * (seqlen - 1)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": float(count),
            "windows": float(win.shape[0]), "seqlen": float(seqlen)}


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def text_file_tokens(path: str | Path, tokenizer: Any) -> torch.Tensor:
    """The whole local text file as one token stream."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"perplexity text file {p} does not exist")
    return encode(tokenizer, p.read_text())


def hub_dataset(path: str, **kwargs: Any) -> Any:
    """datasets.load_dataset that fails at once with a message saying what to cache."""
    import datasets
    from stun_exp.errors import DataError
    try:
        return datasets.load_dataset(path, **kwargs)
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as e:
        raise DataError(f"evaluation dataset '{path}' ({kwargs}) is not available offline and could not be "
                        f"downloaded ({type(e).__name__}: {e}). Cache it on a machine with network "
                        f"(datasets.load_dataset('{path}', ...)) and copy ~/.cache/huggingface here, "
                        f"or choose eval=toy / eval=none.") from None


def wikitext2_tokens(tokenizer: Any, split: str = "test") -> torch.Tensor:
    ds = hub_dataset("wikitext", name="wikitext-2-raw-v1", split=split)
    return encode(tokenizer, "\n\n".join(ds["text"]))


def c4_tokens(tokenizer: Any, seqlen: int, nsamples: int = 256) -> torch.Tensor:
    ds = hub_dataset("allenai/c4", data_files={"validation": C4_VAL_FILE}, split="validation")
    text = " ".join(ds[:C4_VAL_DOCS]["text"])
    return encode(tokenizer, text)[: nsamples * seqlen]


def dataset_tokens(name: str, tokenizer: Any, seqlen: int, c4_nsamples: int = 256) -> torch.Tensor:
    """Token stream of a named perplexity corpus (``wikitext2`` or ``c4``)."""
    if name == "wikitext2":
        return wikitext2_tokens(tokenizer)
    if name == "c4":
        return c4_tokens(tokenizer, seqlen, c4_nsamples)
    from stun_exp.errors import ConfigError
    raise ConfigError("eval.datasets", name, ["wikitext2", "c4"])
