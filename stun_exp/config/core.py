"""Schemas of the calibration sets, the real-model configs, the loggers and the root keys."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import MISSING

from stun_exp.config.schema import Validatable, check_choice, check_range, schema
from stun_exp.errors import ConfigError, closest


# ---- calibration sets -----------------------------------------------------------------------
@dataclass
class CalibBase(Validatable):
    name: str = "toy"
    nsamples: int = 32
    seqlen: int = 128
    seed: int = 0

    def validate(self, info: Optional[Any] = None, prefix: str = "calib") -> None:
        if self.nsamples < 1:
            raise ConfigError(f"{prefix}.nsamples", self.nsamples, "an integer >= 1")
        if self.seqlen < 2:
            raise ConfigError(f"{prefix}.seqlen", self.seqlen, "an integer >= 2")
        if self.seed < 0:
            raise ConfigError(f"{prefix}.seed", self.seed, "a non-negative integer")
        if info is not None and self.seqlen > info.max_position_embeddings:
            raise ConfigError(f"{prefix}.seqlen", self.seqlen,
                              f"at most the model's max_position_embeddings ({info.max_position_embeddings})")


@schema("calib", "toy")
@dataclass
class ToyCalib(CalibBase):
    """Windows of the toy corpus (training split, its own seed)."""
    name: str = "toy"
    n_docs: int = 4000

    def validate(self, info: Optional[Any] = None, prefix: str = "calib") -> None:
        super().validate(info, prefix)
        if self.n_docs < 1:
            raise ConfigError(f"{prefix}.n_docs", self.n_docs, "an integer >= 1")


@schema("calib", "c4")
@dataclass
class C4Calib(CalibBase):
    """Wanda/SparseGPT-style: random documents longer than seqlen, one random window each."""
    name: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    dataset: str = "allenai/c4"
    data_files: str = "en/c4-train.00000-of-01024.json.gz"
    split: str = "train"


@schema("calib", "wikitext2")
@dataclass
class Wikitext2Calib(CalibBase):
    """Wanda-style: the train split joined with blank lines, random windows of the stream."""
    name: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    dataset: str = "wikitext"
    subset: str = "wikitext-2-raw-v1"
    split: str = "train"


@schema("calib", "text")
@dataclass
class TextCalib(CalibBase):
    """A local .txt (one document per blank-line-separated block) or .jsonl (field `text_field`)."""
    name: str = "text"
    path: str = "???"
    text_field: str = "text"

    def validate(self, info: Optional[Any] = None, prefix: str = "calib") -> None:
        super().validate(info, prefix)
        _check_file(f"{prefix}.path", self.path, (".txt", ".jsonl", ".json"))


@schema("calib", "tokens")
@dataclass
class TokensCalib(CalibBase):
    """A saved LongTensor [n, seqlen] of token ids (torch.save), so tools compare on identical tokens."""
    name: str = "tokens"
    path: str = "???"

    def validate(self, info: Optional[Any] = None, prefix: str = "calib") -> None:
        super().validate(info, prefix)
        _check_file(f"{prefix}.path", self.path, (".pt", ".pth", ".bin"))


def _check_file(key: str, path: str, suffixes: tuple[str, ...]) -> None:
    import os
    if not path or path == "???" or not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(key, path, f"an existing file ({', '.join(suffixes)})")
    if not path.endswith(suffixes):
        raise ConfigError(key, path, f"a file ending in {', '.join(suffixes)}")


# ---- real models ----------------------------------------------------------------------------
@schema("model", "hf")
@dataclass
class HFModel(Validatable):
    """Any transformers checkpoint: a hub id (must be cached when offline) or a local directory."""
    kind: str = "hf"
    name_or_path: str = "???"
    trust_remote_code: bool = False
    dtype: str = "auto"            # auto = bf16 on GPU, fp32 on CPU
    pretrained_path: Optional[str] = None   # the pre-fine-tuning model, for router_change
    device_map: Optional[str] = None        # e.g. "auto": spread a model too big for one GPU (accelerate)
    threads: Optional[int] = None           # torch intra-op threads of the run; null = torch's default

    def validate(self, info: Optional[Any] = None, prefix: str = "model") -> None:
        if not self.name_or_path or self.name_or_path == "???":
            raise ConfigError(f"{prefix}.name_or_path", self.name_or_path, "a hub id or a local directory")
        check_choice(f"{prefix}.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{prefix}.threads", self.threads, "null or a positive integer")


# ---- loggers --------------------------------------------------------------------------------
@schema("logger", "none")
@dataclass
class NoLogger(Validatable):
    name: str = "none"


@schema("logger", "wandb")
@dataclass
class WandbLogger(Validatable):
    name: str = "wandb"
    project: str = "stun-exp"
    entity: Optional[str] = None
    mode: str = "offline"          # online | offline | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def validate(self, info: Optional[Any] = None, prefix: str = "logger") -> None:
        check_choice(f"{prefix}.mode", self.mode, ["online", "offline", "disabled"])


# ---- root keys ------------------------------------------------------------------------------
DEVICE_RE = r"^(cpu|auto|cuda(:\d+)?)$"


@schema(None, "root")
@dataclass
class RootConfig(Validatable):
    """The top-level keys (typed: ``save_checkpoint=no`` is false, ``sparsity=abc`` is refused at
    once). Group nodes carry their own schemas; ``+key=...`` with a key no schema knows is refused."""
    model: Any = MISSING
    calib: Any = MISSING
    expert_pruner: Any = MISSING
    unstructured_pruner: Any = MISSING
    distill: Any = MISSING
    eval: Any = MISSING
    logger: Any = MISSING
    runtime: Any = MISSING
    name: str = "run"
    seed: int = 0
    sparsity: Optional[float] = None
    device: str = "cpu"
    save_checkpoint: bool = False
    dense_baseline: bool = True
    analysis_cache: bool = True
    resume: bool = False
    out_root: str = "outputs"

    def validate(self, info: Optional[Any] = None, prefix: str = "") -> None:
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "a non-negative integer")
        if self.sparsity is not None:
            check_range("sparsity", self.sparsity, 0.0, 1.0)
        if not re.match(DEVICE_RE, self.device):
            raise ConfigError("device", self.device, "cpu, cuda, cuda:<index> or auto",
                              hint=closest(self.device, ROOT_DEVICES).strip(" ()"))
        if not self.out_root.strip():
            raise ConfigError("out_root", self.out_root, "a directory path")


ROOT_DEVICES = ["cpu", "cuda", "cuda:0", "auto"]
ROOT_KEYS = [f.name for f in fields(RootConfig)]


def validate_root(cfg: Any) -> None:
    """Checks on top-level keys (seed, sparsity, device, ...)."""
    node = RootConfig(**{k: cfg.get(k) for k in ROOT_KEYS if k in cfg and not _is_group(k)})
    node.check_fields()
    node.validate()


def _is_group(key: str) -> bool:
    return key in ("model", "calib", "expert_pruner", "unstructured_pruner", "distill", "eval", "logger",
                   "runtime")
