"""The toy MoE: corpus determinism and held-out split, tokenizer round trip, config validation,
cached atomic builds (toy_tiny, 20 steps), lm-eval task loading, the shipped default toy (its
record, its key = the default config's, installing it without training), the family builder.
The full-size build is slow."""
from __future__ import annotations

import json
import re

import pytest

from stun_exp.errors import ConfigError
from stun_exp.toy import corpus
from stun_exp.toy.config import ToyModelCfg, as_toy_cfg, resolve_cache_dir

TINY = dict(num_experts=4, top_k=2, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=32,
            seq_len=64, train_steps=20, batch_size=8, finetune_steps=5, eval_after_build=False)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toycache"))


@pytest.fixture(scope="module")
def tiny_dir(tiny_cache):
    from stun_exp.toy.build import ensure_toy
    return ensure_toy({**TINY, "cache_dir": tiny_cache})


def test_corpus_same_seed_same_text_other_seed_other_text():
    a, b, c = (corpus.generate_docs(300, s) for s in (0, 0, 1))
    assert a == b
    assert a != c
    assert corpus.arith_eval_items(20, 3) == corpus.arith_eval_items(20, 3)
    assert corpus.World.from_seed(0) == corpus.World.from_seed(0)
    assert corpus.World.from_seed(0).facts != corpus.World.from_seed(1).facts


def test_corpus_covers_every_domain_and_gsm8k_format():
    docs = list(zip(*[next(it) for it in [corpus.iter_docs(0)] for _ in range(2000)]))
    assert set(docs[0]) == set(corpus.DOMAINS)
    arith = [t for d, t in zip(*docs) if d == "arithmetic"]
    for t in arith[:200]:  # the answer after #### is the value of the written-out computation
        last_eq = re.findall(r"=(\d+)\.", t)[-1]
        assert t.endswith(f"#### {last_eq}")
    assert 0.4 < len(arith) / 2000 < 0.6


def test_eval_items_never_in_training_text():
    train = "\n".join(corpus.generate_docs(20000, 0))
    for it in corpus.arith_eval_items(50, 0) + corpus.compare_eval_items(50, 0):
        assert it["question"] not in train
    heldout_q = [d.split("\n")[0] for d in corpus.generate_docs(300, 0, split="heldout") if d.startswith("Question")]
    assert sum(q in train for q in heldout_q if "capital" not in q and "speak" not in q
               and "animal" not in q and "currency" not in q) == 0


def test_fact_items_have_one_true_answer():
    world = corpus.World.from_seed(0)
    items = corpus.fact_eval_items(0)
    assert len(items) == corpus.N_COUNTRIES * len(corpus.RELATIONS)
    for it in items:
        assert len(set(it["options"])) == 4
        right = it["options"][it["label"]]
        c = re.search(r"of (\w+)\?|in (\w+) speak", it["question"])
        country = c.group(1) or c.group(2)
        assert right in world.facts[country].values()
    assert 0.2 < sum(not it["seen_as_qa"] for it in items) / len(items) < 0.3


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    from stun_exp.toy.tokenizer import train_tokenizer
    docs = corpus.generate_docs(3000, 0)
    tok = train_tokenizer(docs, 384)
    assert len(tok) == 384
    for d in docs[:50]:
        assert tok.decode(tok(d, add_special_tokens=False)["input_ids"]) == d
    ids = tok("Answer: 123+45=168.", add_special_tokens=False)["input_ids"]
    digits = [t for t in tok.convert_ids_to_tokens(ids) if any(ch.isdigit() for ch in t)]
    assert all(len(t) == 1 for t in digits)  # single-digit pre-tokenisation
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back(docs[0])["input_ids"] == tok(docs[0])["input_ids"]
    assert (back.eos_token, back.bos_token, back.pad_token) == ("<|eos|>", "<|bos|>", "<|pad|>")


@pytest.mark.parametrize("bad,key", [({"top_k": 9}, "model.top_k"), ({"num_layers": 0}, "model.num_layers"),
                                     ({"finetune_domain": "arithmetc"}, "model.finetune_domain"),
                                     ({"hidden_size": 130}, "model.hidden_size"), ({"lr": 0.0}, "model.lr")])
def test_config_validation_names_the_key(bad, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        ToyModelCfg(**bad).validate()


def test_cache_dir_interpolation_resolves(monkeypatch, tmp_path):
    monkeypatch.setenv("STUN_EXP_CACHE", str(tmp_path))
    assert resolve_cache_dir(ToyModelCfg().cache_dir) == tmp_path.resolve()
    monkeypatch.delenv("STUN_EXP_CACHE")
    assert resolve_cache_dir(ToyModelCfg().cache_dir) == (
        __import__("pathlib").Path.home() / ".cache" / "stun_exp").resolve()


def test_tiny_builds_and_is_cached(tiny_dir, tiny_cache):
    from transformers import MixtralForCausalLM

    from stun_exp.toy import build
    meta = build.read_meta(tiny_dir)
    assert meta["training"]["steps"] == 20
    assert (tiny_dir / "tasks" / "heldout.txt").is_file()
    model = MixtralForCausalLM.from_pretrained(tiny_dir)
    assert model.config.num_local_experts == 4 and model.config.num_hidden_layers == 2
    mtime, count = (tiny_dir / build.META).stat().st_mtime_ns, dict(build.BUILD_COUNT)
    again = build.ensure_toy({**TINY, "cache_dir": tiny_cache})
    assert again == tiny_dir
    assert (tiny_dir / build.META).stat().st_mtime_ns == mtime and build.BUILD_COUNT == count
    assert not [p for p in tiny_dir.parent.iterdir() if ".tmp-" in p.name]  # no half-built leftovers


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from stun_exp.toy.build import ensure_toy
    other = ensure_toy({**TINY, "cache_dir": str(tmp_path)})
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_build_leaves_no_cache(tmp_path, monkeypatch):
    from stun_exp.toy import build

    def boom(cfg, key, out):
        (out / "config.json").write_text("{}")  # partial output, then a crash
        raise KeyboardInterrupt
    monkeypatch.setattr(build, "_build_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        build.ensure_toy({**TINY, "cache_dir": str(tmp_path)})
    assert [p.name for p in (tmp_path / "toy").iterdir() if not p.name.endswith(".lock")] == []


def test_finetuned_pair(tiny_dir, tiny_cache):
    import torch
    from transformers import MixtralForCausalLM

    from stun_exp.toy.build import ensure_toy, ensure_toy_pair, read_meta
    cfg = {**TINY, "cache_dir": tiny_cache, "finetune_domain": "arithmetic"}
    ft, pre = ensure_toy_pair(cfg)
    assert pre == tiny_dir and ft != pre and ensure_toy(cfg) == ft
    assert read_meta(ft)["pretrained_path"] == str(pre)
    a, b = (MixtralForCausalLM.from_pretrained(p).model.layers[0].mlp.gate.weight for p in (ft, pre))
    assert not torch.equal(a, b)  # the routers moved: router-change pruning has a signal


def test_task_files_load_in_lm_eval(tiny_dir):
    from lm_eval.tasks import TaskManager

    from stun_exp.toy.tasks import TASKS, task_dir
    d = task_dir(tiny_dir)
    tm = TaskManager(include_path=str(d), include_defaults=False)
    assert set(TASKS) <= set(tm.all_tasks)
    tasks = tm.load_task_or_group(list(TASKS))
    facts = tasks["toy_facts"]
    doc = next(iter(facts.test_docs()))
    assert facts.doc_to_text(doc).startswith("Question: ") and len(facts.doc_to_choice(doc)) == 4
    arith = tasks["toy_arith"]
    docs = list(arith.test_docs())
    assert len(docs) == 200 and "####" in arith.doc_to_target(docs[0])
    for name in TASKS:
        assert len(json.loads((d / f"{name}.jsonl").read_text().splitlines()[0])) >= 2


def test_quick_eval_runs_on_tiny(tiny_dir):
    from transformers import AutoTokenizer, MixtralForCausalLM

    from stun_exp.toy.tasks import evaluate_toy_quick, task_dir
    model = MixtralForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    res = evaluate_toy_quick(model, tok, task_dir(tiny_dir), limit=8)
    assert set(res) == {"toy_arith_em", "toy_facts_acc", "toy_compare_acc", "heldout_ppl"}
    assert 0 <= res["toy_facts_acc"] <= 1 and res["heldout_ppl"] > 1


def test_shipped_toy_reaches_targets():
    """The shipped toy's recorded dense scores (full item sets, quick in-process check): arithmetic
    >= 50% exact match, each 4-way multiple-choice task >= chance + 30 points."""
    from stun_exp.toy.shipped import shipped_meta
    scores = shipped_meta()["dense_scores_quick"]
    assert scores["toy_arith_em"] >= 0.5
    assert scores["toy_facts_acc"] >= 0.55 and scores["toy_compare_acc"] >= 0.55


def test_concurrent_builds_train_once(tmp_path):
    import threading

    from stun_exp.toy import build
    before, out = build.BUILD_COUNT["pretrain"], []
    cfg = {**TINY, "train_steps": 3, "cache_dir": str(tmp_path)}
    threads = [threading.Thread(target=lambda: out.append(build.ensure_toy(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and out[0] == out[1]
    assert build.BUILD_COUNT["pretrain"] == before + 1  # the second waited on the lock, then loaded


# ---- the shipped default toy ------------------------------------------------------------------
def _composed_model_cfg(*overrides: str) -> ToyModelCfg:
    from hydra import compose, initialize_config_dir

    from stun_exp.run import CONF_DIR
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return as_toy_cfg(cfg.model)


def test_shipped_toy_matches_its_record():
    """Weights = recorded SHA-256, record = this recipe and config, checkpoint = that config."""
    from stun_exp.toy import shipped
    from stun_exp.toy.build import RECIPE_VERSION, config_key
    meta = shipped.shipped_meta()
    assert meta is not None, "no shipped toy: run `python -m stun_exp.toy rebuild`"
    weights = shipped.SHIPPED_DIR / shipped.WEIGHTS
    assert shipped.sha256(weights) == meta["weights_sha256"]
    assert weights.stat().st_size == meta["weights_bytes"] <= shipped.MAX_BYTES
    assert meta["recipe_version"] == RECIPE_VERSION
    cfg = ToyModelCfg(**meta["config"])
    assert config_key(cfg) == meta["key"]
    hf = json.loads((shipped.SHIPPED_DIR / "config.json").read_text())
    assert (hf["num_local_experts"], hf["intermediate_size"], hf["hidden_size"], hf["num_hidden_layers"],
            hf["vocab_size"], hf["num_experts_per_tok"]) == (cfg.num_experts, cfg.intermediate_size,
                                                             cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.top_k)
    tr = meta["training"]
    assert tr["steps"] == cfg.train_steps and {"host_cpu", "threads", "torch", "experts_implementation"} <= set(tr)


def test_default_config_is_the_shipped_toy():
    """conf/model/toy.yaml, the schema defaults and the shipped weights agree: a change of recipe
    or default config without `python -m stun_exp.toy rebuild` fails here."""
    from stun_exp.toy.build import config_key
    from stun_exp.toy.shipped import shipped_key
    assert config_key(_composed_model_cfg()) == config_key(ToyModelCfg()) == shipped_key()
    from dataclasses import replace
    composed = _composed_model_cfg()
    assert composed == replace(ToyModelCfg(), cache_dir=composed.cache_dir)   # every field, not just the key


def test_default_toy_installs_from_the_package_without_training(tmp_path):
    import torch
    from safetensors.torch import load_file

    from stun_exp.toy import build, shipped
    before = dict(build.BUILD_COUNT)
    listing = sorted((p.name, p.stat().st_mtime_ns) for p in shipped.SHIPPED_DIR.iterdir())
    d = build.ensure_toy({"cache_dir": str(tmp_path)})
    assert build.BUILD_COUNT["pretrain"] == before["pretrain"]
    assert build.BUILD_COUNT["installed"] == before["installed"] + 1
    assert d.parent == tmp_path / "toy" and (d / "tasks" / "toy_arith.yaml").is_file()
    a, b = load_file(d / "model.safetensors"), load_file(shipped.SHIPPED_DIR / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert build.read_meta(d)["source"].startswith("shipped")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in shipped.SHIPPED_DIR.iterdir()) == listing


def test_other_seed_is_not_the_shipped_toy():
    from stun_exp.toy.build import config_key
    from stun_exp.toy.shipped import shipped_key
    assert config_key(ToyModelCfg(seed=1)) != shipped_key()
    assert config_key(ToyModelCfg(threads=None, eval_after_build=False)) == shipped_key()  # not weight fields


def test_publish_then_install_round_trip(tiny_dir, tmp_path, monkeypatch):
    """The mechanism on the tiny toy: publish it as 'shipped', then a fresh cache installs it."""
    import torch
    from safetensors.torch import load_file

    from stun_exp.toy import build, shipped
    pkg = tmp_path / "pkg"
    meta = shipped.publish(tiny_dir, pkg)
    assert meta["weights_sha256"] == shipped.sha256(pkg / "model.safetensors")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", pkg)
    before = dict(build.BUILD_COUNT)
    d = build.ensure_toy({**TINY, "cache_dir": str(tmp_path / "cache")})
    assert build.BUILD_COUNT["pretrain"] == before["pretrain"] and build.BUILD_COUNT["installed"] == before["installed"] + 1
    a, b = load_file(d / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (d / "tasks" / "toy_facts.jsonl").read_text() == (tiny_dir / "tasks" / "toy_facts.jsonl").read_text()
    (pkg / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(RuntimeError, match="corrupt"):
        build.ensure_toy({**TINY, "cache_dir": str(tmp_path / "cache2")})


def test_training_announces_the_expected_time(tmp_path, capfd):
    from stun_exp.toy.build import ensure_toy
    ensure_toy({**TINY, "train_steps": 3, "cache_dir": str(tmp_path)})
    err = capfd.readouterr().err
    assert re.search(r"training the toy \w+ \(3 steps\): expected ~[\d.]+ min .* s/step measured", err)


def test_threads_field_is_applied_and_validated(tiny_cache):
    import torch

    from stun_exp.toy.build import ensure_toy
    before = torch.get_num_threads()
    try:
        ensure_toy({**TINY, "cache_dir": tiny_cache, "threads": 1})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="model.threads"):
        ToyModelCfg(threads=0).validate()


# ---- toy families (claim 5) ------------------------------------------------------------------
def test_family_has_equal_total_expert_size_and_the_sweeps_keys():
    from stun_exp.toy.build import config_key
    from stun_exp.toy.cli import family_cfgs
    fam = family_cfgs([8, 16, 32, 64], [0, 1, 2], 2048)
    assert len(fam) == 12 and {c.num_experts * c.intermediate_size for c in fam} == {2048}
    assert [c.seed for c in fam[:4]] == [0] * 4 and [c.num_experts for c in fam[:4]] == [8, 16, 32, 64]
    assert all(c.top_k == 2 and c.train_steps == ToyModelCfg().train_steps for c in fam)
    swept = _composed_model_cfg("model.num_experts=16", "model.intermediate_size=128", "model.seed=1")
    assert config_key(fam[5]) == config_key(swept)       # what the study's runs will load
    assert config_key(fam[0]) == config_key(ToyModelCfg())


def test_build_family_builds_in_parallel_then_resumes(tmp_path):
    from stun_exp.toy.build import is_cached
    from stun_exp.toy.cli import default_cfg, family_cfgs, main
    ov = [f"{k}={v}" for k, v in {**TINY, "train_steps": 3, "cache_dir": str(tmp_path)}.items()]
    argv = ["build-family", "--experts", "2,4", "--seeds", "0", "--total", "64", "--jobs", "2", "--nice", "0", *ov]
    assert main(argv) == 0
    fam = family_cfgs([2, 4], [0], 64, default_cfg(**{**TINY, "train_steps": 3, "cache_dir": str(tmp_path)}))
    assert all(is_cached(c) for c in fam)
    logs = sorted(p.name for p in (tmp_path / "toy" / "family-logs").iterdir())
    assert logs == ["toy-2x32-seed0.log", "toy-4x16-seed0.log"]
    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "toy" / "family-logs").iterdir()]
    assert main(argv) == 0                                # everything built: nothing runs again
    assert [p.stat().st_mtime_ns for p in (tmp_path / "toy" / "family-logs").iterdir()] == mtimes


def test_toy_cli_refuses_a_bad_override_in_one_line(capsys) -> None:
    from stun_exp.toy.build import BUILD_COUNT
    from stun_exp.toy.cli import main
    before = dict(BUILD_COUNT)
    assert main(["build", "num_expert=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_expert" in err[0] and "num_experts" in err[0]
    assert BUILD_COUNT == before
