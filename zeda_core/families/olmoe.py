"""OLMoE: softmax routing, top-k weights not renormalised by default, no shared expert."""

from zeda_core.families.base import MoeFamily

FAMILY = MoeFamily(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    sparse_block="OlmoeSparseMoeBlock",
    score_func="softmax",
    tiny=dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
)
