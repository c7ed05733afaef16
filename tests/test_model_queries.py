"""``zeda_core.model_queries``: the one answer to "where are the zero experts?", and FLOP reports that add up."""

import dataclasses

import pytest
import torch

from zeda_core.convert import inject_zero_experts
from zeda_core.errors import ZedaError
from zeda_core.families import FAMILIES
from zeda_core.flops import FlopModel, flop_report
from zeda_core.model_queries import model_spec, moe_blocks, spec_from_config
from zeda_core.spec import ZERO_LOGIT_BIAS_KEY, write_num_zero_experts

from family_checks import tiny_model


def test_moe_blocks_are_the_zero_aware_blocks_in_layer_order() -> None:
    model = tiny_model("deepseek_v3")  # layer 0 is dense
    assert moe_blocks(model) == [] and model_spec(model) is None
    spec = inject_zero_experts(model, 4)
    blocks = moe_blocks(model)
    assert [b.layer_idx for b in blocks] == [1, 2]
    assert model_spec(model) == spec


def test_model_spec_refuses_layers_that_route_differently() -> None:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4)
    first = moe_blocks(model)[0]
    first.gate.spec = dataclasses.replace(first.gate.spec, top_k=1)
    with pytest.raises(ZedaError, match="2 different specs"):
        model_spec(model)


@pytest.mark.parametrize("offset", [False, True])
def test_spec_from_config_reads_a_dict_and_an_hf_config_alike(offset: bool) -> None:
    config = FAMILIES["qwen3_moe"].tiny_config()
    raw = config.to_dict() | {"model_type": "qwen3_moe_plus_plus", ZERO_LOGIT_BIAS_KEY: offset}
    write_num_zero_experts(raw, 3)
    spec = spec_from_config(raw)
    assert (spec.num_experts, spec.num_zero_experts, spec.zero_logit_bias) == (8, 3, offset)
    for key in ("zce_nums", "zce_types", "use_zce_mask", ZERO_LOGIT_BIAS_KEY):
        setattr(config, key, raw[key])
    assert spec_from_config(config) == spec


def test_spec_from_config_of_a_plain_moe_has_no_zero_experts() -> None:
    spec = spec_from_config(FAMILIES["deepseek_v3"].tiny_config().to_dict())
    assert spec.num_zero_experts == 0 and spec.score_func == "sigmoid" and not spec.zero_logit_bias


def test_flop_reports_add_up_to_the_report_of_all_their_tokens() -> None:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4)
    flops = FlopModel.from_model(model)
    k, layers = flops.top_k, flops.moe_layers
    tokens = [3, 5, 2]
    zero = [torch.tensor([1, 4][:layers]), torch.tensor([7, 0][:layers]), torch.tensor([2, 3][:layers])]
    counts = [torch.stack([t * k - z, z], dim=1) for t, z in zip(tokens, zero, strict=True)]
    reports = [flop_report(c, t, flops) for c, t in zip(counts, tokens, strict=True)]
    whole = flop_report(sum(counts), sum(tokens), flops)
    total = sum(reports)
    assert dataclasses.replace(total, per_layer_zero_ratio=()) == dataclasses.replace(whole, per_layer_zero_ratio=())
    assert total.per_layer_zero_ratio == pytest.approx(whole.per_layer_zero_ratio)
    zero_slots = sum(int(z.sum()) for z in zero)
    assert total.zero_expert_ratio == pytest.approx(zero_slots / (sum(tokens) * k * layers))
    assert total.usage() == whole.usage()
