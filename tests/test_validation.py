"""Every bad input fails before any model loads, with one clear line naming key, value, allowed.

Each case composes the real Hydra config with the user's overrides and runs the same checks as the
CLI (``preflight`` for composition errors, ``validate`` for values). Building the toy is never
needed: ModelInfo comes from the toy config alone (asserted by the empty cache).
"""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from stun_exp.config.validate import validate
from stun_exp.errors import ConfigError
from stun_exp.run import CONF_DIR, one_line

# (overrides, substring the one-line error must contain)
BAD_VALUES = [
    (["sparsity=1.0"], "sparsity=1.0"),
    (["sparsity=-0.1"], "sparsity=-0.1"),
    (["sparsity=null", "unstructured_pruner.sparsity=1.2"], "unstructured_pruner.sparsity=1.2"),
    (["sparsity=null", "unstructured_pruner.nm=3:4"], "unstructured_pruner.nm"),
    (["unstructured_pruner.nm=2:4"], "sparsity"),
    (["expert_pruner=frequency", "expert_pruner.expert_sparsity=1.5"], "expert_pruner.expert_sparsity=1.5"),
    (["expert_pruner=frequency", "expert_pruner.expert_sparsity=0.9"], "expert_pruner.expert_sparsity"),
    (["expert_pruner=stun", "expert_pruner.target_experts=999"], "expert_pruner.target_experts=999"),
    (["expert_pruner=stun", "expert_pruner.distance=cosine"], "expert_pruner.distance"),
    (["expert_pruner=stun", "expert_pruner.reconstruct_rule=always"], "expert_pruner.reconstruct_rule"),
    (["expert_pruner=router_change"], "pretrained_path"),
    (["expert_pruner=lu_combinatorial", "expert_pruner.max_candidates=10"], "28"),
    (["expert_pruner=routing_score", "expert_pruner.variant=max"], "expert_pruner.variant"),
    (["expert_pruner=frequency", "expert_pruner.scope=model"], "expert_pruner.scope"),
    (["unstructured_pruner=owl", "unstructured_pruner.owl_m=null"], "unstructured_pruner.owl_m"),
    (["unstructured_pruner=owl", "unstructured_pruner.owl_lambda=null"], "unstructured_pruner.owl_lambda"),
    (["unstructured_pruner.scope=everything"], "unstructured_pruner.scope"),
    (["unstructured_pruner.zero_token_experts=drop"], "unstructured_pruner.zero_token_experts"),
    (["calib.seqlen=100000"], "calib.seqlen"),
    (["calib.nsamples=0"], "calib.nsamples"),
    (["calib=text", "calib.path=/nonexistent/corpus.txt"], "calib.path"),
    (["calib=tokens", "calib.path=/nonexistent/ids.pt"], "calib.path"),
    (["device=tpu"], "device"),
    (["seed=-1"], "seed"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    (["model.num_experts=1"], "model."),
    (["model=hf", "model.name_or_path=no-such-org/no-such-moe"], "no-such-org/no-such-moe"),
    (["distill=expert_kd", "distill.steps=-1"], "distill.steps"),
    (["eval=toy", "eval.tasks=[toy_arithh]"], "toy_arith"),
    (["eval=paper", "eval.tasks=[gsm8kk]"], "gsm8k"),
    (["eval=ppl", "eval.datasets=[wikitxt2]"], "wikitext2"),
    (["expert_pruner=stun", "expert_pruner.expert_sparsity=0.25", "expert_pruner.target_experts=20"],
     "expert_pruner"),
]

# Composition errors: unknown group options (with closest match), unknown keys, wrong types.
BAD_COMPOSE = [
    (["expert_pruner=stunn"], "did you mean 'stun'"),
    (["unstructured_pruner=wandaa"], "did you mean 'wanda'"),
    (["model=mixtrl_8x7b"], "did you mean 'mixtral_8x7b'"),
    (["calib=c5"], "calib='c5'"),
    (["eval=papr"], "did you mean 'paper'"),
    (["expert_pruner=frequency", "expert_pruner.expert_sparsty=0.2"], "expert_sparsty"),
    (["expert_pruner=frequency", "expert_pruner.expert_sparsity=abc"], "abc"),
]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STUN_EXP_CACHE", str(tmp_path / "cache"))
    yield
    assert not (tmp_path / "cache").exists(), "validation must not build or load a model"


@pytest.mark.parametrize("overrides,expected", BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_values_are_one_line_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as ei:
        validate(_compose(overrides))
    msg = str(ei.value)
    assert expected in msg and "\n" not in msg


@pytest.mark.parametrize("overrides,expected", BAD_COMPOSE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_composition_errors_become_one_line(overrides, expected):
    with pytest.raises(Exception) as ei:
        _compose(overrides)
    line = one_line(ei.value, overrides)
    assert expected in line and "\n" not in line


def test_router_change_pretrained_of_different_shape(tmp_path):
    from tests.tiny_models import tiny_model
    m = tiny_model("mixtral")                   # 8 experts, hidden 32: not the toy's shape
    m.save_pretrained(tmp_path / "pre")
    with pytest.raises(ConfigError, match="pretrained"):
        validate(_compose(["expert_pruner=router_change", f"expert_pruner.pretrained_path={tmp_path / 'pre'}"]))


def test_the_default_config_is_valid():
    info = validate(_compose([]))
    assert info.top_k == 2 and len(info.moe_layers) >= 2
