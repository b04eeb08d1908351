"""Streaming mode == in-memory mode on tiny Mixtral (both checkpoint key formats), index, memory bound."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stun_exp.analysis import sparsity as ledger
from stun_exp.context import RunContext
from stun_exp.models.adapter import get_adapter
from stun_exp.models.loading import load_pretrained
from stun_exp.models.surgery import apply_plan
from stun_exp.pruning.expert.baselines import FrequencyPruner
from stun_exp.pruning.expert.stun import StunPruner
from stun_exp.pruning.weights.pruners import MagnitudePruner, OWLPruner, WandaPruner
from stun_exp.streaming import prune_streaming
from stun_exp.streaming.checkpoint import INDEX_NAME, CheckpointFormatError
from stun_exp.streaming.store import LayerStore
from tests.tiny_models import tiny_input, tiny_model

CALIB = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))


def _save(path: Path, legacy: bool, layers: int = 2) -> Path:
    torch.manual_seed(0)
    m = tiny_model("mixtral")
    if layers != 2:
        from transformers import MixtralForCausalLM
        m.config.num_hidden_layers = layers
        m = MixtralForCausalLM(m.config).float().eval()
    m.save_pretrained(path, max_shard_size="20KB", save_original_format=legacy)
    return path


def _in_memory(src: Path, expert, unstructured, sparsity):
    model, _ = load_pretrained(str(src))
    ad = get_adapter(model)
    ctx = RunContext(None, model, None, ad, CALIB, torch.device("cpu"))
    dense = ledger.census(model, ad)
    plan = expert.plan(ctx)
    apply_plan(ad, plan)
    split = ledger.derive_unstructured_ratio(sparsity, dense, ad, unstructured.is_targeted)
    report = unstructured.prune(ctx, sparsity=split["unstructured_ratio"])
    targeted = ledger.targeted_counts(ad, unstructured.is_targeted)
    return model, plan, ledger.sparsity_report(dense, ledger.census(model, ad), targeted), report


def _assert_same(model, plan, sp, res, out: Path) -> None:
    assert res["expert_plan"].to_dict()["layers"] == plan.to_dict()["layers"]
    assert res["sparsity"] == sp
    reloaded, _ = load_pretrained(str(out))
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:                                   # bitwise: equal masks, kept experts and updates
        assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), k
    # Logits of the two checkpoints, saved in the same (native) key format and reloaded, are identical.
    # (Objects loaded differently can differ in the last bit: CPU kernels pick paths by alignment.)
    model.save_pretrained(out.with_name(out.name + "-memory"), save_original_format=False)
    mem, _ = load_pretrained(str(out.with_name(out.name + "-memory")))
    x = tiny_input()
    assert torch.equal(mem(x).logits, reloaded(x).logits)
    torch.testing.assert_close(model(x).logits, reloaded(x).logits, rtol=0, atol=1e-6)
    assert res["streaming"]["peak_live_layers"] == 1


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy_keys", "native_keys"])
def test_stun_router_wanda_equal(tmp_path, legacy):
    src = _save(tmp_path / "src", legacy)
    mk = lambda: (StunPruner(expert_sparsity=0.25), WandaPruner(name="wanda", sparsity=0.5))
    model, plan, sp, rep = _in_memory(src, *mk(), 0.5)
    res = prune_streaming(src, tmp_path / "out", *mk(), CALIB, "cpu", sparsity=0.5)
    assert plan.experts_after == 12 and any(len(g) > 1 for lp in plan.layers.values() for g in lp.groups)
    _assert_same(model, plan, sp, res, tmp_path / "out")
    assert res["streaming"]["key_format"] == ["legacy" if legacy else "native"]
    assert res["expert_pruning"]["meta"]["checkpoint_reads"]["router"] == 2
    assert res["unstructured_pruning"]["per_layer"] == rep["per_layer"]


def test_frequency_magnitude_equal(tmp_path):
    src = _save(tmp_path / "src", legacy=False)
    mk = lambda: (FrequencyPruner(expert_sparsity=0.25, calib_batch_size=2),
                  MagnitudePruner(name="magnitude", sparsity=0.5))
    model, plan, sp, _ = _in_memory(src, *mk(), 0.45)
    res = prune_streaming(src, tmp_path / "out", *mk(), CALIB, "cpu", sparsity=0.45)
    assert res["expert_pruning"]["meta"]["scores"] == plan.meta["scores"]   # calibration counts equal
    _assert_same(model, plan, sp, res, tmp_path / "out")


def test_random_sparsegpt_equal(tmp_path):
    from stun_exp.pruning.expert.baselines import RandomPruner
    from stun_exp.pruning.weights.pruners import SparseGPTPruner
    src = _save(tmp_path / "src", legacy=True)
    mk = lambda: (RandomPruner(expert_sparsity=0.25, seed=3), SparseGPTPruner(name="sparsegpt", sparsity=0.5))
    model, plan, sp, _ = _in_memory(src, *mk(), 0.5)
    res = prune_streaming(src, tmp_path / "out", *mk(), CALIB, "cpu", sparsity=0.5)
    _assert_same(model, plan, sp, res, tmp_path / "out")


def test_coactivation_owl_with_offloaded_activations(tmp_path):
    src = _save(tmp_path / "src", legacy=True)
    mk = lambda: (StunPruner(distance="coactivation", expert_sparsity=0.25, calib_batch_size=4),
                  OWLPruner(name="owl", sparsity=0.5, owl_m=2, owl_lambda=0.05))
    model, plan, sp, _ = _in_memory(src, *mk(), 0.5)
    res = prune_streaming(src, tmp_path / "out", *mk(), CALIB, "cpu", sparsity=0.5,
                          offload_dir=str(tmp_path / "acts"))
    _assert_same(model, plan, sp, res, tmp_path / "out")
    assert not list((tmp_path / "acts").iterdir())      # activation files are removed after use


def test_index_is_complete(tmp_path):
    src = _save(tmp_path / "src", legacy=True)
    out = tmp_path / "out"
    prune_streaming(src, out, StunPruner(expert_sparsity=0.25), WandaPruner(name="wanda"), CALIB, "cpu")
    index = json.loads((out / INDEX_NAME).read_text())
    stored, size = {}, 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                stored[k] = f.name
                t = h.get_tensor(k)
                size += t.numel() * t.element_size()
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == size
    assert len(list(out.glob("*.safetensors"))) == 3      # one shard per decoder layer + the globals
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts_per_layer"] == [6, 6]


def test_one_layer_materialised_at_a_time(tmp_path):
    src = _save(tmp_path / "src", legacy=False, layers=4)
    store = LayerStore(src)
    live = []
    orig = store.materialise

    def spy(l, device="cpu"):
        layer = orig(l, device)
        live.append(sum(not any(p.is_meta for p in lay.parameters()) for lay in store.adapter.layers))
        return layer

    store.materialise = spy
    from stun_exp.streaming.engine import StreamingEngine
    eng = StreamingEngine(store, CALIB, torch.device("cpu"), select=lambda t: True)
    eng.run(lambda l, targets, stats: True)
    assert live == [1, 1, 1, 1] and store.peak_live == 1
    assert all(any(p.is_meta for p in lay.parameters()) for lay in store.adapter.layers)   # all released


def test_unknown_key_format_fails_clearly(tmp_path):
    from safetensors.torch import load_file, save_file
    src = _save(tmp_path / "src", legacy=False)
    for f in src.glob("*.safetensors"):
        sd = {k.replace("experts.gate_up_proj", "experts.w13"): v for k, v in load_file(str(f)).items()}
        save_file(sd, str(f), metadata={"format": "pt"})
    idx = json.loads((src / INDEX_NAME).read_text())
    idx["weight_map"] = {k.replace("experts.gate_up_proj", "experts.w13"): v for k, v in idx["weight_map"].items()}
    (src / INDEX_NAME).write_text(json.dumps(idx))
    store = LayerStore(src)
    with pytest.raises(CheckpointFormatError, match=r"missing \['mlp.experts.gate_up_proj'\].*legacy per-expert"):
        store.materialise(0)


def test_streaming_perplexity_matches_in_memory(tmp_path):
    from stun_exp.evaluation.perplexity import perplexity
    from stun_exp.streaming.evaluate import streaming_perplexity
    src = _save(tmp_path / "src", legacy=True)
    ids = torch.randint(0, 64, (80,), generator=torch.Generator().manual_seed(5))
    model, _ = load_pretrained(str(src))
    ref = perplexity(model, ids, seqlen=16)
    got = streaming_perplexity(src, ids, seqlen=16)
    assert got["windows"] == ref["windows"] == 5
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert got["peak_live_layers"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_cuda_bf16_equals_in_memory(tmp_path):
    """bf16 on the GPU (fp32 statistics inside the engine/observer): same masks as in-memory bf16."""
    src = _save(tmp_path / "src", legacy=True)
    dev = torch.device("cuda")
    mk = lambda: (StunPruner(expert_sparsity=0.25), WandaPruner(name="wanda", sparsity=0.5))
    model, _ = load_pretrained(str(src), dtype=torch.bfloat16, device="cuda")
    ad = get_adapter(model)
    ctx = RunContext(None, model, None, ad, CALIB, dev)
    ep, up = mk()
    plan = ep.plan(ctx)
    apply_plan(ad, plan)
    up.prune(ctx, sparsity=0.5)
    ep, up = mk()
    res = prune_streaming(src, tmp_path / "out", ep, up, CALIB, dev, dtype=torch.bfloat16)
    reloaded, _ = load_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16, device="cuda")
    a, b = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["streaming"]["dtype"] == "torch.bfloat16" and res["streaming"]["peak_live_layers"] == 1


def test_run_streaming_from_composed_config(tmp_path):
    """run_streaming(cfg, run_dir): the root config + runtime=streaming, results.json and checkpoint."""
    from hydra import compose, initialize_config_dir

    import stun_exp.streaming.config  # noqa: F401  (declares schema_runtime)
    from stun_exp.config.schema import register_all
    from stun_exp.streaming import run_streaming
    src = _save(tmp_path / "src", legacy=True)
    torch.save(CALIB, tmp_path / "calib.pt")
    register_all()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=hf", f"model.name_or_path={src}", "calib=tokens", f"calib.path={tmp_path / 'calib.pt'}",
            "calib.nsamples=4", "calib.seqlen=16", "expert_pruner=stun", "expert_pruner.expert_sparsity=0.25",
            "unstructured_pruner=wanda", "sparsity=0.5", "eval=none", "dense_baseline=false", "runtime=streaming"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    res = run_streaming(cfg, str(run_dir))
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["complete"] and saved["streaming"]["peak_live_layers"] == 1
    assert res["expert_pruning"]["experts_after"] == 12
    assert 0.4 < res["sparsity"]["decoder_linear"] <= 0.5   # zero-token experts stay dense (leave_dense)
    assert json.loads((run_dir / "expert_plan.json").read_text())["experts_after"] == 12
    model, _ = load_pretrained(str(run_dir / "checkpoint"))
    assert get_adapter(model).num_experts(0) == 6
