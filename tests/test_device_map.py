"""accelerate device_map loading (for evaluating models larger than one device) keeps logits exact."""
from __future__ import annotations

import torch

from stun_exp.models.adapter import get_adapter
from stun_exp.models.loading import load_pretrained, save_pretrained
from stun_exp.models.surgery import remove_experts
from tests.tiny_models import tiny_input, tiny_model


def test_device_map_with_disk_offload_matches_plain_load(tmp_path):
    m = tiny_model("mixtral")
    remove_experts(get_adapter(m), 0, [0, 2, 3, 5, 7])          # per-layer counts differ: 5 and 8
    save_pretrained(m, None, tmp_path / "ckpt")
    plain, _ = load_pretrained(str(tmp_path / "ckpt"))
    mapped, _ = load_pretrained(str(tmp_path / "ckpt"), device_map="auto", max_memory={"cpu": 20_000},
                                offload_folder=str(tmp_path / "offload"))
    ids = tiny_input()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, mapped(ids).logits)
    assert any((tmp_path / "offload").iterdir())                 # it really spilled to disk
