"""Calibration samplers: determinism, window placement, local files and clear offline failures."""
from __future__ import annotations

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from stun_exp.data.calib import load_calibration, sample_documents, sample_stream
from stun_exp.errors import DataError


class CharTok:
    """Character-level stand-in tokenizer (ids = byte values)."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b for b in text.encode()]}


def test_stream_windows_are_seeded_and_contiguous():
    ids = list(range(1000))
    a, b, c = sample_stream(ids, 5, 16, 3), sample_stream(ids, 5, 16, 3), sample_stream(ids, 5, 16, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rng = random.Random(3)
    for row in a:                               # each row is a contiguous slice at the rng's start
        s = rng.randint(0, 1000 - 16 - 1)
        assert row.tolist() == list(range(s, s + 16))


def test_document_sampler_skips_short_documents():
    docs = ["ab", "x" * 50, "cd"]
    out = sample_documents(docs, lambda t: [ord(ch) for ch in t], 4, 10, 0)
    assert out.shape == (4, 10) and (out == ord("x")).all()


def test_document_sampler_errors_when_nothing_is_long_enough(monkeypatch):
    monkeypatch.setattr("stun_exp.data.calib.MAX_DOC_TRIES", 50)
    with pytest.raises(DataError, match="seqlen=10"):
        sample_documents(["short"], lambda t: [1] * len(t), 1, 10, 0)


def test_tokens_and_jsonl_loaders(tmp_path):
    ids = torch.arange(40).reshape(4, 10)
    torch.save(ids, tmp_path / "ids.pt")
    cfg = OmegaConf.create({"name": "tokens", "path": str(tmp_path / "ids.pt"), "nsamples": 3, "seqlen": 8,
                            "seed": 0})
    assert torch.equal(load_calibration(cfg, CharTok()), ids[:3, :8])
    cfg.nsamples = 9
    with pytest.raises(DataError, match="fewer than"):
        load_calibration(cfg, CharTok())
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": "hello world " * 5}) for _ in range(3)))
    cfg = OmegaConf.create({"name": "text", "path": str(tmp_path / "d.jsonl"), "text_field": "text",
                            "nsamples": 2, "seqlen": 12, "seed": 1})
    out = load_calibration(cfg, CharTok())
    assert out.shape == (2, 12) and torch.equal(out, load_calibration(cfg, CharTok()))


def test_hub_dataset_offline_fails_fast_with_advice():
    import time
    cfg = OmegaConf.create({"name": "c4", "dataset": "allenai/c4", "data_files": "en/x.json.gz",
                            "split": "train", "nsamples": 1, "seqlen": 8, "seed": 0})
    t = time.perf_counter()
    with pytest.raises(DataError, match="allenai/c4.*calib=text"):
        load_calibration(cfg, CharTok())
    assert time.perf_counter() - t < 5
