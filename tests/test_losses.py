"""Group auxiliary loss and distillation losses."""

import pytest
import torch

from zeda_core import (
    RoutingRecorder,
    ZedaError,
    forward_kl,
    group_aux_loss,
    group_aux_loss_of_layers,
    group_aux_loss_over_layers,
    group_aux_target_ratio,
    inject_zero_experts,
    opd_advantage,
    record_routing,
    reverse_kl,
    token_logprobs,
    zero_group_weight_for,
)

N, Z, K, T = 8, 4, 4, 60


def batch_with_zero_share(share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [T, N+Z] and zero_mask [T, K] whose zero-slot share and zero probability mass are ``share``."""
    zero_slots = round(share * T * K)
    zero_mask = torch.zeros(T * K, dtype=torch.bool)
    zero_mask[:zero_slots] = True
    exact = zero_slots / (T * K)
    probs = torch.cat([torch.full((T, N), (1 - exact) / N), torch.full((T, Z), exact / Z)], dim=-1)
    return probs, zero_mask.view(T, K)


def recorded_forward() -> tuple[torch.nn.Module, RoutingRecorder, torch.Tensor]:
    """A tiny Qwen3-MoE with 4 zero experts, its recorded forward of a 2-row batch, and the
    batch's token mask (row 0 padded after 6 tokens)."""
    from family_checks import tiny_model, token_batch

    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4, init="gaussian", seed=3)
    tokens = token_batch()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, 6:] = False
    with record_routing(token_mask=mask, keep_probs=True) as recorder:
        model(tokens)
    return model, recorder, mask


@pytest.mark.parametrize("weight", [1.0, 2.0, 3.0])
def test_minimum_over_zero_share_is_the_target(weight: float) -> None:
    shares = torch.arange(0, T * K + 1) / (T * K)
    losses = torch.stack(
        [group_aux_loss(*batch_with_zero_share(float(s)), N, zero_group_weight=weight) for s in shares]
    )
    best = float(shares[int(losses.argmin())])
    assert best == pytest.approx(group_aux_target_ratio(N, Z, weight), abs=1.0 / (T * K))


def test_reference_target_is_one_half() -> None:
    assert group_aux_target_ratio(128, 64, 2.0) == 0.5
    for target in (0.1, 0.35, 0.5, 0.9):
        assert group_aux_target_ratio(8, 4, zero_group_weight_for(target, 8, 4)) == pytest.approx(target)
    with pytest.raises(ValueError, match="must lie in"):
        zero_group_weight_for(1.0, 8, 4)


def test_formula_value() -> None:
    probs, zero_mask = batch_with_zero_share(0.25)
    value = group_aux_loss(probs, zero_mask, N, zero_group_weight=2.0, alpha=0.1)
    expected = 0.1 * (N + 2 * Z) / K * (0.75 * 0.75 / N + 0.25 * 0.25 / (2 * Z))
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, N + Z, dtype=torch.float64, generator=g, requires_grad=True)
    zero_mask = torch.rand(10, K, generator=g) < 0.4
    mask = torch.ones(10, dtype=torch.bool)
    mask[7:] = False
    assert torch.autograd.gradcheck(
        lambda x: group_aux_loss(torch.softmax(x, -1), zero_mask, N, token_mask=mask), (logits,)
    )


def test_padding_changes_neither_loss_nor_ratio() -> None:
    probs, zero_mask = batch_with_zero_share(0.3)
    padded_probs = torch.cat([probs, torch.full((5, N + Z), 0.0).index_fill(1, torch.arange(N, N + Z), 1 / Z)])
    padded_zero = torch.cat([zero_mask, torch.ones(5, K, dtype=torch.bool)])
    mask = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)])
    assert torch.equal(
        group_aux_loss(padded_probs, padded_zero, N, token_mask=mask), group_aux_loss(probs, zero_mask, N)
    )
    assert group_aux_loss(padded_probs, padded_zero, N) != group_aux_loss(probs, zero_mask, N)


def test_loss_over_layers_from_a_recorded_forward() -> None:
    model, recorder, mask = recorded_forward()
    loss = group_aux_loss_over_layers(recorder, num_experts=8)
    per_layer = [group_aux_loss(layer.probs[mask], layer.zero_mask[mask], 8) for layer in recorder.layers]
    torch.testing.assert_close(loss, torch.stack(per_layer).mean())
    loss.backward()
    gate = recorder.layers[0]
    assert gate.probs.requires_grad
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_group_loss_needs_zero_experts() -> None:
    with pytest.raises(ZedaError, match="needs zero experts"):
        group_aux_loss(torch.rand(3, N), torch.zeros(3, K, dtype=torch.bool), N)


def test_kl_divergences() -> None:
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    expected_fwd = (p * (p.log() - q.log())).sum(-1)
    expected_rev = (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(forward_kl(teacher, student), expected_fwd.mean())
    torch.testing.assert_close(reverse_kl(teacher, student), expected_rev.mean())
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(forward_kl(teacher, student, mask), expected_fwd[mask].mean())
    assert float(forward_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_opd_advantage_is_teacher_minus_student_logprob() -> None:
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 4), generator=g)
    lp_t, lp_s = token_logprobs(teacher, tokens), token_logprobs(student, tokens)
    mask = torch.tensor([[False, True, True, True], [False, False, True, True]])
    adv = opd_advantage(lp_t, lp_s, mask)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, ((lp_t - lp_s) * mask).detach())
    assert adv[0, 0] == 0 and adv[1, 1] == 0


def test_zero_allocation_moves_zero_probability_from_hard_to_easy_tokens() -> None:
    from zeda_core.losses import zero_allocation_loss

    zero_probs = torch.tensor([[0.2, 0.8], [0.4, 0.6]], requires_grad=True)  # [L=2, T=2]
    difficulty = torch.tensor([1.0, 3.0])  # relative weights -0.5 and +0.5
    loss = zero_allocation_loss(zero_probs, difficulty)
    assert loss.item() == pytest.approx((0.2 * -0.5 + 0.8 * 0.5 + 0.4 * -0.5 + 0.6 * 0.5) / 4)
    loss.backward()
    # Descent lowers the zero probability of the hard token and raises the easy one's.
    torch.testing.assert_close(zero_probs.grad, torch.tensor([[-0.125, 0.125], [-0.125, 0.125]]))
    assert zero_allocation_loss(zero_probs, torch.tensor([2.0, 2.0])).item() == 0.0  # equally hard: no push
    assert zero_allocation_loss(torch.zeros(2, 0), torch.zeros(0)).item() == 0.0
    with pytest.raises(ZedaError, match="disagree on tokens"):
        zero_allocation_loss(zero_probs, torch.ones(3))


def test_zero_allocation_within_sequences_never_moves_zeros_between_them() -> None:
    from zeda_core.losses import zero_allocation_loss

    # Sequence 0 is hard throughout, sequence 1 easy throughout: no move across sequences.
    zero_probs = torch.tensor([[0.3, 0.6, 0.5, 0.1]], requires_grad=True)
    difficulty, groups = torch.tensor([4.0, 4.0, 1.0, 1.0]), torch.tensor([7, 7, 2, 2])
    loss = zero_allocation_loss(zero_probs, difficulty, groups)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(zero_probs.grad) == 0
    # Within a sequence, the harder token's zero probability is pushed down.
    within = zero_allocation_loss(zero_probs, torch.tensor([1.0, 3.0, 2.0, 2.0]), groups)
    assert within.item() == pytest.approx((0.3 * -0.5 + 0.6 * 0.5) / 4)


def test_per_sequence_group_loss_is_the_mean_of_each_sequences_loss() -> None:
    low, low_zero = batch_with_zero_share(0.2)
    high, high_zero = batch_with_zero_share(0.8)
    probs, zero_mask = torch.cat([low, high]), torch.cat([low_zero, high_zero])
    sequences = torch.cat([torch.full((T,), 7), torch.full((T,), 3)])
    per_sequence = group_aux_loss(probs, zero_mask, N, sequence_ids=sequences)
    expected = (group_aux_loss(low, low_zero, N) + group_aux_loss(high, high_zero, N)) / 2
    torch.testing.assert_close(per_sequence, expected)
    # One id for every token is the batch-wide loss.
    torch.testing.assert_close(
        group_aux_loss(probs, zero_mask, N, sequence_ids=torch.zeros(2 * T, dtype=torch.long)),
        group_aux_loss(probs, zero_mask, N),
    )


def test_per_sequence_group_loss_pulls_each_sequence_to_the_target() -> None:
    # Batch-wide, a sequence far above the target and one far below cancel out (overall share
    # 0.5 = the target); sequence-wise, the first is pushed down and the second up.
    low, low_zero = batch_with_zero_share(0.2)
    high, high_zero = batch_with_zero_share(0.8)
    logits = torch.cat([low, high]).log().requires_grad_(True)
    zero_mask = torch.cat([low_zero, high_zero])
    sequences = torch.cat([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)])
    group_aux_loss(torch.softmax(logits, -1), zero_mask, N, sequence_ids=sequences).backward()
    zero_grad = logits.grad[:, N:].sum(dim=-1)
    assert (zero_grad[:T] < 0).all() and (zero_grad[T:] > 0).all()  # descent raises low, lowers high
    with pytest.raises(ZedaError, match="does not match"):
        group_aux_loss(logits, zero_mask, N, sequence_ids=sequences[:5])


def test_per_sequence_loss_over_layers_takes_each_batch_row_as_a_sequence() -> None:
    _model, recorder, mask = recorded_forward()
    loss = group_aux_loss_over_layers(recorder, num_experts=8, per_sequence=True)
    per_layer = [
        torch.stack(
            [group_aux_loss(layer.probs[row][mask[row]], layer.zero_mask[row][mask[row]], 8) for row in range(2)]
        ).mean()
        for layer in recorder.layers
    ]
    torch.testing.assert_close(loss, torch.stack(per_layer).mean())


def test_pooled_layers_share_one_zero_budget() -> None:
    # Layer 0 below the target (0.2), layer 1 above (0.8), 0.5 over both: per layer, each is
    # pulled to 0.5; pooled, the layers are at the target together and nothing moves.
    low, low_zero = batch_with_zero_share(0.2)
    high, high_zero = batch_with_zero_share(0.8)
    grads = {}
    for pool in (False, True):
        logits = [low.log().requires_grad_(True), high.log().requires_grad_(True)]
        loss = group_aux_loss_of_layers(
            [torch.softmax(x, -1) for x in logits], [low_zero, high_zero], N, zero_group_weight=2.0, pool_layers=pool
        )
        loss.backward()
        grads[pool] = [x.grad[:, N:].sum(-1) for x in logits]
        if pool:
            torch.testing.assert_close(
                loss, group_aux_loss(torch.cat([low, high]), torch.cat([low_zero, high_zero]), N, zero_group_weight=2.0)
            )
    assert (grads[False][0] < 0).all() and (grads[False][1] > 0).all()
    for layer_grad in grads[True]:
        torch.testing.assert_close(layer_grad, torch.zeros_like(layer_grad), atol=1e-7, rtol=0)


def test_pooled_layers_with_padding_and_sequences() -> None:
    _model, recorder, mask = recorded_forward()
    pooled = group_aux_loss_over_layers(recorder, num_experts=8, per_sequence=True, pool_layers=True)
    rows = []
    for row in range(2):
        probs = torch.cat([layer.probs[row][mask[row]] for layer in recorder.layers])
        zero = torch.cat([layer.zero_mask[row][mask[row]] for layer in recorder.layers])
        rows.append(group_aux_loss(probs, zero, 8))
    torch.testing.assert_close(pooled, torch.stack(rows).mean())


def test_bf16_probabilities_are_summed_in_float32() -> None:
    probs, zero_mask = batch_with_zero_share(0.3)
    probs = probs.repeat(200, 1)  # 12,000 tokens: a bf16 running sum would stall far below
    zero_mask = zero_mask.repeat(200, 1)
    exact = group_aux_loss(probs.double(), zero_mask, N)
    torch.testing.assert_close(group_aux_loss(probs.bfloat16(), zero_mask, N).double(), exact, rtol=1e-2, atol=0)
