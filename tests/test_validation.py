"""Every bad input is refused before any model loads: exit code 2, one line naming the key and the value.

Each case goes through the CLI's own check (``config.preflight.preflight``: compose every job, validate
the values, check files, datasets, devices and sizes) in process; ``test_cli.py`` runs a few of them
through the real console script. Nothing may be built or loaded: the toy cache must stay empty and
``load_pretrained`` is never reached. Cases are grouped by category (the count per category is
asserted at the bottom so that the matrix only grows).
"""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from stun_exp.config.preflight import preflight
from stun_exp.run import CONF_DIR
from tests.tiny_models import VOCAB, save_tiny_checkpoint

FILES = "<files>"          # replaced by the module's file fixture folder


def case(category: str, overrides: list[str], *expected: str) -> pytest.param:
    return pytest.param(overrides, expected, id=f"{category}: {' '.join(overrides)}"[:120],
                        marks=pytest.mark.category(category))


CASES = [
    # ---- one sparsity knob at a time --------------------------------------------------------------
    case("knobs", ["sparsity=0.5", "unstructured_pruner.sparsity=0.2"], "sparsity=0.5", "unstructured_pruner.sparsity"),
    case("knobs", ["sparsity=0.5", "unstructured_pruner.nm=2:4"], "sparsity=0.5", "unstructured_pruner.nm"),
    case("knobs", ["unstructured_pruner=none", "sparsity=0.3"], "sparsity=0.3", "unstructured_pruner=none"),
    case("knobs", ["sparsity=null", "unstructured_pruner.sparsity=null"], "unstructured_pruner.sparsity"),
    case("knobs", ["experiment=headline", "unstructured_pruner.sparsity=0.3"], "sparsity=0.4", "unstructured_pruner.sparsity"),
    case("knobs", ["expert_pruner=frequency", "expert_pruner.expert_sparsity=0.75", "sparsity=0.3"],
         "sparsity=0.3", "expert_pruner=frequency"),
    case("knobs", ["expert_pruner=stun", "expert_pruner.expert_sparsity=0.5", "sparsity=0.2"], "sparsity=0.2"),
    # ---- types ------------------------------------------------------------------------------------
    case("types", ["sparsity=abc"], "sparsity", "abc", "a number"),
    case("types", ["seed=1.5"], "seed", "1.5", "an integer"),
    case("types", ["save_checkpoint=maybe"], "save_checkpoint", "maybe"),
    case("types", ["dense_baseline=yesno"], "dense_baseline", "yesno"),
    case("types", ["model.num_experts=abc"], "model.num_experts", "abc"),
    case("types", ["calib.nsamples=2.5"], "calib.nsamples", "2.5"),
    case("types", ["expert_pruner=frequency", "expert_pruner.expert_sparsity=abc"], "expert_sparsity", "abc"),
    case("types", ["unstructured_pruner.prune_router=sometimes"], "prune_router", "sometimes"),
    # ---- non-finite numbers -----------------------------------------------------------------------
    case("nonfinite", ["sparsity=nan"], "sparsity=nan"),
    case("nonfinite", ["sparsity=inf"], "sparsity=inf"),
    case("nonfinite", ["unstructured_pruner.sparsity=nan", "sparsity=null"], "unstructured_pruner.sparsity=nan"),
    case("nonfinite", ["unstructured_pruner=owl", "unstructured_pruner.owl_m=inf"], "unstructured_pruner.owl_m=inf"),
    case("nonfinite", ["unstructured_pruner=owl", "unstructured_pruner.owl_lambda=nan"], "owl_lambda=nan"),
    case("nonfinite", ["expert_pruner=stun", "expert_pruner.distance=mixed", "expert_pruner.mix_weight=nan"], "mix_weight=nan"),
    case("nonfinite", ["expert_pruner=stun", "expert_pruner.threshold=nan"], "threshold=nan"),
    case("nonfinite", ["expert_pruner=stun", "expert_pruner.search_init=inf"], "search_init=inf"),
    case("nonfinite", ["expert_pruner=frequency", "expert_pruner.expert_sparsity=-inf"], "expert_sparsity=-inf"),
    case("nonfinite", ["distill=expert_kd", "distill.lr=inf"], "distill.lr=inf"),
    case("nonfinite", ["distill=expert_kd", "distill.max_grad_norm=nan"], "max_grad_norm=nan"),
    case("nonfinite", ["eval.limit=nan"], "eval.limit=nan"),
    case("nonfinite", ["model.lr=nan"], "model.lr=nan"),
    case("nonfinite", ["unstructured_pruner=sparsegpt", "unstructured_pruner.percdamp=inf"], "percdamp=inf"),
    # ---- ranges -----------------------------------------------------------------------------------
    case("ranges", ["sparsity=1.0"], "sparsity=1.0"),
    case("ranges", ["sparsity=-0.1"], "sparsity=-0.1"),
    case("ranges", ["sparsity=null", "unstructured_pruner.sparsity=1.2"], "unstructured_pruner.sparsity=1.2"),
    case("ranges", ["expert_pruner=frequency", "expert_pruner.expert_sparsity=1.5"], "expert_pruner.expert_sparsity=1.5"),
    case("ranges", ["expert_pruner=frequency", "expert_pruner.expert_sparsity=0.9"], "expert_pruner.expert_sparsity=0.9"),
    case("ranges", ["expert_pruner=stun", "expert_pruner.target_experts=999"], "expert_pruner.target_experts=999"),
    case("ranges", ["expert_pruner=stun", "expert_pruner.target_experts=0"], "expert_pruner.target_experts=0"),
    case("ranges", ["expert_pruner=stun", "expert_pruner.distance=mixed", "expert_pruner.mix_weight=-1"], "mix_weight=-1"),
    case("ranges", ["expert_pruner=stun", "expert_pruner.threshold=-0.5"], "threshold=-0.5"),
    case("ranges", ["expert_pruner=stun", "expert_pruner.search_step=0"], "search_step=0"),
    case("ranges", ["expert_pruner=random", "expert_pruner.seed=-2"], "expert_pruner.seed=-2"),
    case("ranges", ["expert_pruner=lu_combinatorial", "expert_pruner.max_candidates=10"], "max_candidates", "28"),
    case("ranges", ["unstructured_pruner=owl", "unstructured_pruner.owl_lambda=-0.1"], "owl_lambda=-0.1"),
    case("ranges", ["unstructured_pruner=owl", "unstructured_pruner.owl_m=0"], "owl_m=0"),
    case("ranges", ["unstructured_pruner=sparsegpt", "unstructured_pruner.percdamp=0"], "percdamp=0"),
    case("ranges", ["unstructured_pruner=sparsegpt", "unstructured_pruner.blocksize=0"], "blocksize=0"),
    case("ranges", ["distill=expert_kd", "distill.max_grad_norm=-1"], "max_grad_norm=-1"),
    case("ranges", ["distill=expert_kd", "distill.weight_decay=-0.1"], "weight_decay=-0.1"),
    case("ranges", ["distill=expert_kd", "distill.steps=-1"], "distill.steps=-1"),
    case("ranges", ["distill=expert_kd", "distill.lambda_mse=-2"], "lambda_mse=-2"),
    case("ranges", ["calib.seqlen=100000"], "calib.seqlen=100000"),
    case("ranges", ["calib.nsamples=0"], "calib.nsamples=0"),
    case("ranges", ["calib.seed=-1"], "calib.seed=-1"),
    case("ranges", ["seed=-1"], "seed=-1"),
    case("ranges", ["eval.limit=-3"], "eval.limit=-3"),
    case("ranges", ["eval.limit=2.5"], "eval.limit=2.5"),
    case("ranges", ["model.num_experts=1"], "model.top_k"),
    case("ranges", ["model.lr=2"], "model.lr=2"),
    # ---- choices ------------------------------------------------------------------------------------
    case("choices", ["unstructured_pruner.nm=3:4", "sparsity=null"], "unstructured_pruner.nm", "3:4"),
    case("choices", ["expert_pruner=stun", "expert_pruner.distance=cosine"], "expert_pruner.distance", "cosine"),
    case("choices", ["expert_pruner=stun", "expert_pruner.reconstruct_rule=always"], "reconstruct_rule", "always"),
    case("choices", ["expert_pruner=routing_score", "expert_pruner.variant=max"], "expert_pruner.variant", "max"),
    case("choices", ["expert_pruner=frequency", "expert_pruner.scope=model"], "expert_pruner.scope", "model"),
    case("choices", ["unstructured_pruner.scope=everything"], "unstructured_pruner.scope", "everything"),
    case("choices", ["unstructured_pruner.zero_token_experts=drop"], "zero_token_experts", "drop"),
    case("choices", ["device=tpu"], "device", "tpu"),
    case("choices", ["device=cuda:x"], "device", "cuda:x"),
    case("choices", ["logger=wandb", "logger.mode=sometimes"], "logger.mode", "sometimes"),
    case("choices", ["eval=toy", "eval.tasks=[toy_arithh]"], "toy_arithh", "toy_arith"),
    case("choices", ["eval=paper", "eval.tasks=[gsm8kk]"], "gsm8kk", "gsm8k"),
    case("choices", ["eval=ppl", "eval.datasets=[wikitxt2]"], "wikitxt2", "wikitext2"),
    case("choices", ["expert_pruner=stunn"], "expert_pruner", "stunn", "did you mean 'stun'"),
    case("choices", ["unstructured_pruner=wandaa"], "wandaa", "did you mean 'wanda'"),
    case("choices", ["model=mixtrl_8x7b"], "mixtrl_8x7b", "did you mean 'mixtral_8x7b'"),
    case("choices", ["calib=c5"], "calib", "c5"),
    case("choices", ["eval=papr"], "papr", "did you mean 'paper'"),
    # ---- unknown keys (typos, +key traps) ---------------------------------------------------------
    case("keys", ["+sparcity=0.5"], "sparcity", "0.5", "did you mean 'sparsity'"),
    case("keys", ["++sparcity=0.5"], "sparcity", "did you mean 'sparsity'"),
    case("keys", ["sparsty=0.5"], "sparsty", "did you mean 'sparsity'"),
    case("keys", ["+expert_pruner.expert_sparsty=0.5"], "expert_pruner.expert_sparsty", "did you mean 'expert_pruner.expert_sparsity'"),
    case("keys", ["expert_pruner=frequency", "expert_pruner.expert_sparsty=0.2"], "expert_sparsty", "did you mean"),
    case("keys", ["+model.num_expert=16"], "model.num_expert", "did you mean 'model.num_experts'"),
    case("keys", ["unstructured_pruner.owl_m=3"], "unstructured_pruner.owl_m", "3"),
    case("keys", ["+seeed=3"], "seeed", "did you mean 'seed'"),
    case("keys", ["+calib.nsample=8"], "calib.nsample", "did you mean 'calib.nsamples'"),
    # ---- mandatory values -------------------------------------------------------------------------
    case("missing", ["model=hf"], "model.name_or_path"),
    case("missing", ["calib=tokens"], "calib.path"),
    case("missing", ["calib=text"], "calib.path"),
    case("missing", ["expert_pruner=router_change"], "expert_pruner.pretrained_path"),
    # ---- files ------------------------------------------------------------------------------------
    case("files", ["model=hf", "model.name_or_path=/nonexistent/moe"], "model.name_or_path", "/nonexistent/moe"),
    case("files", ["model=hf", "calib.seqlen=32", f"model.name_or_path={FILES}/no_config"], "model.name_or_path", "config.json"),
    case("files", ["model=hf", "calib.seqlen=32", f"model.name_or_path={FILES}/truncated"], "model.name_or_path", "model.safetensors", "truncated"),
    case("files", ["model=hf", "calib.seqlen=32", f"model.name_or_path={FILES}/corrupt"], "model.name_or_path", "model.safetensors"),
    case("files", ["model=hf", "calib.seqlen=32", f"model.name_or_path={FILES}/missing_shard"], "model.name_or_path", "missing"),
    case("files", ["model=hf", "calib.seqlen=32", f"model.name_or_path={FILES}/no_weights"], "model.name_or_path", "no weights"),
    case("files", ["model=hf", "model.name_or_path=no-such-org/no-such-moe"], "no-such-org/no-such-moe"),
    case("files", ["calib=tokens", "calib.path=/nonexistent/ids.pt"], "calib.path", "/nonexistent/ids.pt"),
    case("files", ["calib=tokens", f"calib.path={FILES}/float.pt"], "calib.path", "float.pt", "dtype"),
    case("files", ["calib=tokens", f"calib.path={FILES}/rank1.pt"], "calib.path", "rank1.pt", "2 dimensions"),
    case("files", ["calib=tokens", f"calib.path={FILES}/rank3.pt"], "calib.path", "rank3.pt", "2 dimensions"),
    case("files", ["calib=tokens", f"calib.path={FILES}/ids.pt", "calib.nsamples=64"], "calib.path", "calib.nsamples=64"),
    case("files", ["calib=tokens", f"calib.path={FILES}/ids.pt", "calib.seqlen=256"], "calib.path", "calib.seqlen=256"),
    case("files", ["calib=tokens", f"calib.path={FILES}/negative.pt"], "calib.path", "negative"),
    case("files", ["calib=tokens", f"calib.path={FILES}/big_ids.pt"], "calib.path", "vocab_size"),
    case("files", ["calib=tokens", f"calib.path={FILES}/dict.pt"], "calib.path", "dict"),
    case("files", ["calib=tokens", f"calib.path={FILES}/garbage.pt"], "calib.path", "garbage.pt"),
    case("files", ["calib=text", "calib.path=/nonexistent/corpus.txt"], "calib.path", "/nonexistent/corpus.txt"),
    case("files", ["calib=text", f"calib.path={FILES}/empty.txt"], "calib.path", "empty"),
    case("files", ["calib=text", f"calib.path={FILES}/binary.txt"], "calib.path", "binary"),
    case("files", ["calib=text", f"calib.path={FILES}/bad.jsonl"], "calib.path", "line 3"),
    case("files", ["calib=text", f"calib.path={FILES}/nofield.jsonl"], "calib.path", "line 2", "text_field"),
    case("files", ["calib=text", f"calib.path={FILES}/corpus.csv"], "calib.path", "corpus.csv"),
    case("files", ["expert_pruner=stun", "expert_pruner.distance=coactivation",
                   "expert_pruner.coactivation_path=/nonexistent/co.pt"], "coactivation_path", "/nonexistent/co.pt"),
    case("files", ["expert_pruner=stun", "expert_pruner.distance=coactivation",
                   f"expert_pruner.coactivation_path={FILES}/coact_wrong.pt"], "coactivation_path", "[8, 8]"),
    case("files", ["calib=c4", "calib.seqlen=64"], "calib=c4", "allenai/c4"),
    case("files", ["calib=wikitext2", "calib.seqlen=64"], "calib=wikitext2", "wikitext"),
    case("files", [f"out_root={FILES}/a_file/out"], "out_root"),
    case("files", [f"hydra.run.dir={FILES}/a_file/run"], "hydra.run.dir"),
    case("files", ["-m", "sparsity=0.4,0.5", f"hydra.sweep.dir={FILES}/a_file/sweep"], "hydra.sweep.dir"),
    case("files", ["eval=paper"], "gsm8k"),
    # ---- combinations -----------------------------------------------------------------------------
    case("combos", ["runtime=streaming", "distill=expert_kd"], "distill", "runtime=streaming"),
    case("combos", ["runtime=streaming", "expert_pruner=lu_combinatorial"], "lu_combinatorial", "runtime=streaming"),
    case("combos", ["runtime=streaming", "model=toy_ft", "expert_pruner=router_change"], "router_change", "runtime=streaming"),
    case("combos", ["device=cuda"], "device", "cuda"),
    case("combos", ["device=cuda:1"], "device", "cuda:1"),
    case("combos", ["model=hf", "calib.seqlen=32", f"model.name_or_path={FILES}/llama", "eval=none", "expert_pruner=frequency"], "expert_pruner", "frequency"),
    case("combos", ["model=hf", "calib.seqlen=32", f"model.name_or_path={FILES}/llama", "eval=none",
                    "expert_pruner=none", "unstructured_pruner=moe_pruner"], "unstructured_pruner.scope", "experts"),
    case("combos", ["model=hf", "calib.seqlen=32", f"model.name_or_path={FILES}/mixtral", "eval=toy"], "eval", "toy"),
    case("combos", ["expert_pruner=router_change", f"expert_pruner.pretrained_path={FILES}/mixtral"], "pretrained_path"),
    case("combos", ["unstructured_pruner=sparsegpt", "unstructured_pruner.nm=2:4", "unstructured_pruner.blocksize=6",
                    "sparsity=null"], "blocksize=6"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad input files, made once."""
    d = tmp_path_factory.mktemp("inputs")
    good = save_tiny_checkpoint("mixtral", str(d / "mixtral"))
    save_tiny_checkpoint("llama", str(d / "llama"))
    for name in ("no_config", "truncated", "corrupt", "missing_shard", "no_weights"):
        os.system(f"cp -r {good} {d / name}")
    os.remove(d / "no_config" / "config.json")
    st = d / "truncated" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    bad = d / "corrupt" / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 40) + b"{not json at all, just some garbage bytes}" + b"\0" * 64)
    (d / "missing_shard" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    os.remove(d / "no_weights" / "model.safetensors")
    ids = torch.randint(3, 300, (40, 160), generator=torch.Generator().manual_seed(0))
    torch.save(ids, d / "ids.pt")
    torch.save(ids.float(), d / "float.pt")
    torch.save(ids[0], d / "rank1.pt")
    torch.save(ids[None], d / "rank3.pt")
    torch.save(ids - 500, d / "negative.pt")
    torch.save(ids + 1000, d / "big_ids.pt")
    torch.save({"ids": ids}, d / "dict.pt")
    (d / "garbage.pt").write_bytes(b"this is not a torch file")
    (d / "empty.txt").write_text("  \n\n ")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    (d / "nofield.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    (d / "corpus.csv").write_text("a,b\n1,2\n")
    torch.save({l: torch.zeros(4, 4) for l in range(4)}, d / "coact_wrong.pt")
    (d / "a_file").write_text("x")
    assert VOCAB < 300
    return d


@pytest.fixture(autouse=True)
def _nothing_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("STUN_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))

    def boom(*a, **k):
        raise AssertionError("a model was loaded during validation")
    monkeypatch.setattr("stun_exp.models.loading.load_pretrained", boom)
    yield
    assert not (tmp_path / "cache").exists(), "validation must not build or load a model"


def refused(overrides: list[str], capsys, tmp_path) -> str:
    """Run the CLI's preflight; it must exit 2 with exactly one line on stderr. Returns that line."""
    with pytest.raises(SystemExit) as ei:
        preflight([*overrides, f"out_root={tmp_path / 'out'}"] if not any(o.startswith("out_root=") for o in overrides)
                  else overrides, CONF_DIR)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert ei.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("overrides,expected", CASES)
def test_bad_input_is_one_line_before_anything_loads(overrides, expected, files, capsys, tmp_path):
    overrides = [o.replace(FILES, str(files)) for o in overrides]
    line = refused(overrides, capsys, tmp_path)
    assert line.startswith("stun-exp: error: ")
    for want in expected:
        assert want.replace(FILES, str(files)) in line, line


def test_matrix_size_per_category():
    from collections import Counter
    n = Counter(p.marks[0].args[0] for p in CASES)
    assert sum(n.values()) >= 120 and min(n.values()) >= 4, n


def test_the_default_config_and_good_files_pass(files, tmp_path):
    from stun_exp.config.preflight import check_job
    check_job([f"out_root={tmp_path}"], CONF_DIR)
    check_job(["calib=tokens", f"calib.path={files / 'ids.pt'}", f"out_root={tmp_path}"], CONF_DIR)
    torch.save(torch.randint(0, VOCAB, (8, 32)), tmp_path / "small_ids.pt")
    check_job(["model=hf", f"model.name_or_path={files / 'mixtral'}", "eval=none", "calib=tokens",
               f"calib.path={tmp_path / 'small_ids.pt'}", "calib.nsamples=8", "calib.seqlen=32", f"out_root={tmp_path}"], CONF_DIR)
    check_job(["model=hf", f"model.name_or_path={files / 'llama'}", "eval=none", "expert_pruner=none",
               "calib=tokens", f"calib.path={tmp_path / 'small_ids.pt'}", "calib.nsamples=8", "calib.seqlen=32", f"out_root={tmp_path}"], CONF_DIR)


def test_a_sweep_with_one_bad_job_is_refused_before_any_job(capsys, tmp_path):
    line = refused(["-m", "sparsity=0.4,1.5"], capsys, tmp_path)
    assert "sparsity=1.5" in line


def test_a_sweep_preset_is_checked_too(capsys, tmp_path):
    line = refused(["sweep=sparsity", "unstructured_pruner.sparsity=0.3"], capsys, tmp_path)
    assert "unstructured_pruner.sparsity" in line


def test_router_change_pretrained_of_different_shape(files, capsys, tmp_path):
    line = refused(["expert_pruner=router_change", f"expert_pruner.pretrained_path={files / 'mixtral'}"],
                   capsys, tmp_path)
    assert "pretrained_path" in line and "hidden 32" in line
