"""A tiny stand-in for Snowflake Arctic's remote modeling code (``trust_remote_code``).

Arctic's code cannot be downloaded here, so this module reproduces only what the adapter relies
on: its MODULE LAYOUT and routing rule, not its exact numerics (no rotary embedding, plain causal
attention). Layout mirrored from the remote ``modeling_arctic.py``:

    model.layers[i].block_sparse_moe.gate          nn.Linear(H, E, bias=False)
    model.layers[i].block_sparse_moe.experts[j]    .w1 (gate [I,H]), .w3 (up [I,H]), .w2 (down [H,I])
    model.layers[i].residual_mlp                   dense MLP (w1/w2/w3, intermediate = hidden size) run in
                                                   parallel with the MoE (``use_residual``, MoE layers only)
    model.layers[i].block_sparse_moe.mlp           dense MLP in non-MoE layers ((i+1) % moe_layer_frequency != 0)
    routing: softmax over all experts -> top-k -> renormalise (when top_k > 1)
    layer: out = h + residual_mlp(residual_layernorm(h)) + moe(post_attention_layernorm(x)),
           h = x + attn(input_layernorm(x))   (the MoE reads the layer INPUT x, as in Arctic)

The class is named ``ArcticForCausalLM`` (model_type "arctic") so the adapter matches it the same
way it matches the real remote class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class ArcticConfig(PretrainedConfig):
    model_type = "arctic"

    def __init__(self, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                 max_position_embeddings=64, moe_layer_frequency=1, use_residual=True, hidden_act="silu",
                 tie_word_embeddings=False, **kw):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.num_local_experts = intermediate_size, num_local_experts
        self.num_experts_per_tok, self.rms_norm_eps = num_experts_per_tok, rms_norm_eps
        self.max_position_embeddings, self.moe_layer_frequency = max_position_embeddings, moe_layer_frequency
        self.use_residual, self.hidden_act = use_residual, hidden_act
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kw)


ArcticLikeConfig = ArcticConfig


class ArcticMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ArcticMoE(nn.Module):
    def __init__(self, cfg: ArcticConfig, is_moe_layer: bool):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_local_experts, cfg.num_experts_per_tok
        self.is_moe_layer = is_moe_layer
        if not is_moe_layer:
            self.mlp = ArcticMLP(cfg.hidden_size, cfg.intermediate_size)
            return
        self.gate = nn.Linear(cfg.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(ArcticMLP(cfg.hidden_size, cfg.intermediate_size)
                                     for _ in range(self.num_experts))

    def forward(self, x):
        if not self.is_moe_layer:
            return self.mlp(x)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.top_k > 1:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(len(self.experts)):
            tok, pos = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, pos, None])
        return out.reshape(shape)


class ArcticAttention(nn.Module):
    def __init__(self, cfg: ArcticConfig):
        super().__init__()
        h = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)

    def forward(self, x):
        b, s, h = x.shape
        split = lambda t: t.view(b, s, self.n_heads, h // self.n_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                           split(self.v_proj(x)), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, h))


class ArcticDecoderLayer(nn.Module):
    """Parallel residual MLP + MoE after attention, as Arctic's ``parallel_attn_mlp_res``."""

    def __init__(self, cfg: ArcticConfig, idx: int):
        super().__init__()
        h = cfg.hidden_size
        is_moe = (idx + 1) % cfg.moe_layer_frequency == 0
        self.use_residual = cfg.use_residual and is_moe
        self.input_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.self_attn = ArcticAttention(cfg)
        if self.use_residual:
            self.residual_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
            self.residual_mlp = ArcticMLP(h, h)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.block_sparse_moe = ArcticMoE(cfg, is_moe)

    def forward(self, x):
        h = x + self.self_attn(self.input_layernorm(x))
        if not self.use_residual:
            return h + self.block_sparse_moe(self.post_attention_layernorm(h))
        dense = self.residual_mlp(self.residual_layernorm(h))
        return h + dense + self.block_sparse_moe(self.post_attention_layernorm(x))


class ArcticModel(nn.Module):
    def __init__(self, cfg: ArcticConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(ArcticDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class ArcticPreTrainedModel(PreTrainedModel):
    config_class = ArcticConfig
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)


class ArcticForCausalLM(ArcticPreTrainedModel):
    def __init__(self, config: ArcticConfig):
        super().__init__(config)
        self.model = ArcticModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits)


ArcticLikeForCausalLM = ArcticForCausalLM


def enable_remote_code_save() -> None:
    """save_pretrained then copies this file next to the weights and writes ``auto_map``, so the folder
    loads with ``trust_remote_code=True`` exactly like the real Arctic checkpoint."""
    ArcticConfig.register_for_auto_class()
    ArcticForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def register_auto() -> None:
    """Make AutoConfig / AutoModelForCausalLM know the stand-in (what trust_remote_code does for real)."""
    try:
        AutoConfig.register("arctic", ArcticConfig)
        AutoModelForCausalLM.register(ArcticConfig, ArcticForCausalLM)
    except ValueError:  # already registered in this process
        pass
