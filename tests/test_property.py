"""Property tests over random overrides (numbers, NaN/inf, strings, `+` keys).

Through the CLI's own preflight: either the command is refused with exit code 2 and one line, or it
is accepted — and then the config the run would use holds exactly the values asked for (or, for the
two sparsity knobs, says which one applies).
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stun_exp.config.preflight import preflight
from stun_exp.run import CONF_DIR

numbers = st.one_of(st.floats(-2, 3, allow_nan=False), st.integers(-5, 100_000), st.just("null"),
                    st.sampled_from(["nan", "inf", "-inf", "abc", "1e400", "0x10", "true"]))
words = st.sampled_from(["layer", "global", "experts", "all_decoder_linear", "router", "mixed", "x", "null",
                         "2:4", "4:8", "1:3", "leave_dense", "magnitude", "abc", "nan", "cuda:1", "auto"])
added = st.sampled_from(["+sparcity=0.5", "+expert_pruner.expert_sparsty=0.2", "+model.num_expert=4", "++seeed=1",
                         "+calib.nsample=3", "+unstructured_pruner.sparsty=0.1"])
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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=GROUPS, values=st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), max_size=4),
       extra=st.lists(added, max_size=1), data=st.data())
def test_refused_with_one_line_or_applied_as_asked(groups, values, extra, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUN_EXP_CACHE", str(tmp_path / "cache"))
    overrides = [f"{g}={v}" for g, v in groups.items()] + ["model=toy_tiny", f"out_root={tmp_path / 'out'}"]
    asked = {}
    for k in values:
        if k.split(".")[0] in ("expert_pruner", "unstructured_pruner") and groups[k.split(".")[0]] == "none":
            continue
        asked[k] = data.draw(KEYS[k])
        overrides.append(f"{k}={asked[k]}")
    overrides += extra
    try:
        preflight(overrides, CONF_DIR)
    except SystemExit as e:
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
        return
    assert not extra, f"an unknown added key was accepted: {extra}"
    cfg = _applied(overrides)
    for k, v in asked.items():
        got = OmegaConf.select(cfg, k)
        if k in ("sparsity", "unstructured_pruner.sparsity") and got is None:
            continue                     # the knob that stepped aside (results.json says which applied)
        assert _same(got, v), (k, v, got)
    assert not (tmp_path / "cache").exists()


def _applied(overrides: list[str]):
    """The config a run of these overrides uses (sparsity knobs normalised as the runner does)."""
    from stun_exp.config.sparsity import normalise, resolve
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return normalise(cfg, resolve(cfg))


def _same(got, asked: str) -> bool:
    if asked == "null":
        return got is None
    if isinstance(got, bool) or isinstance(got, str):
        return str(got).lower() == asked.lower() or got == asked
    return float(got) == float(asked)
