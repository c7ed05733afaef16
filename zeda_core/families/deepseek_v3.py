"""DeepSeek-V3: sigmoid scores, selection bias, group-limited top-k, routed scaling, shared experts.

Zero experts belong to no group: group limiting applies to the real experts only.
"""

from zeda_core.families.base import MoeFamily

FAMILY = MoeFamily(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    sparse_block="DeepseekV3MoE",
    score_func="sigmoid",
    shared_name="shared_experts",
    tiny=dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        head_dim=8,
        rope_interleave=True,
        num_key_value_heads=4,
    ),
)
