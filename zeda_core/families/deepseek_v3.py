"""DeepSeek-V3: sigmoid scores, selection bias, group-limited top-k, routed scaling, shared experts.

Zero experts belong to no group: group limiting applies to the real experts only.
"""

from zeda_core.families.base import TINY_MLA_WITH_SHARED_EXPERT, MoeFamily

FAMILY = MoeFamily(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    sparse_block="DeepseekV3MoE",
    score_func="sigmoid",
    shared_name="shared_experts",
    tiny=dict(
        TINY_MLA_WITH_SHARED_EXPERT,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        head_dim=8,
        rope_interleave=True,
    ),
)
