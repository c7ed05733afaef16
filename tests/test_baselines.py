"""Baseline routing rules on hand-made logits (exact ids and weights), and the beta calibration."""

import math

import pytest
import torch

from zeda_core import inject_zero_experts, record_routing
from zeda_core.baselines import calibrate_dynamic_skip, dynamic_skip, routing_rule, top_p_routing, weight_ratios
from zeda_core.errors import ZedaError
from zeda_core.moe import ZeroExpertMoeBlock, ZeroExpertRouter
from zeda_core.routing import route
from zeda_core.spec import RoutingSpec

from family_checks import tiny_model, token_batch

PROBS = [[0.5, 0.3, 0.15, 0.05], [0.12, 0.7, 0.1, 0.08]]


def _spec(top_k: int = 2) -> RoutingSpec:
    return RoutingSpec(num_experts=4, num_zero_experts=0, top_k=top_k, score_func="softmax", norm_topk_prob=True)


def _logits(probs=PROBS) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_dynamic_skip_drops_slots_below_beta_times_the_top_weight() -> None:
    routing = route(_logits(), _spec())
    assert routing.topk_ids.tolist() == [[0, 1], [1, 0]]
    torch.testing.assert_close(weight_ratios(routing), torch.tensor([0.6, 0.12 / 0.7]))

    kept = dynamic_skip(routing, 0.5)  # 0.6 >= 0.5 keeps row 0's second slot; 0.171 < 0.5 drops row 1's
    assert kept.topk_ids.tolist() == [[0, 1], [1, 0]]
    assert kept.zero_mask.tolist() == [[False, False], [False, True]]
    torch.testing.assert_close(kept.topk_weights, torch.tensor([[0.625, 0.375], [0.7 / 0.82, 0.0]]))

    assert dynamic_skip(routing, 0.7).zero_mask.tolist() == [[False, True], [False, True]]
    assert not dynamic_skip(routing, 0.0).zero_mask.any()
    assert dynamic_skip(routing, 1.0).zero_mask.tolist() == [[False, True], [False, True]]  # top always kept
    with pytest.raises(ZedaError, match="beta must lie"):
        dynamic_skip(routing, 1.5)


def test_dynamic_skip_generalises_to_top_k() -> None:
    routing = route(_logits([[0.4, 0.3, 0.2, 0.1]]), _spec(top_k=3))
    torch.testing.assert_close(routing.topk_weights, torch.tensor([[0.4, 0.3, 0.2]]) / 0.9)
    torch.testing.assert_close(weight_ratios(routing), torch.tensor([0.75, 0.5]))
    skipped = dynamic_skip(routing, 0.6)
    assert skipped.zero_mask.tolist() == [[False, False, True]]
    torch.testing.assert_close(skipped.topk_weights, torch.tensor([[0.4 / 0.9, 0.3 / 0.9, 0.0]]))


def test_top_p_takes_experts_until_the_cumulative_probability_reaches_p() -> None:
    both = top_p_routing(_logits(), _spec(), 0.6)
    assert both.topk_ids.tolist() == [[0, 1], [1, 0]]
    assert both.zero_mask.tolist() == [[False, False], [False, True]]  # 0.5 < 0.6 takes a second; 0.7 >= 0.6 stops
    torch.testing.assert_close(both.topk_weights, torch.tensor([[0.625, 0.375], [1.0, 0.0]]))

    one = top_p_routing(_logits(), _spec(), 0.5)
    assert one.zero_mask.tolist() == [[False, True], [False, True]]
    torch.testing.assert_close(one.topk_weights, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))

    full = top_p_routing(_logits(), _spec(), 1.0)  # p = 1: exactly the original top-k routing
    original = route(_logits(), _spec())
    assert torch.equal(full.topk_ids, original.topk_ids) and not full.zero_mask.any()
    torch.testing.assert_close(full.topk_weights, original.topk_weights)

    unnormalised = RoutingSpec(num_experts=4, num_zero_experts=0, top_k=2, score_func="softmax", norm_topk_prob=False)
    torch.testing.assert_close(top_p_routing(_logits(), unnormalised, 0.6).topk_weights[0], torch.tensor([0.5, 0.3]))
    with pytest.raises(ZedaError, match="threshold must lie"):
        top_p_routing(_logits(), _spec(), 0.0)
    sigmoid = RoutingSpec(
        num_experts=4, num_zero_experts=0, top_k=2, score_func="sigmoid", norm_topk_prob=True, selection_bias=True
    )
    with pytest.raises(ZedaError, match="softmax routers"):
        top_p_routing(_logits(), sigmoid, 0.5)


def _layer_inputs(model: torch.nn.Module, batch: torch.Tensor) -> dict[int, torch.Tensor]:
    inputs = {}
    blocks = [m for m in model.modules() if isinstance(m, ZeroExpertMoeBlock)]
    hooks = [
        b.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod.layer_idx, args[0].flatten(0, 1)))
        for b in blocks
    ]
    with torch.no_grad():
        model(input_ids=batch)
    for hook in hooks:
        hook.remove()
    return inputs


def test_calibration_takes_the_quantile_of_weight_ratios_and_median_skips_half() -> None:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 0)
    batch = token_batch()
    inputs = _layer_inputs(model, batch)
    gates = {b.layer_idx: b.gate for b in model.modules() if isinstance(b, ZeroExpertMoeBlock)}
    for quantile in (0.0, 0.5, 1.0):
        betas = calibrate_dynamic_skip(model, [batch], quantile)
        assert sorted(betas) == sorted(inputs)
        for layer, hidden in inputs.items():
            with torch.no_grad():
                ratios = weight_ratios(route(gates[layer].logits(hidden), gates[layer].spec)).sort().values
            assert betas[layer] == pytest.approx(float(ratios[round(quantile * (ratios.numel() - 1))]))

    betas = calibrate_dynamic_skip(model, [batch], 0.5)
    skipping = routing_rule(model, lambda layer: lambda _, r: dynamic_skip(r, betas[layer]))
    with torch.no_grad(), skipping, record_routing() as recorder:
        model(input_ids=batch)
    counts = recorder.slot_counts().sum(dim=(0, 1))
    top_k = next(iter(gates.values())).spec.top_k
    # The median skips about half of the non-top slots: r_ze = (K - 1) / K / 2.
    assert math.isclose(counts[1] / counts.sum(), (top_k - 1) / top_k / 2, abs_tol=0.03)
    assert all(isinstance(b.gate, ZeroExpertRouter) for b in model.modules() if isinstance(b, ZeroExpertMoeBlock))
    with pytest.raises(ZedaError, match="quantile must lie"):
        calibrate_dynamic_skip(model, [batch], 2.0)
