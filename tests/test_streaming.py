"""The streaming runtime against the in-memory one, through the one runner: same plans, masks,
ledger and logits, one decoder layer materialised at a time, a complete sharded checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from stun_exp.models.adapter import get_adapter
from stun_exp.models.loading import load_pretrained
from stun_exp.pipeline import run_pipeline
from stun_exp.run import CONF_DIR
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


def _run(tmp: Path, src: Path, runtime: str, overrides: list[str], name: str) -> dict:
    torch.save(CALIB, tmp / "calib.pt")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=hf", f"model.name_or_path={src}", "calib=tokens", f"calib.path={tmp / 'calib.pt'}",
            "calib.nsamples=4", "calib.seqlen=16", "eval=none", f"runtime={runtime}", "save_checkpoint=true",
            f"out_root={tmp}", *overrides])
    run_dir = tmp / name
    run_dir.mkdir()
    return run_pipeline(cfg, str(run_dir))


def _both(tmp: Path, src: Path, overrides: list[str]) -> tuple[dict, dict]:
    return _run(tmp, src, "default", overrides, "memory"), _run(tmp, src, "streaming", overrides, "stream")


def _assert_same(mem: dict, st: dict) -> None:
    """Same plan, ledger, per-layer report and masks; bit-identical weights and logits after reload."""
    assert st["runtime"] == "streaming" and mem["runtime"] == "in_memory"
    assert (st["expert_pruning"] or {}).get("experts_after") == (mem["expert_pruning"] or {}).get("experts_after")
    mp, sp = (Path(r["run_dir"]) / "expert_plan.json" for r in (mem, st))
    if mp.is_file():
        assert json.loads(mp.read_text())["layers"] == json.loads(sp.read_text())["layers"]
    assert st["sparsity"] == mem["sparsity"]
    assert st["mask_digest"] == mem["mask_digest"]
    assert st["unstructured_pruning"].get("per_layer") == mem["unstructured_pruning"].get("per_layer")
    a, _ = load_pretrained(mem["checkpoint"])
    b, _ = load_pretrained(st["checkpoint"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:                                   # bitwise: equal masks, kept experts and updates
        assert torch.equal(sa[k].view(torch.int32), sb[k].view(torch.int32)), k
    x = tiny_input()
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=1e-6)
    assert st["streaming"]["peak_live_layers"] == 1
    assert st["kurtosis"]["dense"]["model"] == pytest.approx(mem["kurtosis"]["dense"]["model"], nan_ok=True)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy_keys", "native_keys"])
def test_stun_router_wanda_equal(tmp_path, legacy):
    src = _save(tmp_path / "src", legacy)
    mem, st = _both(tmp_path, src, ["expert_pruner=stun", "expert_pruner.expert_sparsity=0.25",
                                    "unstructured_pruner=wanda", "sparsity=0.5"])
    assert mem["expert_pruning"]["experts_after"] == 12
    _assert_same(mem, st)
    assert st["streaming"]["key_format"] == ["legacy" if legacy else "native"]
    assert st["expert_pruning"]["meta"]["checkpoint_reads"]["router"] == 2


def test_frequency_magnitude_equal(tmp_path):
    src = _save(tmp_path / "src", legacy=False)
    mem, st = _both(tmp_path, src, ["expert_pruner=frequency", "expert_pruner.expert_sparsity=0.25",
                                    "expert_pruner.calib_batch_size=2", "unstructured_pruner=magnitude",
                                    "sparsity=0.45"])
    assert st["expert_pruning"]["meta"]["scores"] == mem["expert_pruning"]["meta"]["scores"]
    _assert_same(mem, st)


def test_random_sparsegpt_equal(tmp_path):
    src = _save(tmp_path / "src", legacy=True)
    mem, st = _both(tmp_path, src, ["expert_pruner=random", "expert_pruner.seed=3",
                                    "unstructured_pruner=sparsegpt", "sparsity=0.5"])
    _assert_same(mem, st)


def test_coactivation_owl_with_offloaded_activations(tmp_path):
    src = _save(tmp_path / "src", legacy=True)
    common = ["expert_pruner=stun", "expert_pruner.distance=coactivation", "expert_pruner.expert_sparsity=0.25",
              "expert_pruner.calib_batch_size=4", "unstructured_pruner=owl", "unstructured_pruner.owl_m=2",
              "unstructured_pruner.owl_lambda=0.05", "sparsity=0.5"]
    mem = _run(tmp_path, src, "default", common, "memory")
    st = _run(tmp_path, src, "streaming", [*common, "runtime.offload_activations=true",
                                           f"runtime.offload_dir={tmp_path / 'acts'}"], "stream")
    _assert_same(mem, st)
    assert not list((tmp_path / "acts").iterdir())      # activation files are removed after use


def test_no_pruner_writes_the_dense_checkpoint(tmp_path):
    src = _save(tmp_path / "src", legacy=True)
    mem, st = _both(tmp_path, src, ["expert_pruner=none", "unstructured_pruner=none", "sparsity=null"])
    _assert_same(mem, st)


def test_index_is_complete(tmp_path):
    src = _save(tmp_path / "src", legacy=True)
    res = _run(tmp_path, src, "streaming", ["expert_pruner=stun", "expert_pruner.expert_sparsity=0.25"], "run")
    out = Path(res["checkpoint"])
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
    with pytest.raises(CheckpointFormatError, match=r"missing \['mlp.experts.gate_up_proj'\].*legacy format"):
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
    mem, st = _both(tmp_path, src, ["device=cuda", "model.dtype=bfloat16", "expert_pruner=stun",
                                    "expert_pruner.expert_sparsity=0.25", "unstructured_pruner=wanda",
                                    "sparsity=0.5"])
    assert st["mask_digest"] == mem["mask_digest"] and st["streaming"]["dtype"] == "torch.bfloat16"


def test_streaming_run_records_and_reloads(tmp_path):
    """The root config + runtime=streaming: results.json, expert plan and a checkpoint that reloads."""
    src = _save(tmp_path / "src", legacy=True)
    res = _run(tmp_path, src, "streaming", ["expert_pruner=stun", "expert_pruner.expert_sparsity=0.25",
                                            "unstructured_pruner=wanda", "sparsity=0.5"], "run")
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["complete"] and saved["streaming"]["peak_live_layers"] == 1
    assert res["expert_pruning"]["experts_after"] == 12
    assert 0.4 < res["sparsity"]["decoder_linear"] <= 0.5   # zero-token experts stay dense (leave_dense)
    assert json.loads((run_dir / "expert_plan.json").read_text())["experts_after"] == 12
    model, _ = load_pretrained(str(run_dir / "checkpoint"))
    assert get_adapter(model).num_experts(0) == 6
    assert (run_dir / "checkpoint" / "PRUNING.md").is_file()


def test_checkpoint_not_kept_when_asked(tmp_path):
    src = _save(tmp_path / "src", legacy=True)
    res = _run(tmp_path, src, "streaming", ["expert_pruner=stun", "expert_pruner.expert_sparsity=0.25",
                                            "save_checkpoint=false", "eval=ppl", "eval.datasets=[wikitext2]"][:-2],
               "run")
    assert res["checkpoint"] is None and not (tmp_path / "run" / "checkpoint").exists()
    assert res["config"]["save_checkpoint"] is False


@pytest.mark.parametrize("pruner", ["reap", "hc_smoe", "m_smoe"])
def test_reap_and_merging_equal(tmp_path, pruner):
    """REAP's saliencies and the merging baselines' clusters from a streaming pass equal in-memory ones."""
    src = _save(tmp_path / "src", legacy=True)
    mem, st = _both(tmp_path, src, [f"expert_pruner={pruner}", "expert_pruner.expert_sparsity=0.25",
                                    "unstructured_pruner=wanda", "sparsity=0.5"])
    _assert_same(mem, st)
    assert st["expert_pruning"]["meta"]["statistics_source"].startswith("streaming")
