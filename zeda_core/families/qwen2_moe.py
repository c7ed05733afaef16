"""Qwen2-MoE: softmax routing and a shared expert scaled by its own sigmoid gate."""

from zeda_core.families.base import MoeFamily

FAMILY = MoeFamily(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    sparse_block="Qwen2MoeSparseMoeBlock",
    score_func="softmax",
    shared_name="shared_expert",
    shared_gate=True,
    num_experts_attr="num_experts",
    tiny=dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
)
