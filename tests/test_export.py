"""Pruned checkpoints load where stun-exp is not installed, with the logits of the in-memory model.

One module fixture prunes every tiny architecture three ways (STUN ``scope=layer`` and frequency: the
same count in every layer; STUN ``scope=global`` with planted near-duplicate experts: different
counts, merged experts averaged), saves each checkpoint, and ONE scrubbed interpreter (``stun_exp``
and ``tests`` not importable, cwd outside the repository) loads them all with ``AutoModelForCausalLM``:
uniform ones plainly (Arctic with ``trust_remote_code``, as the original), the others with
``trust_remote_code=True``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stun_exp.models.adapter import get_adapter
from stun_exp.models.export import REMOTE_MODULE, REPORT_NAME
from stun_exp.models.loading import load_pretrained, save_pretrained
from stun_exp.models.surgery import apply_plan
from stun_exp.pruning.expert.baselines import FrequencyPruner
from stun_exp.pruning.expert.stun import StunPruner
from tests.arctic_like import register_auto
from tests.test_expert_baselines import ctx_for
from tests.tiny_models import ARCHS, _sharpen_routers, tiny_input, tiny_model

register_auto()
KINDS = ("uniform_stun", "uniform_frequency", "per_layer_stun")

# Runs in a fresh interpreter: argv = jobs.json, results.json.
LOADER = r'''
import json, os, sys
def _owner(f):
    return f.__module__ if isinstance(f, type) else type(f).__module__
sys.meta_path[:] = [f for f in sys.meta_path if not _owner(f).startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
def _has(p, *parts):
    return os.path.exists(os.path.join(p or os.getcwd(), *parts))
# the repository (and any folder holding the package) leaves sys.path; a site-packages folder that holds
# a non-editable install next to torch stays, with the package itself blocked
blocked = any(_has(p, "stun_exp") and _has(p, "torch") for p in sys.path)
sys.path[:] = [p for p in sys.path if _has(p, "torch") or not (_has(p, "stun_exp") or _has(p, "tests", "arctic_like.py"))]
class _Block:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if blocked and name.split(".")[0] == "stun_exp":
            raise ImportError(name)
sys.meta_path.insert(0, _Block)
sys.path_importer_cache.clear()
out = {}
for name in ("stun_exp", "tests.arctic_like"):
    try:
        __import__(name)
        out["importable:" + name] = True
    except ImportError:
        out["importable:" + name] = False
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
for job in json.load(open(sys.argv[1])):
    try:
        ref = torch.load(job["ref"])
        kw = {"trust_remote_code": True} if job["trust"] else {}
        model = AutoModelForCausalLM.from_pretrained(job["path"], **kw).eval()
        with torch.no_grad():
            y = model(ref["x"]).logits
        out[job["name"]] = {"equal": bool(torch.equal(y, ref["y"])), "max_diff": float((y - ref["y"]).abs().max()),
                            "module": type(model).__module__}
    except Exception as e:
        out[job["name"]] = {"error": f"{type(e).__name__}: {e}"[:3000]}
json.dump(out, open(sys.argv[2], "w"))
'''


def _model(arch: str, **cfg_overrides):
    """tiny_model(arch); DeepSeek gets 3 decoder layers (its first layer is dense) so 2 are MoE."""
    m = tiny_model(arch)
    if not arch.startswith("deepseek") and not cfg_overrides:
        return m
    cfg = m.config
    if arch.startswith("deepseek"):
        cfg.num_hidden_layers = 3
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    m = type(m)(cfg)
    _sharpen_routers(m, torch.Generator().manual_seed(1))
    return m.float().eval()


def _plant_pairs(model) -> int:
    """Near-duplicate router rows in the last MoE layer (one pair per routing group); returns the pair count."""
    a = get_adapter(model)
    l, n = a.moe_layers[-1], a.num_experts(a.moe_layers[-1])
    groups = 2 if a.spec.name.startswith("deepseek") else 1
    per = n // groups
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        w = a.router_weight(l)
        for k in range(groups):
            w[k * per + 1] = w[k * per] + 1e-3 * torch.randn(w.shape[1], generator=g)
    return groups


def _prune(arch: str, kind: str):
    model = _model(arch)
    ctx = ctx_for(model)
    if kind == "uniform_stun":
        plan = StunPruner(expert_sparsity=0.25, scope="layer", reconstruct_max_clusters=8).plan(ctx)
    elif kind == "uniform_frequency":
        plan = FrequencyPruner(expert_sparsity=0.25).plan(ctx)
    else:
        pairs = _plant_pairs(model)
        total = sum(ctx.adapter.num_experts(l) for l in ctx.adapter.moe_layers)
        plan = StunPruner(target_experts=total - pairs, reconstruct_max_clusters=8).plan(ctx)
        assert any(r is None for lp in plan.layers.values() for r in lp.representatives)   # averaged
    apply_plan(ctx.adapter, plan)
    return model, plan


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _scrubbed_run(jobs: list[dict], tmp: Path) -> dict:
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp / "jobs.json"), str(tmp / "out.json")],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    x = tiny_input()
    jobs, made = [], {}
    for arch in ARCHS:
        for kind in KINDS:
            model, plan = _prune(arch, kind)
            counts = {len(lp.groups) for lp in plan.layers.values()}
            assert (len(counts) == 1) == kind.startswith("uniform"), (arch, kind, counts)
            name = f"{arch}-{kind}"
            path = save_pretrained(model, None, tmp / name)
            torch.save({"x": x, "y": _logits(model, x)}, tmp / f"{name}.ref.pt")
            jobs.append({"name": name, "path": str(path), "ref": str(tmp / f"{name}.ref.pt"),
                         "trust": arch == "arctic" or kind == "per_layer_stun"})
            made[name] = (model, plan, path)
    # DeepSeek-V2 routing without groups, 5 of 8 experts kept: n_group / topk_group become 1
    model = _model("deepseek_v2", topk_method="greedy")
    ctx = ctx_for(model)
    plan = FrequencyPruner(expert_sparsity=0.375).plan(ctx)
    apply_plan(ctx.adapter, plan)
    name = "deepseek_v2-greedy_uniform5"
    path = save_pretrained(model, None, tmp / name)
    torch.save({"x": x, "y": _logits(model, x)}, tmp / f"{name}.ref.pt")
    jobs.append({"name": name, "path": str(path), "ref": str(tmp / f"{name}.ref.pt"), "trust": False})
    made[name] = (model, plan, path)
    return made, _scrubbed_run(jobs, tmp)


def test_the_loader_cannot_import_stun_exp(exported):
    _, res = exported
    assert res["importable:stun_exp"] is False and res["importable:tests.arctic_like"] is False


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_loads_without_stun_exp_with_identical_logits(exported, arch, kind):
    made, res = exported
    r = res[f"{arch}-{kind}"]
    assert "error" not in r, r.get("error")
    assert r["equal"], r
    remote = arch == "arctic" or kind == "per_layer_stun"
    assert r["module"].startswith("transformers_modules" if remote else "transformers.models.")


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_config_is_stock(exported, arch):
    made, _ = exported
    model, plan, path = made[f"{arch}-uniform_stun"]
    a = get_adapter(model)
    n = a.num_experts(a.moe_layers[0])
    cfg = json.loads((path / "config.json").read_text())
    assert cfg[a.spec.experts_key] == n
    assert not (path / f"{REMOTE_MODULE}.py").exists()
    if arch == "arctic":
        assert cfg["auto_map"] == {"AutoConfig": "arctic_like.ArcticConfig",
                                   "AutoModelForCausalLM": "arctic_like.ArcticForCausalLM"}
        assert (path / "arctic_like.py").is_file()
    else:
        assert "auto_map" not in cfg
    if arch.startswith("deepseek"):
        assert n % cfg["n_group"] == 0 and cfg["n_group"] == 2
    if arch == "deepseek_v3":
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            biases = [k for k in f.keys() if k.endswith("e_score_correction_bias")]
            assert biases and all(f.get_tensor(k).shape == (n,) for k in biases)


def test_group_fields_made_consistent(exported):
    made, res = exported
    model, _, path = made["deepseek_v2-greedy_uniform5"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["n_routed_experts"] == 5 and cfg["n_group"] == 1 and cfg["topk_group"] == 1
    assert res["deepseek_v2-greedy_uniform5"].get("equal"), res["deepseek_v2-greedy_uniform5"]
    assert "`n_group` 2 -> 1" in (path / REPORT_NAME).read_text()


@pytest.mark.parametrize("arch", ARCHS)
def test_per_layer_checkpoint_carries_its_code(exported, arch):
    made, _ = exported
    model, plan, path = made[f"{arch}-per_layer_stun"]
    a = get_adapter(model)
    cfg = json.loads((path / "config.json").read_text())
    counts = [a.num_experts(l) if l in a.moe_layers else None for l in range(len(a.layers))]
    assert cfg["num_experts_per_layer"] == counts
    assert cfg[a.spec.experts_key] == max(c for c in counts if c is not None)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == f"{REMOTE_MODULE}.{type(model).__name__}"
    code = (path / f"{REMOTE_MODULE}.py").read_text()
    assert "stun_exp" not in code.replace("stun-exp", "")
    card = (path / REPORT_NAME).read_text()
    assert "trust_remote_code=True" in card and "vLLM and SGLang build every MoE layer from one count" in card


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss", "arctic"])
def test_stun_exp_loader_reads_new_and_old_checkpoints(exported, arch, tmp_path):
    made, _ = exported
    x = tiny_input()
    for kind in ("uniform_stun", "per_layer_stun"):
        model, _, path = made[f"{arch}-{kind}"]
        for trust in ((True,) if arch == "arctic" else (False, True)):
            m2, _ = load_pretrained(str(path), trust_remote_code=trust)
            assert torch.equal(_logits(m2, x), _logits(model, x)), (kind, trust)
    if arch != "arctic":                   # the format written before: per-layer key, no code, no auto_map
        model, _, _ = made[f"{arch}-per_layer_stun"]
        model.save_pretrained(tmp_path / "old")
        assert "auto_map" not in json.loads((tmp_path / "old" / "config.json").read_text())
        m2, _ = load_pretrained(str(tmp_path / "old"))
        assert torch.equal(_logits(m2, x), _logits(model, x))


def test_pruning_card_with_a_run_report(tmp_path):
    model, plan = _prune("mixtral", "per_layer_stun")
    report = {"config": {"model": {"name_or_path": "tiny/mixtral"}, "expert_pruner": {"name": "stun", "scope": "global"},
                         "unstructured_pruner": {"name": "wanda"}, "sparsity": 0.4, "seed": 0},
              "expert_pruning": {"method": "stun", "experts_before": 16, "experts_after": 15, "removal": "slice_router"},
              "unstructured_pruning": {"split": {"unstructured_ratio": 0.3712}},
              "sparsity": {"decoder_linear": 0.4, "all_params": 0.31, "active_params": 0.35, "targeted": 0.3712,
                           "expert": 1 / 16}}
    path = save_pretrained(model, None, tmp_path / "ck", report=report)
    card = (path / REPORT_NAME).read_text()
    for text in ("`stun`, scope `global`, removal `slice_router`: 16 -> 15 experts", "`wanda`, ratio 0.3712",
                 "| 0 | 8 | 8 |", "| 1 | 7 | 8 |", "| decoder_linear | 40.00 % |", "| expert | 6.25 % |",
                 "tiny/mixtral", "Unstructured zeros are stored in dense tensors"):
        assert text in card, text
    uni, _ = _prune("qwen3_moe", "uniform_frequency")
    card = (save_pretrained(uni, None, tmp_path / "u") / REPORT_NAME).read_text()
    assert "stock transformers loads it" in card and "trust_remote_code" not in card
    assert "No run report was given" in card


def test_streaming_writes_the_same_kinds(tmp_path):
    """The streaming runtime's checkpoint: vanilla when uniform, own code otherwise, PRUNING.md."""
    from hydra import compose, initialize_config_dir

    from stun_exp.models.plan import ExpertPlan
    from stun_exp.pipeline import run_pipeline
    from stun_exp.run import CONF_DIR
    torch.save(tiny_input(4, 8), tmp_path / "calib.pt")
    for kind, stun in (("uniform_stun", ["expert_pruner.expert_sparsity=0.25", "expert_pruner.scope=layer"]),
                       ("per_layer_stun", ["expert_pruner.target_experts=15"])):
        model = _model("mixtral")
        if kind == "per_layer_stun":
            _plant_pairs(model)
        src = tmp_path / f"src-{kind}"
        model.save_pretrained(src)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "model=hf", f"model.name_or_path={src}", "calib=tokens", f"calib.path={tmp_path / 'calib.pt'}",
                "calib.nsamples=4", "calib.seqlen=8", "eval=none", "runtime=streaming", "expert_pruner=stun",
                *stun, "unstructured_pruner=none", "sparsity=null", f"out_root={tmp_path}"])
        run = tmp_path / f"run-{kind}"
        run.mkdir()
        res = run_pipeline(cfg, str(run))
        out = Path(res["checkpoint"])
        apply_plan(get_adapter(model), ExpertPlan.from_dict(json.loads((run / "expert_plan.json").read_text())))
        cfg_json = json.loads((out / "config.json").read_text())
        assert ("auto_map" in cfg_json) == (kind == "per_layer_stun") == (out / f"{REMOTE_MODULE}.py").exists()
        assert (out / REPORT_NAME).is_file() and "| 1 |" in (out / REPORT_NAME).read_text()
        m2, _ = load_pretrained(str(out))
        assert torch.equal(_logits(m2, tiny_input()), _logits(model, tiny_input()))


def test_reexport_of_a_loaded_per_layer_checkpoint(exported, tmp_path):
    """Loaded through its own code, pruned again: the folder is rewritten for the new counts."""
    from transformers import AutoModelForCausalLM
    from stun_exp.models.surgery import remove_experts
    _, _, path = exported[0]["mixtral-per_layer_stun"]
    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    x = tiny_input()
    out = save_pretrained(m, None, tmp_path / "again")                # still per layer: fresh code
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoModelForCausalLM": f"{REMOTE_MODULE}.MixtralForCausalLM"}
    assert (out / f"{REMOTE_MODULE}.py").read_text() == (path / f"{REMOTE_MODULE}.py").read_text()
    a = get_adapter(m)
    for l in a.moe_layers:
        remove_experts(a, l, [0, 2, 4, 5, 6])
    out = save_pretrained(m, None, tmp_path / "uniform")              # now uniform: vanilla again
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and not (out / f"{REMOTE_MODULE}.py").exists()
    assert cfg["num_local_experts"] == 5
    m2 = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(m2).__module__.startswith("transformers.models.")
    assert torch.equal(_logits(m2, x), _logits(m, x))


def test_zero_output_card(tmp_path):
    from stun_exp.models.surgery import remove_experts
    m = tiny_model("olmoe")
    a = get_adapter(m)
    remove_experts(a, 1, [0, 1, 2, 3, 4, 5], semantics="zero_output")
    out = save_pretrained(m, None, tmp_path / "z")
    card = (out / REPORT_NAME).read_text()
    assert "| 0 | 8 | 8 | 0 |" in card and "| 1 | 8 | 8 | 2 |" in card and "still stored (as zeros)" in card
    assert "auto_map" not in json.loads((out / "config.json").read_text())
