"""``PRUNING.md``: the short card saved with every checkpoint (what a model-hub card links to).

It says how the checkpoint was made (method, config), what it holds (expert count per MoE layer, the
sparsity ledger) and which loaders take it. The facts about the checkpoint itself come from its
config (always present); the method, config and ledger come from the run's report (the
``results.json`` shape: ``config``, ``expert_pruning``, ``unstructured_pruning``, ``sparsity``) when
one is given.
"""
from __future__ import annotations

import json
from typing import Any, Optional

_LEDGER = (("decoder_linear", "decoder Linear weights of the original model (removed experts count as zeros)"),
           ("all_params", "all parameters of the original model"),
           ("active_params", "parameters active per token"),
           ("targeted", "the weights the unstructured pruner targeted"),
           ("expert", "experts removed / experts originally present"))


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f} %"


def _method(report: dict) -> list[str]:
    cfg = report.get("config") or {}
    ep, up = report.get("expert_pruning") or {}, report.get("unstructured_pruning") or {}
    model = cfg.get("model") or {}
    src = model.get("name_or_path") or model.get("kind")
    lines = [f"- source model: `{src}`"] if src else []
    if ep:
        scope = (cfg.get("expert_pruner") or {}).get("scope") or (ep.get("meta") or {}).get("scope")
        lines.append(f"- expert pruning: `{ep.get('method')}`" + (f", scope `{scope}`" if scope else "")
                     + f", removal `{ep.get('removal')}`: {ep.get('experts_before')} -> "
                       f"{ep.get('experts_after')} experts")
    else:
        lines.append("- expert pruning: none")
    un = (cfg.get("unstructured_pruner") or {}).get("name")
    if un and un != "none":
        ratio = (up.get("split") or {}).get("unstructured_ratio")
        lines.append(f"- unstructured pruning: `{un}`" + (f", ratio {ratio:.4f} of the remaining targeted "
                                                          f"weights" if ratio is not None else ""))
    if cfg.get("sparsity") is not None:
        lines.append(f"- total sparsity target (decoder Linear weights of the original model): {cfg['sparsity']}")
    keys = [k for k in ("expert_pruner", "unstructured_pruner", "sparsity", "seed") if k in cfg]
    if keys:
        lines += ["", "Config of the run:", "", "```json",
                  json.dumps({k: cfg[k] for k in keys}, indent=1, sort_keys=True, default=str), "```"]
    return lines


def _counts(info: Any) -> list[str]:
    orig, zeroed = info.original, info.zeroed
    head = "| MoE layer | experts stored |" + (" of |" if orig else "") + (" zeroed |" if zeroed else "")
    rule = "| --- | --- |" + (" --- |" if orig else "") + (" --- |" if zeroed else "")
    rows = [f"| {l} | {n} |" + (f" {orig} |" if orig else "")
            + (f" {len(zeroed.get(l, []))} |" if zeroed else "") for l, n in sorted(info.counts.items())]
    note = []
    if info.removal == "zero_output":
        note = ["", "Removal `zero_output`: pruned experts are still stored (as zeros) and still routed to; "
                    "the shapes, and the memory, are those of the original model."]
    return [head, rule, *rows, *note]


def _ledger(report: dict) -> list[str]:
    sp = report.get("sparsity") or {}
    rows = [f"| {name} | {_pct(sp.get(name))} | {what} |" for name, what in _LEDGER if name in sp]
    if not rows:
        return ["No sparsity ledger was given."]
    return ["| sparsity | value | over |", "| --- | --- | --- |", *rows]


def _loaders(info: Any) -> list[str]:
    trust = ", trust_remote_code=True" if info.trust_remote_code else ""
    tok_trust = "" if info.stock else trust
    code = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained(path{trust})",
            f"tokenizer = AutoTokenizer.from_pretrained(path{tok_trust})", "```"]
    if info.kind == "uniform" and info.stock:
        lines = ["Every MoE layer keeps the same number of experts, and `config.json` is a stock "
                 f"`{info.arch}` config with that count: stock transformers loads it (below), and serving "
                 "stacks that build every MoE layer from the config's one expert-count field (vLLM, SGLang) "
                 "read the same fields as for the original model (stun-exp's own tests load it with stock "
                 "transformers only). The extra keys `num_experts_original`, `expert_removal` and "
                 "`num_experts_per_layer` record the pruning; stock loaders ignore them."]
    elif info.kind == "uniform":
        lines = [f"Every MoE layer keeps the same number of experts. `{info.arch}` is not part of transformers: "
                 "its own modeling code is in this folder (`auto_map`), so loading needs "
                 "`trust_remote_code=True`, as the original model does."]
    else:
        lines = ["MoE layers keep different numbers of experts (`num_experts_per_layer` in `config.json`). "
                 "Stock configs hold one expert count, so this folder carries its own small modeling code "
                 "(`modeling_pruned_moe.py`, needing only torch and transformers): load it with "
                 "`trust_remote_code=True`. vLLM and SGLang build every MoE layer from one count and "
                 "cannot load it; prune with `scope=layer` for a checkpoint they can serve."]
    lines += ["", *code]
    if info.adjustments:
        lines += ["", "Config fields changed for consistency:", *[f"- {a}" for a in info.adjustments]]
    return lines


def render(info: Any, report: Optional[dict] = None) -> str:
    """The Markdown text of PRUNING.md for an ``export.ExportInfo`` and an optional run report."""
    parts = ["# Pruned checkpoint", "", f"Architecture `{info.arch}`, written by stun-exp.", "",
             "## Method", ""]
    parts += _method(report) if report else ["No run report was given; the facts below come from the config."]
    parts += ["", "## Experts per MoE layer", "", *_counts(info), "", "## Sparsity", ""]
    parts += _ledger(report or {})
    sp = (report or {}).get("sparsity") or {}
    if sp.get("targeted"):
        parts += ["", "Unstructured zeros are stored in dense tensors: they change neither the file size nor "
                      "the memory or speed of stock inference kernels. The memory saving comes from removed "
                      "experts."]
    parts += ["", "## Loading", "", *_loaders(info), ""]
    return "\n".join(parts)
