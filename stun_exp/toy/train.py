"""Training the toy: corpus -> tokenizer -> packed token stream -> MixtralForCausalLM.

Recipe: AdamW (betas .9/.95, weight decay .05 on matrices), linear warmup over 5% of the steps
then cosine to 10% of the peak, gradient clip 1, router load-balancing loss coefficient 0.01,
batches of ``batch_size`` windows of ``seq_len`` tokens, a fixed step count (not a wall-time
budget, so a build is deterministic per machine and thread count). Windows start at document
starts (not random offsets) so that evaluation prompts, which start at a document start, look like
training text.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from stun_exp.toy.config import MAX_POSITIONS, ToyModelCfg
from stun_exp.toy.corpus import generate_docs
from stun_exp.toy.tokenizer import train_tokenizer

AUX_COEF = 0.01
TOKENIZER_DOCS = 20_000
# transformers 5's default experts kernel, pinned so a library default change cannot change the
# recipe: on CPU it trains as fast as "eager" at 8 experts and ~1.8x faster at 64 (one thread).
EXPERTS_IMPL = "grouped_mm"


def set_threads() -> int:
    """Use every core we may run on, unless OMP_NUM_THREADS says otherwise."""
    env = os.environ.get("OMP_NUM_THREADS")
    n = int(env) if env and env.isdigit() else len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


@contextlib.contextmanager
def training_threads() -> Iterator[int]:
    """``set_threads`` for the duration of a training run, then restore the caller's setting."""
    before = torch.get_num_threads()
    try:
        yield set_threads()
    finally:
        torch.set_num_threads(before)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def host_info() -> dict:
    """The machine and software a build ran on: training is deterministic only per machine."""
    import platform

    import transformers
    return {"host_cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def build_tokenizer(cfg: ToyModelCfg) -> PreTrainedTokenizerFast:
    n = min(TOKENIZER_DOCS, max(2000, cfg.train_steps * cfg.batch_size))
    return train_tokenizer(generate_docs(n, cfg.seed, stream="tokenizer"), cfg.vocab_size)


def make_model(cfg: ToyModelCfg, tok: Optional[PreTrainedTokenizerFast] = None) -> MixtralForCausalLM:
    """The toy's untrained model, seeded (``tok`` supplies the special-token ids; None: unset)."""
    torch.manual_seed(cfg.seed)
    ids = {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    mc = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        router_aux_loss_coef=AUX_COEF, output_router_logits=False, router_jitter_noise=0.0,
        sliding_window=None, experts_implementation=EXPERTS_IMPL, **ids)
    return MixtralForCausalLM(mc)


def measure_step_seconds(cfg: ToyModelCfg, steps: int = 2) -> tuple[float, int]:
    """Seconds per training step of this config on this machine (a scratch model on random tokens,
    one warm-up step, then the median of ``steps``), and the thread count it ran with."""
    with training_threads() as threads:
        g = torch.Generator().manual_seed(0)
        model = make_model(cfg)                   # the model the build trains, as it trains it
        model.config.output_router_logits = True
        opt = _optimizer(model, cfg.lr)
        times = []
        for _ in range(steps + 1):
            x = torch.randint(4, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
            t = time.perf_counter()
            out = model(input_ids=x, labels=x)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        return float(np.median(times[1:])), threads


def pack(docs: list[str], tok: PreTrainedTokenizerFast, seq_len: int,
         chunk: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``doc eos doc eos ...``; return (stream, valid window starts = doc starts).

    Encodes through the backend ``tokenizers`` object in chunks (the transformers wrapper is
    several times slower and holds every Python list at once)."""
    backend, eos = tok.backend_tokenizer, tok.eos_token_id
    parts = []
    for i in range(0, len(docs), chunk):
        for enc in backend.encode_batch_fast(docs[i:i + chunk], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.int64))
    lens = np.fromiter((len(x) for x in parts), dtype=np.int64, count=len(parts))
    stream = np.concatenate(parts)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    starts = starts[starts + seq_len <= len(stream)]
    return torch.from_numpy(stream), torch.from_numpy(starts)


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def train_loop(model: MixtralForCausalLM, stream: torch.Tensor, starts: torch.Tensor, steps: int,
               batch_size: int, seq_len: int, lr: float, seed: int, desc: str = "toy",
               on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Train in place; return loss statistics. Deterministic for a fixed seed and thread count."""
    g = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, lr)
    warmup = max(1, round(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    offs = torch.arange(seq_len)
    model.train()
    model.config.output_router_logits = True
    ce_hist, aux_hist, t0 = [], [], time.time()
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for step in bar:
        x = stream[starts[torch.randint(len(starts), (batch_size,), generator=g)][:, None] + offs]
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        aux = float(out.aux_loss.detach())
        ce_hist.append(float(out.loss.detach()) - AUX_COEF * aux)
        aux_hist.append(aux)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(ce_hist[-10:]):.3f}", aux=f"{aux:.2f}")
        if on_step:
            on_step(step, ce_hist[-1])
    model.config.output_router_logits = False
    model.eval()
    secs = time.time() - t0
    tail = max(1, min(50, steps // 5))
    return {"steps": steps, "train_seconds": round(secs, 1), "steps_per_s": round(steps / secs, 3),
            "experts_implementation": model.config._experts_implementation,
            "tokens": steps * batch_size * seq_len, "final_loss": round(float(np.mean(ce_hist[-tail:])), 4),
            "final_aux_loss": round(float(np.mean(aux_hist[-tail:])), 4), "threads": torch.get_num_threads()}


def n_docs_for(steps: int, batch_size: int, seq_len: int) -> int:
    """Enough documents that windows rarely repeat (~33 tokens per document)."""
    return int(min(300_000, max(2_000, steps * batch_size * seq_len // 30)))


def pretrain(cfg: ToyModelCfg) -> tuple[MixtralForCausalLM, PreTrainedTokenizerFast, dict]:
    """Corpus, tokenizer and model from nothing; returns (model, tokenizer, stats)."""
    with training_threads() as threads:
        return _pretrain(cfg, threads)


def _pretrain(cfg: ToyModelCfg, threads: int) -> tuple[MixtralForCausalLM, PreTrainedTokenizerFast, dict]:
    t0 = time.time()
    tok = build_tokenizer(cfg)
    docs = generate_docs(n_docs_for(cfg.train_steps, cfg.batch_size, cfg.seq_len), cfg.seed, stream="train")
    stream, starts = pack(docs, tok, cfg.seq_len)
    prep = time.time() - t0
    model = make_model(cfg, tok)
    stats = train_loop(model, stream, starts, cfg.train_steps, cfg.batch_size, cfg.seq_len, cfg.lr,
                       cfg.seed, desc="toy pretrain")
    stats.update(prep_seconds=round(prep, 1), corpus_docs=len(docs), corpus_tokens=len(stream), threads=threads,
                 **host_info())
    return model, tok, stats


def finetune(model: MixtralForCausalLM, tok: PreTrainedTokenizerFast, cfg: ToyModelCfg) -> dict:
    """Continue training on one domain only (half the peak lr), for the router-change pair."""
    with training_threads():
        return _finetune(model, tok, cfg)


def _finetune(model: MixtralForCausalLM, tok: PreTrainedTokenizerFast, cfg: ToyModelCfg) -> dict:
    n = n_docs_for(cfg.finetune_steps, cfg.batch_size, cfg.seq_len)
    docs = generate_docs(n, cfg.seed, mix={cfg.finetune_domain: 1.0}, stream="finetune")
    stream, starts = pack(docs, tok, cfg.seq_len)
    return train_loop(model, stream, starts, cfg.finetune_steps, cfg.batch_size, cfg.seq_len, cfg.lr * 0.5,
                      cfg.seed + 1, desc=f"toy finetune[{cfg.finetune_domain}]")
