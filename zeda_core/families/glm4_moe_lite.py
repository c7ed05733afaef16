"""GLM-4.7-Flash (``glm4_moe_lite``): sigmoid + correction bias, one shared expert, scaling 1.8."""

from zeda_core.families.base import TINY_MLA_WITH_SHARED_EXPERT, MoeFamily

FAMILY = MoeFamily(
    model_type="glm4_moe_lite",
    architecture="Glm4MoeLiteForCausalLM",
    sparse_block="Glm4MoeLiteMoE",
    score_func="sigmoid",
    shared_name="shared_experts",
    tiny=dict(
        TINY_MLA_WITH_SHARED_EXPERT,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
)
