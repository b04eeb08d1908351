"""Property test: random config values either validate or fail with the one-line config error.

No other exception type may escape validation (no TypeError from a None, no traceback).
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hydra import compose, initialize_config_dir

from stun_exp.config.validate import validate
from stun_exp.errors import ConfigError
from stun_exp.run import CONF_DIR, one_line

numbers = st.one_of(st.floats(-2, 3, allow_nan=False), st.integers(-5, 100_000), st.just("null"))
words = st.sampled_from(["layer", "global", "experts", "all_decoder_linear", "router", "mixed", "x", "null",
                         "2:4", "4:8", "1:3", "leave_dense", "magnitude", "abc"])
KEYS = {
    "sparsity": numbers, "seed": numbers, "calib.nsamples": numbers, "calib.seqlen": numbers,
    "expert_pruner.expert_sparsity": numbers, "expert_pruner.max_merges_per_layer": numbers,
    "expert_pruner.distance": words, "expert_pruner.target_experts": numbers,
    "unstructured_pruner.sparsity": numbers, "unstructured_pruner.nm": words,
    "unstructured_pruner.scope": words, "unstructured_pruner.zero_token_experts": words,
    "device": words,
}
GROUPS = st.fixed_dictionaries({"expert_pruner": st.sampled_from(["none", "stun", "frequency", "random",
                                                                  "routing_score"]),
                                "unstructured_pruner": st.sampled_from(["none", "magnitude", "wanda", "owl",
                                                                        "sparsegpt", "moe_pruner"])})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=GROUPS, values=st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), max_size=4),
       data=st.data())
def test_only_failure_mode_is_the_validation_error(groups, values, data, tmp_path, monkeypatch):
    monkeypatch.setenv("STUN_EXP_CACHE", str(tmp_path / "cache"))
    overrides = [f"{g}={v}" for g, v in groups.items()]
    for k in values:
        if k.split(".")[0] in ("expert_pruner", "unstructured_pruner") and groups[k.split(".")[0]] == "none":
            continue
        overrides.append(f"{k}={data.draw(KEYS[k])}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as e:  # noqa: BLE001 — composition errors must reduce to one line too
        assert "\n" not in one_line(e, overrides)
        return
    try:
        validate(cfg)
    except ConfigError as e:
        assert "\n" not in str(e) and "=" in str(e)
    assert not (tmp_path / "cache").exists()
