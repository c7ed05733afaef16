"""Qwen3-MoE (e.g. Qwen3-30B-A3B): softmax routing, ``norm_topk_prob``, no shared expert."""

from zeda_core.families.base import MoeFamily

FAMILY = MoeFamily(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    sparse_block="Qwen3MoeSparseMoeBlock",
    score_func="softmax",
    tiny=dict(
        head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    ),
)
