"""Architecture table: one ``ArchSpec`` per supported MoE model class (data, not branches).

Adding an architecture = one entry in ``ARCH_SPECS`` plus a tiny model in ``tests/tiny_models.py``.
Everything here was read from the transformers 5.23 modeling files (``modeling_<arch>.py``):

- Storage layouts: ``fused`` (``experts.gate_up_proj [E, 2I, H]`` with gate rows first, ``down_proj
  [E, H, I]``), ``fused_transposed_interleaved`` (GPT-OSS: ``gate_up_proj [E, H, 2I]`` whose columns
  alternate gate/up, ``down_proj [E, I, H]``, plus ``*_bias``) and ``modulelist`` (Snowflake Arctic's
  remote code: ``experts[j].w1`` gate, ``.w3`` up, ``.w2`` down, all ``nn.Linear``).
- Routing rules (``RoutingRule.score``):
  ``softmax``       softmax over all experts -> top-k of probabilities -> optional renormalisation
                    (Mixtral always; Qwen2/Qwen3/OLMoE via ``norm_topk_prob``; DeepSeek-V2 never),
                    optional group-limited choice (DeepSeek-V2 ``group_limited_greedy``: group score =
                    max prob in the group) and ``routed_scaling_factor``.
  ``sigmoid``       DeepSeek-V3: sigmoid scores; choice uses scores + ``e_score_correction_bias``,
                    group score = sum of the top-2 choice scores in the group; weights are the
                    un-biased scores, renormalised (``norm_topk_prob``) then scaled.
  ``topk_softmax``  top-k of raw logits, then softmax over the k chosen logits (GraniteMoe, GPT-OSS;
                    the ids equal softmax->top-k, the weights equal the renormalised softmax).
  ``sparsemixer``   PhiMoE eval-mode sparsemixer: always exactly 2 experts (it ignores top_k); each
                    pick is the argmax, its weight a softmax over the logits within a relative
                    threshold 2*router_jitter_noise of it (the second pick excludes the first).
                    Training mode samples (Gumbel); only eval mode is reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

LAYOUTS = ("fused", "fused_transposed_interleaved", "modulelist")
SCORES = ("softmax", "sigmoid", "topk_softmax", "sparsemixer")
MOE_LAYER_RULES = ("all", "first_k_dense", "sparse_step", "frequency", "none")


@dataclass(frozen=True)
class RoutingRule:
    """How router logits become (ids, weights). Config keys are read from ``model.config``."""
    score: str = "softmax"
    renorm: bool | str = False          # bool, or the config key holding the flag
    scaling_key: Optional[str] = None   # e.g. "routed_scaling_factor"
    correction_bias: Optional[str] = None  # router buffer added to scores for the CHOICE only
    group: Optional[str] = None         # None | "max" (DeepSeek-V2) | "top2sum" (DeepSeek-V3)
    group_method_key: Optional[str] = None   # V2: group routing only if config[key] == group_method
    group_method: Optional[str] = None
    n_group_key: str = "n_group"
    topk_group_key: str = "topk_group"
    jitter_key: Optional[str] = None    # sparsemixer threshold (PhiMoE router_jitter_noise)
    fixed_top_k: Optional[int] = None   # sparsemixer always picks 2
    sorted_topk: bool = True            # DeepSeek routers call topk(sorted=False)
    weights_fp32: bool = False          # gate weights reach the experts in fp32 (else model dtype)


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model class, relative to the ``*ForCausalLM`` module."""
    name: str
    class_names: tuple[str, ...]
    layout: str
    experts_key: str                    # config key of the (global) expert count
    layers_path: str = "model.layers"
    moe_attr: str = "mlp"               # decoder-layer attribute holding the MoE block
    router_attr: str = "gate"           # inside the MoE block
    experts_attr: str = "experts"       # inside the MoE block
    attention_attr: str = "self_attn"
    shared_attrs: tuple[str, ...] = ()  # inside the MoE block: shared expert MLP(s), their gate
    shared_gate_attr: Optional[str] = None   # Qwen2: sigmoid(shared_expert_gate(x)) * shared(x)
    dense_attrs: tuple[str, ...] = ()   # decoder-layer attributes that are dense MLPs in MoE layers
    topk_key: str = "num_experts_per_tok"
    routing: RoutingRule = field(default_factory=RoutingRule)
    moe_layer_rule: str = "all"
    block_returns_tuple: bool = False   # GPT-OSS MLP returns (out, router_scores)
    modulelist_names: tuple[str, str, str] = ("w1", "w3", "w2")   # gate, up, down
    act_key: str = "hidden_act"

    def __post_init__(self) -> None:
        assert self.layout in LAYOUTS, self.layout
        assert self.routing.score in SCORES, self.routing.score
        assert self.moe_layer_rule in MOE_LAYER_RULES, self.moe_layer_rule


_QWEN_RENORM = RoutingRule(score="softmax", renorm="norm_topk_prob")

ARCH_SPECS: dict[str, ArchSpec] = {s.name: s for s in [
    ArchSpec("mixtral", ("MixtralForCausalLM",), "fused", "num_local_experts",
             routing=RoutingRule(score="softmax", renorm=True, weights_fp32=True)),
    ArchSpec("qwen2_moe", ("Qwen2MoeForCausalLM",), "fused", "num_experts",
             shared_attrs=("shared_expert", "shared_expert_gate"), shared_gate_attr="shared_expert_gate",
             routing=_QWEN_RENORM, moe_layer_rule="sparse_step"),
    ArchSpec("qwen3_moe", ("Qwen3MoeForCausalLM",), "fused", "num_experts",
             routing=_QWEN_RENORM, moe_layer_rule="sparse_step"),
    ArchSpec("olmoe", ("OlmoeForCausalLM",), "fused", "num_experts", routing=_QWEN_RENORM),
    ArchSpec("deepseek_v2", ("DeepseekV2ForCausalLM",), "fused", "n_routed_experts",
             shared_attrs=("shared_experts",), moe_layer_rule="first_k_dense",
             routing=RoutingRule(score="softmax", renorm=False, scaling_key="routed_scaling_factor",
                                 group="max", group_method_key="topk_method",
                                 group_method="group_limited_greedy", sorted_topk=False, weights_fp32=True)),
    ArchSpec("deepseek_v3", ("DeepseekV3ForCausalLM",), "fused", "n_routed_experts",
             shared_attrs=("shared_experts",), moe_layer_rule="first_k_dense",
             routing=RoutingRule(score="sigmoid", renorm="norm_topk_prob", scaling_key="routed_scaling_factor",
                                 correction_bias="e_score_correction_bias", group="top2sum",
                                 sorted_topk=False, weights_fp32=True)),
    ArchSpec("phimoe", ("PhimoeForCausalLM",), "fused", "num_local_experts", router_attr="router",
             routing=RoutingRule(score="sparsemixer", jitter_key="router_jitter_noise", fixed_top_k=2)),
    ArchSpec("gpt_oss", ("GptOssForCausalLM",), "fused_transposed_interleaved", "num_local_experts",
             router_attr="router", block_returns_tuple=True, routing=RoutingRule(score="topk_softmax")),
    ArchSpec("granitemoe", ("GraniteMoeForCausalLM",), "fused", "num_local_experts",
             moe_attr="block_sparse_moe", router_attr="router", routing=RoutingRule(score="topk_softmax")),
    # Snowflake Arctic (remote code, trust_remote_code=True). Tested on tests/arctic_like.py.
    ArchSpec("arctic", ("ArcticForCausalLM",), "modulelist", "num_local_experts",
             moe_attr="block_sparse_moe", dense_attrs=("residual_mlp",), moe_layer_rule="frequency",
             routing=RoutingRule(score="softmax", renorm=True)),
]}

CLASS_TO_SPEC: dict[str, ArchSpec] = {c: s for s in ARCH_SPECS.values() for c in s.class_names}
SUPPORTED_CLASSES: tuple[str, ...] = tuple(CLASS_TO_SPEC)

# Dense (non-MoE) decoders of the Llama family layout (Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...):
# ``model.layers[i].self_attn`` and ``.mlp``. Only the unstructured pruners run on them (Wanda's home
# ground); every expert stage needs one of the MoE entries above.
DENSE_SPEC = ArchSpec("dense", (), "fused", "", moe_layer_rule="none")
# Config keys that hold a routed-expert count: a config with any of them is an MoE we do not know.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def is_moe_layer(spec: ArchSpec, config: object, idx: int) -> bool:
    """Whether decoder layer ``idx`` holds a MoE block, from the config alone (mirrors each class's __init__)."""
    rule = spec.moe_layer_rule
    if rule == "none":
        return False
    if rule == "all":
        return True
    if rule == "first_k_dense":
        return idx >= int(getattr(config, "first_k_dense_replace", 0) or 0)
    if rule == "sparse_step":
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        only_mlp = getattr(config, "mlp_only_layers", None) or []
        return idx not in only_mlp and getattr(config, spec.experts_key) > 0 and (idx + 1) % step == 0
    freq = int(getattr(config, "moe_layer_frequency", 1) or 1)   # "frequency" (Arctic)
    return (idx + 1) % freq == 0
