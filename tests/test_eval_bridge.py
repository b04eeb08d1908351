"""lm-eval bridge + perplexity on a tiny random Mixtral with a locally trained BPE tokenizer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

CORPUS = [f"Question: what is {a} plus {b}? Answer: {a + b}." for a in range(12) for b in range(12)]
CORPUS += ["The cat sat on the mat.", "Paris is the capital of France.", "yes no maybe"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _drop_experts(model, layer: int, keep: list[int]) -> None:
    """Minimal router-slicing surgery so layer expert counts differ (as after expert pruning)."""
    moe = model.model.layers[layer].mlp
    ex, gate = moe.experts, moe.gate
    ex.gate_up_proj = torch.nn.Parameter(ex.gate_up_proj.data[keep].clone())
    ex.down_proj = torch.nn.Parameter(ex.down_proj.data[keep].clone())
    gate.weight = torch.nn.Parameter(gate.weight.data[keep].clone())
    ex.num_experts = gate.num_experts = len(keep)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0,
                        tie_word_embeddings=False, output_router_logits=True,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = MixtralForCausalLM(cfg).eval()
    _drop_experts(model, 0, [0, 2, 3, 5, 6, 7])
    return model, tok, _task_dir(tmp_path_factory.mktemp("tasks"))


def _task_dir(d: Path) -> Path:
    mc = [{"question": f"what is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1)], "label": 0}
          for a, b in [(1, 2), (3, 4), (5, 6), (2, 2), (7, 1), (0, 3)]]
    gen = [{"question": f"what is {a} plus {b}?", "answer": str(a + b)} for a, b in [(1, 1), (2, 3), (4, 4)]]
    for name, rows in (("mc", mc), ("gen", gen)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "toy_compare.yaml").write_text(f"""task: toy_compare
dataset_path: json
dataset_kwargs: {{data_files: {{train: {d / 'mc.jsonl'}, test: {d / 'mc.jsonl'}}}}}
training_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}},
  {{metric: acc_norm, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
""")
    (d / "toy_arith.yaml").write_text(f"""task: toy_arith
dataset_path: json
dataset_kwargs: {{data_files: {{test: {d / 'gen.jsonl'}}}}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}} Answer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n", "."], max_gen_toks: 4, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}]
metadata: {{version: 1.0}}
""")
    (d / "heldout.txt").write_text(" ".join(CORPUS))
    return d


def _naive_mc_acc(model, tok, d: Path) -> float:
    """Independent acc: argmax of summed continuation log-probs, 0-shot."""
    hits, rows = 0, [json.loads(x) for x in (d / "mc.jsonl").read_text().splitlines()]
    for r in rows:
        ctx = tok(f"Question: {r['question']}\nAnswer:")["input_ids"]
        scores = []
        for c in r["choices"]:
            cont = tok(" " + c)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids, output_router_logits=False).logits[0].float(), -1)
            scores.append(sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
    return hits / len(rows)


def test_run_lm_eval_on_pruned_in_memory_model(tiny) -> None:
    from stun_exp.evaluation.lm_eval_bridge import run_lm_eval
    model, tok, d = tiny
    seeds = {"random_seed": 1, "numpy_random_seed": 2, "torch_random_seed": 3, "fewshot_random_seed": 4}
    out = run_lm_eval(model, tok, ["toy_compare", "toy_arith"], num_fewshot={"toy_compare": 0, "toy_arith": 1},
                      metrics={"toy_compare": ["acc", "acc_norm"]}, include_path=str(d), include_defaults=False,
                      batch_size=4, seeds=seeds)
    st = out.pop("settings")
    assert set(out) == {"toy_compare/acc", "toy_compare/acc_norm", "toy_arith/exact_match"}
    assert out["toy_compare/acc"] == pytest.approx(_naive_mc_acc(model, tok, d))
    assert 0.0 <= out["toy_arith/exact_match"] <= 1.0
    assert st["seeds"] == seeds and st["num_fewshot"] == {"toy_compare": 0, "toy_arith": 1}
    assert st["bootstrap_iters"] == 0 and st["batch_size"] == 4
    assert model.config.output_router_logits is True  # restored after evaluation


def test_evaluate_toy_suite_with_ppl(tiny) -> None:
    from stun_exp.evaluation import evaluate
    from stun_exp.evaluation.configs import ToyEval
    from stun_exp.evaluation.perplexity import text_file_tokens
    model, tok, d = tiny
    cfg = ToyEval(tasks=["toy_compare"], task_dir=str(d), limit=3, ppl_seqlen=16, ppl_batch_size=2)
    cfg.validate()
    out = evaluate(model, tok, cfg)
    assert set(out) == {"toy_compare/acc", "toy_compare/acc_norm", "heldout/ppl", "heldout/ppl_tokens",
                        "eval_settings"}
    st = out["eval_settings"]
    assert st["lm_eval"]["limit"] == 3 and st["ppl"]["seqlen"] == 16
    # perplexity against a naive loop over windows using the model's own mean loss
    ids = text_file_tokens(d / "heldout.txt", tok)
    n = ids.numel() // 16
    with torch.no_grad():
        losses = [float(model(ids[i * 16:(i + 1) * 16][None], labels=ids[i * 16:(i + 1) * 16][None],
                              output_router_logits=False).loss) for i in range(n)]
    assert out["heldout/ppl"] == pytest.approx(math.exp(sum(losses) / n), rel=1e-5)
    assert out["heldout/ppl_tokens"] == n * 15
    # called directly too: router-logit outputs (on in this config) are switched off while scoring
    from stun_exp.evaluation.perplexity import perplexity
    assert perplexity(model, ids, 16, 3)["ppl"] == pytest.approx(out["heldout/ppl"], rel=1e-6)
    assert model.config.output_router_logits is True


def test_unknown_local_task_named_before_running(tiny) -> None:
    from stun_exp.errors import ConfigError
    from stun_exp.evaluation.lm_eval_bridge import run_lm_eval
    model, tok, d = tiny
    with pytest.raises(ConfigError, match="did you mean 'toy_arith'"):
        run_lm_eval(model, tok, ["toy_arth"], include_path=str(d), include_defaults=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bridge_and_perplexity_on_cuda_match_cpu(tiny) -> None:
    """The in-memory wrapper follows the model's device: CUDA scores equal the CPU ones."""
    import copy
    from stun_exp.analysis.kurtosis import kurtosis
    from stun_exp.evaluation.lm_eval_bridge import run_lm_eval
    from stun_exp.evaluation.perplexity import perplexity, text_file_tokens
    model, tok, d = tiny
    gpu = copy.deepcopy(model).to("cuda")
    kw = dict(num_fewshot={}, include_path=str(d), include_defaults=False, batch_size=4)
    cpu_res = run_lm_eval(model, tok, ["toy_compare", "toy_arith"], **kw)
    gpu_res = run_lm_eval(gpu, tok, ["toy_compare", "toy_arith"], **kw)
    for k in ("toy_compare/acc", "toy_compare/acc_norm", "toy_arith/exact_match"):
        assert gpu_res[k] == pytest.approx(cpu_res[k]), k
    ids = text_file_tokens(d / "heldout.txt", tok)
    assert perplexity(gpu, ids, 16, 4)["ppl"] == pytest.approx(perplexity(model, ids, 16, 4)["ppl"], rel=1e-4)
    w = model.model.layers[0].mlp.experts.down_proj
    assert kurtosis(w.detach().cuda()) == pytest.approx(kurtosis(w.detach()), rel=1e-9)
