"""Calibration token batches: [nsamples, seqlen] LongTensors drawn reproducibly from a seed.

Two samplers, matching the reference code:
- ``sample_documents`` (Wanda/SparseGPT C4 loader): pick a random document (with replacement),
  retry while it is not longer than seqlen, take one uniformly placed window.
- ``sample_stream`` (Wanda's wikitext2 loader; also the toy and short-document text files):
  join all documents into one token stream and take nsamples uniformly placed windows.
Hub datasets fail at once offline with a message saying what to cache (no 24 s retry loop).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from stun_exp.errors import ConfigError, DataError

MAX_DOC_TRIES = 100_000


def sample_documents(docs: Sequence[str], encode: Callable[[str], list[int]], nsamples: int,
                     seqlen: int, seed: int) -> torch.Tensor:
    """Wanda-style sampling: one random window from each of nsamples random long documents."""
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        for _try in range(MAX_DOC_TRIES):
            ids = encode(docs[rng.randint(0, len(docs) - 1)])
            if len(ids) > seqlen:
                break
        else:
            raise DataError(f"no document longer than seqlen={seqlen} tokens after {MAX_DOC_TRIES} draws; "
                            "lower calib.seqlen or use a stream sampler (calib=text joins documents)")
        start = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[start:start + seqlen])
    return torch.tensor(out, dtype=torch.long)


def sample_stream(ids: Sequence[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens placed uniformly at random in one token stream."""
    if len(ids) <= seqlen:
        raise DataError(f"calibration text has {len(ids)} tokens, fewer than calib.seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    t = torch.as_tensor(list(ids), dtype=torch.long)
    return torch.stack([t[s:s + seqlen] for s in starts])


def _encode_fn(tokenizer: Any) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _join_tokens(docs: Sequence[str], tokenizer: Any) -> list[int]:
    """Concatenate documents into one stream, separated by EOS (as packed pre-training data)."""
    enc, eos = _encode_fn(tokenizer), tokenizer.eos_token_id
    stream: list[int] = []
    for d in docs:
        stream.extend(enc(d))
        if eos is not None:
            stream.append(eos)
    return stream


def hub_dataset(path: str, **kwargs: Any) -> Any:
    """datasets.load_dataset that fails at once, with a clear message, when the data is not cached."""
    import datasets
    try:
        return datasets.load_dataset(path, **kwargs)
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as e:
        raise DataError(
            f"dataset '{path}' ({kwargs}) is not available offline and could not be downloaded: {e}. "
            f"Cache it on a machine with network (datasets.load_dataset('{path}', ...)) and copy "
            f"~/.cache/huggingface, or use calib=text calib.path=<local file> / calib=tokens.") from None


def read_local_docs(path: str, text_field: str = "text") -> list[str]:
    """Documents of a local .txt (blank-line separated) or .jsonl (one JSON object per line) file."""
    p = Path(os.path.expanduser(path))
    if p.suffix in (".jsonl", ".json"):
        docs = []
        for i, line in enumerate(p.read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if text_field not in row:
                raise ConfigError("calib.text_field", text_field, f"a key present in {p} (line {i + 1} has "
                                  f"{sorted(row)})")
            docs.append(row[text_field])
        return docs
    return [d for d in p.read_text().split("\n\n") if d.strip()]


def toy_documents(n_docs: int, toy_seed: int, calib_seed: int) -> list[str]:
    """Training-split toy documents of the toy's own world, from an RNG stream of their own."""
    from stun_exp.toy.corpus import generate_docs
    return generate_docs(n_docs, toy_seed, "train", stream=f"calib:{calib_seed}")


def load_calibration(cfg: Any, tokenizer: Any, toy_seed: int = 0) -> torch.Tensor:
    """The calibration set of ``cfg`` (a calib group config) as a LongTensor [nsamples, seqlen].

    ``toy_seed`` is the toy model's seed (its synthetic world) for ``calib=toy``."""
    n, L, seed = int(cfg.nsamples), int(cfg.seqlen), int(cfg.seed)
    if cfg.name == "tokens":
        ids = torch.load(os.path.expanduser(cfg.path), map_location="cpu")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise DataError(f"calib.path={cfg.path}: expected a LongTensor [n, seqlen], got "
                            f"{type(ids).__name__} {getattr(ids, 'shape', '')} {getattr(ids, 'dtype', '')}")
        if ids.shape[0] < n or ids.shape[1] < L:
            raise DataError(f"calib.path={cfg.path} holds {tuple(ids.shape)}, fewer than "
                            f"nsamples={n} x seqlen={L}")
        return ids[:n, :L].clone()
    if cfg.name == "toy":
        docs = toy_documents(int(cfg.n_docs), toy_seed, seed)
        return sample_stream(_join_tokens(docs, tokenizer), n, L, seed)
    if cfg.name == "text":
        return sample_stream(_join_tokens(read_local_docs(cfg.path, cfg.text_field), tokenizer), n, L, seed)
    if cfg.name == "c4":
        ds = hub_dataset(cfg.dataset, data_files={cfg.split: cfg.data_files}, split=cfg.split)
        return sample_documents(ds["text"], _encode_fn(tokenizer), n, L, seed)
    if cfg.name == "wikitext2":
        ds = hub_dataset(cfg.dataset, name=cfg.subset, split=cfg.split)
        stream = _encode_fn(tokenizer)("\n\n".join(ds["text"]))
        return sample_stream(stream, n, L, seed)
    raise ConfigError("calib", cfg.name, ["toy", "c4", "wikitext2", "text", "tokens"])
