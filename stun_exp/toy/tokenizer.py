"""A small BPE tokenizer trained locally on the toy corpus (no download).

Byte-level pre-tokenisation (exact decode round trip, spaces kept as a ``Ġ`` prefix) after
splitting every digit into its own token, so numbers are spelled digit by digit (arithmetic is
learnable with a 384-token vocabulary). Wrapped as a transformers ``PreTrainedTokenizerFast``
with pad/bos/eos; no special tokens are added on encode (documents are separated by eos in the
packed training stream, and lm-eval adds none by default either).
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0..3


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train BPE on ``texts`` and wrap it; deterministic for the same texts and vocab size."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, padding_side="left", model_max_length=512)
