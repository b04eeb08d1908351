"""Tiny random-init MoE models of every supported architecture (and a dense Llama), for tests.

``tiny_model(arch, seed=0)`` builds a 2-layer, hidden-32 model with 4-8 experts from a config
(no download). Routers are re-drawn as N(0, 1) so that routing is decisive (random init gives
near-uniform router logits, which makes top-k ties and makes pruning tests meaningless).
Arctic has no transformers class; ``tests/arctic_like.py`` stands in for its remote code.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                        router_jitter_noise=0.0)
    return MixtralForCausalLM(cfg)


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    cfg = Qwen2MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                         num_experts_per_tok=2, shared_expert_intermediate_size=24, norm_topk_prob=False,
                         decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen2MoeForCausalLM(cfg)


def _qwen3_moe(norm: bool):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=norm, decoder_sparse_step=1,
                         mlp_only_layers=[], head_dim=8)
    return Qwen3MoeForCausalLM(cfg)


def _olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM
    cfg = OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False)
    return OlmoeForCausalLM(cfg)


def _deepseek_v2():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    cfg = DeepseekV2Config(**COMMON, intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8,
                           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                           n_group=2, topk_group=1, topk_method="group_limited_greedy",
                           routed_scaling_factor=1.5,
                           kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
                           v_head_dim=8, head_dim=4)
    return DeepseekV2ForCausalLM(cfg)


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    cfg = DeepseekV3Config(**COMMON, intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8,
                           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                           n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                           kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                           v_head_dim=8, head_dim=4)
    return DeepseekV3ForCausalLM(cfg)


def _phimoe():
    from transformers import PhimoeConfig, PhimoeForCausalLM
    cfg = PhimoeConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                       router_jitter_noise=0.01, input_jitter_noise=0.0)  # 0.01 = PhiMoE's own default
    return PhimoeForCausalLM(cfg)


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                       head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return GptOssForCausalLM(cfg)


def _granitemoe():
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM
    cfg = GraniteMoeConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    return GraniteMoeForCausalLM(cfg)


def _arctic():
    from tests.arctic_like import ArcticLikeConfig, ArcticLikeForCausalLM
    return ArcticLikeForCausalLM(ArcticLikeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                  intermediate_size=16, num_local_experts=4,
                                                  num_experts_per_tok=2))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**COMMON, intermediate_size=48))


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": lambda: _qwen3_moe(True),
    "qwen3_moe_nonorm": lambda: _qwen3_moe(False),
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "phimoe": _phimoe,
    "gpt_oss": _gpt_oss,
    "granitemoe": _granitemoe,
    "arctic": _arctic,
}
ARCHS = list(BUILDERS)
# Dense (non-MoE) decoders: only unstructured pruning applies.
DENSE_BUILDERS: dict[str, Callable[[], nn.Module]] = {"llama": _llama}


@torch.no_grad()
def _sharpen_routers(model: nn.Module, gen: torch.Generator) -> None:
    """Router weights ~ N(0,1) (biases too) so that top-k choices are decisive."""
    for name, p in model.named_parameters():
        if any(k in name for k in (".gate.weight", ".router.weight", ".router.bias")) \
                and "shared_expert_gate" not in name and p.dim() >= 1:
            p.copy_(torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A 2-layer, hidden-32, random-init model of `arch` (one of ARCHS), eval mode, fp32."""
    builders = {**BUILDERS, **DENSE_BUILDERS}
    if arch not in builders:
        raise KeyError(f"unknown tiny arch {arch!r}; known: {', '.join(builders)}")
    torch.manual_seed(seed)
    model = builders[arch]()
    _sharpen_routers(model, torch.Generator().manual_seed(seed + 1))
    return model.float().eval()


def tiny_input(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids [batch, seq] within the tiny vocab."""
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def save_tiny_checkpoint(arch: str, path: str, seed: int = 0, tokenizer=None) -> str:
    """Save tiny_model(arch) (plus an optional tokenizer) as a HF folder for end-to-end runs.

    The Arctic stand-in is saved with its modeling file and ``auto_map``: load it with
    ``trust_remote_code=True``.
    """
    from stun_exp.models.loading import save_pretrained
    if arch == "arctic":
        from tests.arctic_like import enable_remote_code_save
        enable_remote_code_save()
    return str(save_pretrained(tiny_model(arch, seed), tokenizer, path))
