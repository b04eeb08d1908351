"""Schemas of the ``eval`` group and the registry of tasks they may name.

``eval=none`` skips evaluation; ``eval=toy`` runs the toy's lm-eval task suite plus perplexity on its
held-out text; ``eval=ppl`` is wikitext-2 / C4 perplexity at an explicit sequence length;
``eval=paper`` is the STUN paper's benchmark list through lm-evaluation-harness. The paper's few-shot
counts and metric variants are not published with the paper: the defaults live in
``conf/eval/paper.yaml`` with the reasons in its header, and every run records what was used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from stun_exp.config.schema import Validatable, check_choice, schema
from stun_exp.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    """What we must know about a task before loading it (availability checks, validation)."""
    name: str
    dataset_path: Optional[str]          # HF hub dataset id (lm-eval's dataset_path); None = local files
    dataset_name: Optional[str] = None
    metrics: tuple[str, ...] = ()        # metric keys lm-eval reports ("metric" or "metric,filter")
    source: str = "lm_eval"              # lm_eval (built-in task) | toy (local task files)


PAPER_TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("gsm8k", "openai/gsm8k", "main", ("exact_match,strict-match", "exact_match,flexible-extract")),
    TaskSpec("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", ("acc", "acc_norm")),
    TaskSpec("arc_easy", "allenai/ai2_arc", "ARC-Easy", ("acc", "acc_norm")),
    TaskSpec("hellaswag", "Rowan/hellaswag", None, ("acc", "acc_norm")),
    TaskSpec("mmlu", "cais/mmlu", None, ("acc",)),     # a group of 57 subject tasks, size-weighted acc
    TaskSpec("boolq", "aps/super_glue", "boolq", ("acc",)),
    TaskSpec("openbookqa", "allenai/openbookqa", "main", ("acc", "acc_norm")),
    TaskSpec("rte", "nyu-mll/glue", "rte", ("acc",)),
    TaskSpec("winogrande", "allenai/winogrande", "winogrande_xl", ("acc",)),
]}
# The toy's tasks are local YAML files written by stun_exp.toy.tasks; their metrics are whatever
# those files declare, so they are not checked here.
TOY_TASKS: dict[str, TaskSpec] = {n: TaskSpec(n, None, source="toy")
                                  for n in ("toy_arith", "toy_facts", "toy_compare")}
# Perplexity corpora (real loaders in perplexity.py). Hub id aliases: the cache may hold either.
PPL_DATASETS: dict[str, tuple[str, ...]] = {"wikitext2": ("Salesforce/wikitext", "wikitext"),
                                            "c4": ("allenai/c4",)}
LM_EVAL_SEEDS = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")


@dataclass
class EvalBase(Validatable):
    name: str = "none"


@schema("eval", "none")
@dataclass
class NoEval(EvalBase):
    """No evaluation (pruning-only runs, timing runs)."""
    name: str = "none"


@dataclass
class LmEvalBase(EvalBase):
    """Settings shared by every lm-eval suite; all of them are recorded in results.json."""
    tasks: list[str] = field(default_factory=list)
    num_fewshot: dict[str, int] = field(default_factory=dict)    # per task; missing task = 0
    metrics: dict[str, list[str]] = field(default_factory=dict)  # per task; missing task = all
    limit: Optional[float] = None        # docs per task (int) or fraction (< 1); null = all
    batch_size: int = 8
    max_length: Optional[int] = None     # null = the model's max_position_embeddings
    random_seed: int = 0                 # lm-eval's defaults: 0 / 1234 / 1234 / 1234
    numpy_random_seed: int = 1234
    torch_random_seed: int = 1234
    fewshot_random_seed: int = 1234

    def registry(self) -> dict[str, TaskSpec]:
        return PAPER_TASKS

    def validate(self, info: Optional[Any] = None, prefix: str = "eval") -> None:
        known = self.registry()
        for t in self.tasks:
            check_choice(f"{prefix}.tasks", t, list(known))
        for t, n in self.num_fewshot.items():
            check_choice(f"{prefix}.num_fewshot", t, list(known))   # keys for unused tasks are fine
            if not isinstance(n, int) or n < 0:
                raise ConfigError(f"{prefix}.num_fewshot.{t}", n, "an integer >= 0")
        for t, ms in self.metrics.items():
            check_choice(f"{prefix}.metrics", t, list(known))
            for m in ms:
                if known[t].metrics:
                    check_choice(f"{prefix}.metrics.{t}", m, list(known[t].metrics))
        if self.limit is not None and not self.limit > 0:
            raise ConfigError(f"{prefix}.limit", self.limit, "null, a fraction in (0, 1) or a count >= 1")
        if self.limit is not None and self.limit >= 1 and self.limit != int(self.limit):
            raise ConfigError(f"{prefix}.limit", self.limit, "a whole number of documents when >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        for s in LM_EVAL_SEEDS:
            v = getattr(self, s)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{prefix}.{s}", v, "a non-negative integer")
        _check_len(f"{prefix}.max_length", self.max_length, info, optional=True)

    def seeds(self) -> dict[str, int]:
        return {s: int(getattr(self, s)) for s in LM_EVAL_SEEDS}


@schema("eval", "paper")
@dataclass
class PaperEval(LmEvalBase):
    """The STUN paper's lm-eval benchmarks (defaults and their reasons: conf/eval/paper.yaml)."""
    name: str = "paper"
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))


@schema("eval", "toy")
@dataclass
class ToyEval(LmEvalBase):
    """The toy's own suite (local lm-eval tasks) plus perplexity on its held-out text."""
    name: str = "toy"
    tasks: list[str] = field(default_factory=lambda: list(TOY_TASKS))
    batch_size: int = 16
    ppl_seqlen: int = 128                # non-overlapping windows over heldout.txt
    ppl_batch_size: int = 8
    ppl: bool = True                     # perplexity on <task dir>/heldout.txt
    task_dir: Optional[str] = None       # null = stun_exp.toy.tasks.task_dir(<toy model dir>)

    def registry(self) -> dict[str, TaskSpec]:
        return TOY_TASKS

    def validate(self, info: Optional[Any] = None, prefix: str = "eval") -> None:
        super().validate(info, prefix)
        if self.ppl:
            _check_len(f"{prefix}.ppl_seqlen", self.ppl_seqlen, info)
        if self.ppl_batch_size < 1:
            raise ConfigError(f"{prefix}.ppl_batch_size", self.ppl_batch_size, "an integer >= 1")


@schema("eval", "ppl")
@dataclass
class PplEval(EvalBase):
    """Perplexity on wikitext-2 (test split) and/or C4 (validation shard 0), SparseGPT/Wanda style."""
    name: str = "ppl"
    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "c4"])
    seqlen: int = 2048                   # explicit: results are only comparable at equal seqlen
    batch_size: int = 1
    c4_nsamples: int = 256               # C4 windows (SparseGPT/Wanda: 256 x seqlen tokens)

    def validate(self, info: Optional[Any] = None, prefix: str = "eval") -> None:
        if not self.datasets:
            raise ConfigError(f"{prefix}.datasets", self.datasets, f"a non-empty list of {list(PPL_DATASETS)}")
        for d in self.datasets:
            check_choice(f"{prefix}.datasets", d, list(PPL_DATASETS))
        _check_len(f"{prefix}.seqlen", self.seqlen, info)
        for key in ("batch_size", "c4_nsamples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "an integer >= 1")


def _check_len(key: str, value: Optional[int], info: Optional[Any], optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < 2:
        raise ConfigError(key, value, "an integer >= 2")
    if info is not None and value > info.max_position_embeddings:
        raise ConfigError(key, value, f"at most the model's max_position_embeddings "
                                      f"({info.max_position_embeddings})")


def build_eval_config(cfg: Any) -> EvalBase:
    """The typed schema object for an ``eval`` node (DictConfig, dict or schema object)."""
    if isinstance(cfg, EvalBase):
        return cfg
    from omegaconf import DictConfig, OmegaConf
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
        if isinstance(cfg, EvalBase):
            return cfg
    classes = {"none": NoEval, "toy": ToyEval, "ppl": PplEval, "paper": PaperEval}
    d = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
    check_choice("eval", d.get("name", "none"), list(classes))
    return classes[d.get("name", "none")](**d)
