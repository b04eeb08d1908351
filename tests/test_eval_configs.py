"""eval group: YAML + schema composition, validation errors, offline availability check."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from hydra.core.config_store import ConfigStore

from stun_exp.config.schema import schemas
from stun_exp.errors import ConfigError, DataError
from stun_exp.evaluation.availability import check_available, is_cached
from stun_exp.evaluation.configs import PAPER_TASKS, PaperEval, PplEval, ToyEval, build_eval_config

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _register_eval_schemas() -> None:
    """Only this group's schemas (register_all would import every other group's module too)."""
    for (group, name), cls in schemas().items():
        if group == "eval":
            ConfigStore.instance().store(group=group, name=f"schema_{name}", node=cls)


def _eval(name: str, *overrides: str):
    _register_eval_schemas()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(overrides=[f"+eval={name}", *[f"eval.{o}" for o in overrides]]).eval


@pytest.mark.parametrize("name", ["none", "toy", "ppl", "paper"])
def test_yaml_composes_and_validates(name: str) -> None:
    cfg = build_eval_config(_eval(name))
    cfg.validate(None)
    assert cfg.name == name


def test_paper_defaults_recorded() -> None:
    cfg = build_eval_config(_eval("paper", "limit=10", "num_fewshot.mmlu=5"))
    assert isinstance(cfg, PaperEval) and cfg.limit == 10 and cfg.num_fewshot["mmlu"] == 5
    assert cfg.num_fewshot["gsm8k"] == 5 and set(cfg.tasks) == set(PAPER_TASKS)
    assert cfg.seeds() == {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234,
                           "fewshot_random_seed": 1234}


def test_type_errors_caught_by_schema() -> None:
    with pytest.raises(ConfigCompositionException):
        _eval("paper", "batch_size=abc")


@pytest.mark.parametrize("cfg, key, hint", [
    (PaperEval(tasks=["arc_chalenge"]), "eval.tasks", "did you mean 'arc_challenge'"),
    (ToyEval(tasks=["toy_arth"]), "eval.tasks", "did you mean 'toy_arith'"),
    (PaperEval(metrics={"hellaswag": ["acc_nrm"]}), "eval.metrics.hellaswag", "did you mean 'acc_norm'"),
    (PaperEval(num_fewshot={"gsm8k": -1}), "eval.num_fewshot.gsm8k", "integer >= 0"),
    (PaperEval(limit=0), "eval.limit", "fraction"),
    (PaperEval(limit=2.5), "eval.limit", "whole number"),
    (PaperEval(random_seed=-3), "eval.random_seed", "non-negative"),
    (PplEval(datasets=["wikitext"]), "eval.datasets", "did you mean 'wikitext2'"),
    (PplEval(seqlen=1), "eval.seqlen", ">= 2"),
])
def test_validation_errors_name_key_and_fix(cfg, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg.validate(None)
    assert key in str(e.value) and hint in str(e.value)


def test_seqlen_checked_against_model_context() -> None:
    class Info:
        max_position_embeddings = 64
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        PplEval(seqlen=128).validate(Info())
    with pytest.raises(ConfigError, match="eval.ppl_seqlen"):
        ToyEval(ppl_seqlen=65).validate(Info())


def test_offline_missing_datasets_named_in_one_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    roots = (tmp_path / "datasets", tmp_path / "hub")
    (roots[0] / "allenai___ai2_arc" / "ARC-Easy").mkdir(parents=True)      # ARC is cached
    (roots[1] / "datasets--Rowan--hellaswag" / "snapshots").mkdir(parents=True)  # hellaswag too
    with pytest.raises(DataError) as e:
        check_available(PaperEval(), roots=roots)
    msg = str(e.value)
    for task in ("gsm8k", "mmlu", "boolq", "openbookqa", "rte", "winogrande"):
        assert f"{task} needs '{PAPER_TASKS[task].dataset_path}'" in msg
    assert "arc_challenge" not in msg and "hellaswag" not in msg and "eval=toy" in msg
    check_available(PaperEval(tasks=["arc_easy", "hellaswag"]), roots=roots)  # all cached: no error
    check_available(ToyEval(), roots=roots)                                    # local tasks: nothing to check
    with pytest.raises(DataError, match="wikitext2 needs 'Salesforce/wikitext'"):
        check_available(PplEval(datasets=["wikitext2"]), roots=roots)
    (roots[0] / "wikitext" / "x").mkdir(parents=True)   # the legacy alias counts
    assert is_cached("wikitext", roots)
    check_available(PplEval(datasets=["wikitext2"]), roots=roots)


def test_hub_dataset_loader_fails_fast_offline(monkeypatch) -> None:
    """The real wikitext loader raises a clear DataError at once (no retry loop) when not cached."""
    import time
    from stun_exp.evaluation.perplexity import wikitext2_tokens
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(DataError) as e:
        wikitext2_tokens(tokenizer=None)
    assert "wikitext" in str(e.value) and "not available offline" in str(e.value)
    assert time.perf_counter() - t < 10


def test_paper_registry_matches_lm_eval_task_files() -> None:
    """Our dataset ids must be the ones lm-eval's own YAMLs load (read without indexing tasks)."""
    import yaml
    import lm_eval.tasks as T
    root = Path(T.__file__).parent
    files = {"gsm8k": "gsm8k/gsm8k.yaml", "arc_easy": "arc/arc_easy.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
             "mmlu": "mmlu/default/_default_template_yaml", "boolq": "super_glue/boolq/default.yaml",
             "openbookqa": "openbookqa/openbookqa.yaml", "rte": "glue/rte/default.yaml",
             "winogrande": "winogrande/default.yaml"}
    for task, f in files.items():
        text = (root / f).read_text()
        data = yaml.safe_load("\n".join(l for l in text.splitlines() if "!function" not in l))
        assert data["dataset_path"] == PAPER_TASKS[task].dataset_path, task


def test_c4_loader_fails_fast_offline(monkeypatch) -> None:
    from stun_exp.evaluation.perplexity import c4_tokens
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="allenai/c4.*not available offline"):
        c4_tokens(tokenizer=None, seqlen=16)


def test_toy_eval_needs_toy_or_task_dir(tmp_path) -> None:
    from omegaconf import OmegaConf
    with pytest.raises(ConfigError, match="eval=toy only with model=toy"):
        check_available(ToyEval(), model_cfg=OmegaConf.create({"kind": "hf"}))
    check_available(ToyEval(), model_cfg=OmegaConf.create({"kind": "toy"}))
    with pytest.raises(ConfigError, match="heldout.txt"):
        check_available(ToyEval(task_dir=str(tmp_path)))
    (tmp_path / "heldout.txt").write_text("x")
    check_available(ToyEval(task_dir=str(tmp_path)), model_cfg=OmegaConf.create({"kind": "hf"}))
