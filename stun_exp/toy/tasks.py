"""The toy's task suite: lm-eval 0.4 local tasks + held-out text, and a quick in-process check.

``write_task_files(model_dir, seed)`` writes ``<model_dir>/tasks/``: ``toy_arith`` (generate_until,
GSM8K-style exact match on the number after ``####``, strict and flexible filters as lm-eval's
gsm8k task), ``toy_facts`` and ``toy_compare`` (4-way multiple choice, acc/acc_norm, chance 25%),
their jsonl data and ``heldout.txt`` (held-out corpus text for perplexity). lm-eval needs absolute
``data_files`` paths, and the cache directory may move, so ``task_dir(model_dir)`` rewrites the
YAMLs for the directory's current location; always get the include path through it.
All items are held out from training (see ``stun_exp.toy.corpus``; facts excepted by design).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from stun_exp.toy.corpus import arith_eval_items, compare_eval_items, fact_eval_items, generate_docs

TASKS = ("toy_arith", "toy_facts", "toy_compare")
N_ITEMS = 200
N_HELDOUT_DOCS = 600
PROMPT = "Question: {{question}}\nAnswer:"
STRICT = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
MAX_GEN = 48


def _arith_yaml(data: str) -> dict:
    em = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
          "ignore_punctuation": False, "regexes_to_ignore": [",", "(?s).*#### ", "\\.$"]}
    return {
        "task": "toy_arith", "tag": ["toy"], "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": PROMPT, "doc_to_target": "{{answer}}",
        "num_fewshot": 0, "metric_list": [em],
        "generation_kwargs": {"until": ["Question:", "\n\n", "<|eos|>"], "do_sample": False,
                              "temperature": 0.0, "max_gen_toks": MAX_GEN},
        "filter_list": [
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": STRICT},
                                                {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                     "regex_pattern": FLEXIBLE},
                                                    {"function": "take_first"}]}],
        "metadata": {"version": 1.0}}


def _mc_yaml(name: str, data: str) -> dict:
    return {
        "task": name, "tag": ["toy"], "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": PROMPT, "doc_to_choice": "options",
        "doc_to_target": "label", "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}


def _write_atomic(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_jsonl(path: Path, items: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(it) + "\n" for it in items))


def write_task_files(model_dir: str | Path, seed: int) -> Path:
    """Write the task data (seeded, held out) and the YAMLs; returns ``<model_dir>/tasks``."""
    d = Path(model_dir) / "tasks"
    d.mkdir(parents=True, exist_ok=True)
    _write_jsonl(d / "toy_arith.jsonl", arith_eval_items(N_ITEMS, seed))
    _write_jsonl(d / "toy_facts.jsonl", fact_eval_items(seed)[:N_ITEMS])
    _write_jsonl(d / "toy_compare.jsonl", compare_eval_items(N_ITEMS, seed))
    _write_atomic(d / "heldout.txt", "\n\n".join(generate_docs(N_HELDOUT_DOCS, seed, split="heldout")) + "\n")
    return task_dir(model_dir)


def task_dir(model_dir: str | Path) -> Path:
    """(Re)write the task YAMLs with absolute paths for where ``model_dir`` is now; return the
    folder to pass as lm-eval's ``include_path`` (it also holds ``heldout.txt``)."""
    d = (Path(model_dir) / "tasks").resolve()
    if not (d / "toy_arith.jsonl").is_file():
        raise FileNotFoundError(f"no toy task data under {d}; build the toy with ensure_toy(cfg)")
    specs = {"toy_arith": _arith_yaml(str(d / "toy_arith.jsonl")),
             "toy_facts": _mc_yaml("toy_facts", str(d / "toy_facts.jsonl")),
             "toy_compare": _mc_yaml("toy_compare", str(d / "toy_compare.jsonl"))}
    for name, spec in specs.items():
        _write_atomic(d / f"{name}.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return d


# ---- quick in-process check (our own verification; the official eval goes through lm-eval) ------
def _load(d: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (d / f"{name}.jsonl").read_text().splitlines() if x]


def _prompt(q: str) -> str:
    return f"Question: {q}\nAnswer:"


@torch.no_grad()
def _arith_em(model, tok, items: list[dict], batch: int = 50) -> float:
    hits = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        enc = tok([_prompt(it["question"]) for it in chunk], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=MAX_GEN, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for it, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = re.split(r"Question:|\n\n", tok.decode(seq, skip_special_tokens=True))[0]
            m = re.search(r"#### (-?\d+)", text)
            hits += bool(m) and int(m.group(1)) == it["value"]
    return hits / len(items)


@torch.no_grad()
def _mc_acc(model, tok, items: list[dict]) -> float:
    """Summed log-likelihood of ' option' after the prompt, as lm-eval's ``acc``."""
    hits = 0
    for it in items:
        ctx = tok(_prompt(it["question"]), add_special_tokens=False)["input_ids"]
        seqs = [tok(_prompt(it["question"]) + " " + o, add_special_tokens=False)["input_ids"]
                for o in it["options"]]
        width = max(map(len, seqs))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
        scores = [sum(float(logp[j, t - 1, s[t]]) for t in range(len(ctx), len(s))) for j, s in enumerate(seqs)]
        hits += int(max(range(len(scores)), key=scores.__getitem__) == it["label"])
    return hits / len(items)


@torch.no_grad()
def heldout_ppl(model, tok, text: str, seq_len: int = 128, max_windows: int = 64) -> float:
    ids = torch.tensor(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    n = min(max_windows, len(ids) // seq_len)
    x = ids[: n * seq_len].view(n, seq_len)
    return math.exp(float(model(input_ids=x, labels=x).loss))


def evaluate_toy_quick(model: Any, tok: Any, tasks: str | Path, limit: int | None = None) -> dict:
    """Dense scores without lm-eval (for build metadata and self-checks): arith exact match (strict
    ``####``), MC accuracy, held-out perplexity. ``limit`` caps items per task."""
    d = Path(tasks)
    was_training = model.training
    model.eval()
    res = {"toy_arith_em": _arith_em(model, tok, _load(d, "toy_arith")[:limit]),
           "toy_facts_acc": _mc_acc(model, tok, _load(d, "toy_facts")[:limit]),
           "toy_compare_acc": _mc_acc(model, tok, _load(d, "toy_compare")[:limit]),
           "heldout_ppl": heldout_ppl(model, tok, (d / "heldout.txt").read_text())}
    model.train(was_training)
    return {k: round(v, 4) for k, v in res.items()}
