"""Build-or-load the toy MoE: a cached, atomically written, deterministic checkpoint directory.

Layout of ``<cache_dir>/toy/<key>/``: the ``MixtralForCausalLM`` checkpoint (``save_pretrained``),
its tokenizer, ``tasks/`` (lm-eval task YAMLs + jsonl, see ``stun_exp.toy.tasks``) and
``toy_meta.json`` (config, key, timings, final loss, quick dense scores, the machine it was built
on). The key hashes the config fields that change the weights plus ``RECIPE_VERSION`` (bump it
when the corpus or the trainer changes). When the key is the one of the toy shipped with the
package (``stun_exp.toy.shipped``), the cache entry is a copy of it instead of a training run.
A build happens in a temporary sibling directory that is renamed into place only when
complete, under an exclusive file lock, so a killed build leaves no half-built cache and two
processes never train the same key at once (the second waits, then loads).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from stun_exp.toy.config import ToyModelCfg, as_toy_cfg, resolve_cache_dir, weight_fields

RECIPE_VERSION = 2
META = "toy_meta.json"
BUILD_COUNT = {"pretrain": 0, "finetune": 0, "installed": 0}  # per process (tests read it)


def config_key(cfg: ToyModelCfg, finetune: bool = False) -> str:
    """Short hash of what determines the weights (pretrained, or fine-tuned on top)."""
    d: dict[str, Any] = {"recipe": RECIPE_VERSION, **weight_fields(cfg)}
    if finetune:
        d.update(finetune_domain=cfg.finetune_domain, finetune_steps=cfg.finetune_steps)
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
    return f"{h}-ft-{cfg.finetune_domain}" if finetune else h


def toy_root(cfg: ToyModelCfg) -> Path:
    return resolve_cache_dir(cfg.cache_dir) / "toy"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(d: Path) -> bool:
    return (d / META).is_file() and (d / "config.json").is_file()


def _build_atomically(final: Path, builder) -> Path:
    """Run ``builder(tmpdir)`` in a sibling temp dir, then rename it to ``final`` (under a lock)."""
    if not _is_complete(final):
        _build_locked(final, builder)
    from stun_exp.toy.tasks import task_dir
    task_dir(final)  # YAML data paths must point at where the cache is now
    return final


def _build_locked(final: Path, builder) -> None:
    with _locked(final.parent / f".{final.name}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            builder(tmp)
            if final.exists():  # stale, incomplete leftover from an older layout
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _save(model, tok, out: Path, cfg: ToyModelCfg, key: str, stats: dict, extra: dict) -> None:
    from stun_exp.toy.tasks import evaluate_toy_quick, write_task_files
    model.save_pretrained(out)
    tok.save_pretrained(out)
    tasks = write_task_files(out, cfg.seed)
    meta = {"key": key, "recipe_version": RECIPE_VERSION, "config": weight_fields(cfg), **extra,
            "training": stats, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if cfg.eval_after_build:
        t0 = time.time()
        meta["dense_scores_quick"] = evaluate_toy_quick(model, tok, tasks)
        meta["eval_seconds"] = round(time.time() - t0, 1)
    (out / META).write_text(json.dumps(meta, indent=2))


def _announce(cfg: ToyModelCfg, key: str, steps: int, what: str) -> None:
    """Say up front that a training run starts and how long it should take on this machine."""
    from stun_exp.toy.train import measure_step_seconds
    per_step, threads = measure_step_seconds(cfg)
    print(f"[stun_exp.toy] training the {what} {key} ({steps} steps): expected ~{steps * per_step / 60:.1f} min "
          f"on this machine ({per_step:.2f} s/step measured just now, {threads} torch thread(s)) plus corpus "
          f"preparation; then cached under {toy_root(cfg)}", file=sys.stderr, flush=True)


def _build_pretrained(cfg: ToyModelCfg, key: str, out: Path) -> None:
    from stun_exp.toy.train import pretrain
    _announce(cfg, key, cfg.train_steps, "toy")
    t0 = time.time()
    model, tok, stats = pretrain(cfg)
    BUILD_COUNT["pretrain"] += 1
    stats["build_seconds"] = round(time.time() - t0, 1)
    _save(model, tok, out, cfg, key, stats, {})


def _build_finetuned(cfg: ToyModelCfg, key: str, pre: Path, out: Path) -> None:
    from transformers import AutoTokenizer, MixtralForCausalLM
    from stun_exp.toy.train import finetune
    model = MixtralForCausalLM.from_pretrained(pre)
    tok = AutoTokenizer.from_pretrained(pre)
    _announce(cfg, key, cfg.finetune_steps, "fine-tuned toy")
    stats = finetune(model, tok, cfg)
    BUILD_COUNT["finetune"] += 1
    _save(model, tok, out, cfg, key, stats, {"finetune_domain": cfg.finetune_domain,
                                            "finetune_steps": cfg.finetune_steps,
                                            "pretrained_path": str(pre)})


def _install_shipped(cfg: ToyModelCfg, out: Path) -> None:
    from stun_exp.toy.shipped import install
    install(out, cfg.seed)
    BUILD_COUNT["installed"] += 1


def ensure_pretrained(cfg: Any, use_shipped: bool = True) -> Path:
    """Directory of the pretrained toy for ``cfg`` (fine-tune fields ignored): the cached one, else
    the shipped one copied into the cache when the key matches (unless ``use_shipped=False``),
    else trained now."""
    cfg = as_toy_cfg(cfg)
    key = config_key(cfg)
    from stun_exp.toy.shipped import shipped_key
    if use_shipped and key == shipped_key():
        builder = lambda d: _install_shipped(cfg, d)  # noqa: E731
    else:
        builder = lambda d: _build_pretrained(cfg, key, d)  # noqa: E731
    return _build_atomically(toy_root(cfg) / key, builder)


def is_cached(cfg: Any) -> bool:
    """True when the pretrained toy for ``cfg`` is complete in its cache (nothing to do)."""
    cfg = as_toy_cfg(cfg)
    return _is_complete(toy_root(cfg) / config_key(cfg))


def ensure_toy_pair(cfg: Any) -> tuple[Path, Path]:
    """(fine-tuned dir, pretrained dir): the toy fine-tuned on ``cfg.finetune_domain`` for
    ``cfg.finetune_steps`` steps, and the model it started from (for router-change pruning)."""
    cfg = as_toy_cfg(cfg)
    if cfg.finetune_domain is None:
        from stun_exp.errors import ConfigError
        from stun_exp.toy.corpus import DOMAINS
        raise ConfigError("model.finetune_domain", None, list(DOMAINS), "needed for a fine-tuned pair")
    pre = ensure_pretrained(cfg)
    key = config_key(cfg, finetune=True)
    ft = _build_atomically(toy_root(cfg) / key, lambda d: _build_finetuned(cfg, key, pre, d))
    return ft, pre


def ensure_toy(cfg: Any) -> Path:
    """The model directory ``cfg`` describes: the pretrained toy, or, when ``finetune_domain``
    is set, the fine-tuned one (its pretrained origin is ``toy_meta.json["pretrained_path"]``)."""
    cfg = as_toy_cfg(cfg)
    return ensure_toy_pair(cfg)[0] if cfg.finetune_domain else ensure_pretrained(cfg)


def read_meta(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / META).read_text())
