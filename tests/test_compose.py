"""The many-jobs composer returns exactly what Hydra's compose returns, errors included."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stun_exp.config.compose import Composer
from stun_exp.config.schema import register_all
from stun_exp.reproduce.launch import CONF_DIR, expand_jobs
from stun_exp.reproduce.spec import available, load_experiment

# value overrides of every kind Hydra applies after the defaults list, on top of group choices
HANDMADE = [
    [],
    ["seed=3", "sparsity=0.6"],
    ["unstructured_pruner=owl", "unstructured_pruner.sparsity=0.3", "sparsity=null"],
    ["expert_pruner=stun", "expert_pruner.distance=coactivation", "seed=1"],
    ["eval=toy", "eval.tasks=[toy_arith]", "eval.limit=5"],
    ["+extra_key=1"],
    ["++seed=7"],
    ["~seed"],
    ["out_root=${oc.env:HOME}/runs"],
    ["hydra.run.dir=/tmp/x", "seed=2"],
    ["hydra/launcher=local_parallel", "seed=2"],
    ["seed=1", "seed=2"],                      # the last one wins, as in Hydra
    ["unstructured_pruner.nm=2:4", "unstructured_pruner=wanda"],
    # refused: unknown key, wrong type, unknown option, append onto an existing key, a sweep
    ["no_such_key=1"],
    ["seed=abc"],
    ["model=no_such_model", "seed=1"],
    ["+seed=1"],
    ["seed=1,2"],
]


register_all()


def _experiment_jobs(per_experiment: int = 1) -> list[list[str]]:
    """A job of every experiment: the one with the most value overrides."""
    out = []
    for name in available():
        jobs = {tuple(j) for m in load_experiment(name).modes.values() for s in m.sweeps for j in expand_jobs(s)}
        out += [list(j) for j in sorted(jobs, key=lambda j: (-sum("." in o for o in j), j))[:per_experiment]]
    return out


def _outcome(fn, overrides: list[str]):
    try:
        cfg = fn(overrides)
    except Exception as e:  # noqa: BLE001 - the outcome compared is the error itself
        return ("error", type(e).__name__, str(e))
    return ("config", OmegaConf.to_yaml(cfg), OmegaConf.is_struct(cfg))


def test_composer_equals_hydra_compose_on_every_kind_of_override() -> None:
    jobs = HANDMADE + _experiment_jobs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        want = [_outcome(lambda o: compose(config_name="config", overrides=o), j) for j in jobs]
    with Composer(CONF_DIR) as c:
        got = [_outcome(c.compose, j) for j in jobs]
        bases = len(c._bases)
    for job, w, g in zip(jobs, want, got):
        assert g == w, job
    assert {w[0] for w in want} == {"config", "error"}          # both outcomes were exercised
    assert bases < len(jobs) - 5                                # and jobs shared a composed base


def test_a_value_sweep_composes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs differing only in values cost one Hydra composition, not one each."""
    import stun_exp.config.compose as mod
    calls = []
    real = mod.Composer._hydra
    monkeypatch.setattr(mod.Composer, "_hydra", lambda self, o: calls.append(list(o)) or real(self, o))
    with Composer(CONF_DIR) as c:
        cfgs = [c.compose(["unstructured_pruner=wanda", f"unstructured_pruner.sparsity={s}", f"seed={k}"])
                for s in (0.2, 0.4, 0.6) for k in (0, 1)]
    assert calls == [["unstructured_pruner=wanda"]]
    assert [(c.unstructured_pruner.sparsity, c.seed) for c in cfgs] == [
        (s, k) for s in (0.2, 0.4, 0.6) for k in (0, 1)]
