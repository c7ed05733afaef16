"""route(): exact ids and weights on hand-made logits for every routing variant."""

import math

import pytest
import torch

from zeda_core import RoutingSpec, ZedaError, route


def softmax_spec(norm: bool = True, **kw) -> RoutingSpec:
    return RoutingSpec(num_experts=4, num_zero_experts=2, top_k=2, score_func="softmax", norm_topk_prob=norm, **kw)


def sigmoid_spec(**kw) -> RoutingSpec:
    return RoutingSpec(score_func="sigmoid", norm_topk_prob=True, selection_bias=True, topk_sorted=False, **kw)


def test_zero_slot_weight_is_dropped_not_renormalised() -> None:
    # Row 0: real expert 1 and zero expert 4 win; row 1: two real experts win.
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0], [3.0, 0.0, 2.0, 0.0, 0.0, 0.0]])
    r = route(logits, softmax_spec())
    assert r.topk_ids.tolist() == [[1, 4], [0, 2]]
    assert r.zero_mask.tolist() == [[False, True], [False, False]]
    e = math.e
    torch.testing.assert_close(r.topk_weights[0], torch.tensor([e**2 / (e**2 + e), 0.0]))
    torch.testing.assert_close(r.topk_weights[1], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(2))


def test_without_norm_topk_prob_weights_are_softmax_probs() -> None:
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0]])
    r = route(logits, softmax_spec(norm=False))
    probs = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(r.topk_weights[0], torch.stack([probs[1], torch.tensor(0.0)]))


def test_all_zero_token() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 5.0]])
    r = route(logits, softmax_spec())
    assert r.zero_mask.all() and r.topk_weights.abs().sum() == 0


def test_sigmoid_bias_selects_but_does_not_weigh() -> None:
    spec = sigmoid_spec(num_experts=4, num_zero_experts=2, top_k=2, routed_scaling_factor=1.8)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # lifts zero expert 4 into the top-2
    r = route(logits, spec, selection_bias=bias)
    assert sorted(r.topk_ids[0].tolist()) == [0, 4]
    s0, s4 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(0.5))
    weight_of = dict(zip(r.topk_ids[0].tolist(), r.topk_weights[0].tolist(), strict=True))
    assert weight_of[4] == 0.0
    assert weight_of[0] == pytest.approx(float(1.8 * s0 / (s0 + s4)), abs=1e-6)
    torch.testing.assert_close(r.probs[0], torch.sigmoid(logits[0]) / torch.sigmoid(logits[0]).sum())


def test_group_limit_applies_to_real_experts_only() -> None:
    spec = sigmoid_spec(num_experts=4, num_zero_experts=1, top_k=2, n_group=2, topk_group=1)
    # group {0,1} wins; expert 2 (other group) is masked although its score is second best;
    # zero expert 4 stays eligible and wins the second slot.
    logits = torch.tensor([[4.0, -4.0, 3.0, -4.0, 3.5]])
    r = route(logits, spec, selection_bias=torch.zeros(5))
    assert sorted(r.topk_ids[0].tolist()) == [0, 4]


def test_zce_mask_gives_the_static_model() -> None:
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0, 9.0, 9.0]])
    r = route(logits, softmax_spec(mask_zero_experts=True))
    assert not r.zero_mask.any()
    static = route(logits[:, :4], RoutingSpec(4, 0, 2, "softmax", True))
    torch.testing.assert_close(r.topk_weights, static.topk_weights)


def test_forced_ids_replay_uses_current_logits() -> None:
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0]])
    forced = torch.tensor([[0, 5]])
    r = route(logits, softmax_spec(), forced_ids=forced)
    assert r.topk_ids.tolist() == [[0, 5]] and r.zero_mask.tolist() == [[False, True]]
    assert r.topk_weights[0, 0] == pytest.approx(0.5, abs=1e-6)  # equal probs of experts 0 and 5


@pytest.mark.parametrize(
    ("logits", "kwargs", "message"),
    [
        (torch.zeros(3, 5), {}, "router_logits must be"),
        (torch.zeros(3, 6), {"selection_bias": torch.zeros(6)}, "selection_bias"),
        (torch.zeros(1, 6), {"forced_ids": torch.tensor([[0, 6]])}, "forced_ids must lie"),
        (torch.zeros(1, 6), {"forced_ids": torch.tensor([[0]])}, "forced_ids must be"),
    ],
)
def test_bad_input_is_refused(logits, kwargs, message) -> None:
    with pytest.raises(ZedaError, match=message):
        route(logits, softmax_spec(), **kwargs)


def test_spec_validation() -> None:
    with pytest.raises(ZedaError, match="top_k"):
        RoutingSpec(4, 2, 5, "softmax", True)
    with pytest.raises(ZedaError, match="group routing"):
        RoutingSpec(6, 2, 2, "sigmoid", True, n_group=4, topk_group=1)
