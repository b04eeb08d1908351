"""Every conf/expert_pruner/*.yaml composes against its schema, instantiates, and validates."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stun_exp.config.schema import register_all, schemas
from stun_exp.errors import ConfigError
from stun_exp.models.adapter import get_adapter
from tests.tiny_models import tiny_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")
NAMES = ["none", "stun", "frequency", "routing_score", "random", "router_change", "lu_combinatorial", "reap",
         "hc_smoe", "m_smoe"]


@pytest.fixture(scope="module", autouse=True)
def _store():
    register_all()


def node(name: str, *overrides: str):
    """The expert_pruner node of the root config (its defaults may interpolate root keys, e.g. seed)."""
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=[f"expert_pruner={name}", *overrides]).expert_pruner


@pytest.mark.parametrize("name", NAMES)
def test_yaml_composes_instantiates_and_validates(name):
    n = node(name)
    assert n.name == name and Path(CONF, "expert_pruner", f"{name}.yaml").read_text().startswith("#")
    obj = OmegaConf.to_object(n)
    info = get_adapter(tiny_model("mixtral")).model_info()
    obj.validate(None, prefix="expert_pruner")
    obj.validate(info, prefix="expert_pruner")
    if name == "none":
        assert n._target_ is None
    else:
        assert type(instantiate(n, _convert_="all")).__name__.endswith("Pruner")


def test_typos_and_bad_values_fail_fast():
    with pytest.raises(ConfigCompositionException):
        node("stun", "expert_pruner.distanse=router")          # unknown key (schema)
    with pytest.raises(ConfigCompositionException):
        node("stun", "expert_pruner.kappa=abc")                # type check
    bad = OmegaConf.to_object(node("routing_score", "expert_pruner.variant=soft_top_mean"))
    with pytest.raises(ConfigError, match="did you mean 'soft_topk_mean'"):
        bad.validate(None)
    info = get_adapter(tiny_model("mixtral")).model_info()
    lu = OmegaConf.to_object(node("lu_combinatorial", "expert_pruner.max_candidates=10"))
    with pytest.raises(ConfigError, match=r"C\(8,6\) = 28"):
        lu.validate(info)
    st = OmegaConf.to_object(node("stun", "expert_pruner.expert_sparsity=0.25"))
    st.validate(info)
    assert st.target(info) == 12


def test_every_schema_target_is_a_pruner_with_its_needs():
    from hydra.utils import get_class
    for (g, n), cls in schemas().items():
        if g == "expert_pruner" and n != "none":
            pruner = get_class(cls._target_)(name=n)
            assert pruner.name == n and pruner.needs in ("weights", "calibration_stats", "whole_model")
            assert callable(pruner.plan)
