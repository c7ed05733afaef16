"""Zero slots are never computed, and the FLOP accounting equals a hand count."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from zeda_core import (
    FlopModel,
    ZedaError,
    ZeroExpertMoeBlock,
    expert_slot_flops,
    flop_report,
    grouped_experts_forward,
    inject_zero_experts,
    record_routing,
)

from family_checks import tiny_model, token_batch

H, D, N, K = 32, 16, 8, 2  # hidden, expert intermediate, real experts, top-k


def experts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 2 * D, H, generator=g), torch.randn(N, H, D, generator=g)


def counted_flops(fn) -> tuple[torch.Tensor, int]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def dense_reference(x, ids, weights, gate_up, down) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            if e >= N:
                continue
            gate, up = F.linear(x[t], gate_up[e]).chunk(2)
            out[t] += weights[t, slot] * F.linear(F.silu(gate) * up, down[e])
    return out


def test_hand_count_of_one_slot() -> None:
    assert expert_slot_flops(H, D) == 2 * 3 * 32 * 16 == 3072


def test_only_real_slots_are_computed() -> None:
    # float64, so that summing in another order than the reference stays far inside the tolerance.
    gate_up, down = (w.double() for w in experts())
    x = torch.randn(5, H, dtype=torch.float64)
    ids = torch.tensor([[0, 8], [3, 3], [9, 10], [7, 1], [8, 2]])  # ids >= N are zero slots
    zero = ids >= N
    weights = torch.rand(5, K, dtype=torch.float64).masked_fill(zero, 0.0)
    out, flops = counted_flops(lambda: grouped_experts_forward(x, ids, weights, zero, gate_up, down))
    assert flops == int((~zero).sum()) * expert_slot_flops(H, D)
    torch.testing.assert_close(out, dense_reference(x, ids, weights, gate_up, down))
    assert torch.equal(out[2], torch.zeros(H))  # the all-zero token


class MatmulCalls(TorchDispatchMode):
    """Counts the matrix multiplies dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_one_gemm_pair_per_touched_expert_and_gradients_flow() -> None:
    # float64: outputs of order 10 and their gradients compare tightly whatever the summation order.
    gate_up, down = (w.double().requires_grad_() for w in experts())
    x = torch.randn(6, H, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[5, 8], [1, 5], [9, 1], [5, 10], [1, 1], [8, 9]])  # real experts 1 and 5 only
    zero = ids >= N
    weights = torch.rand(6, K, dtype=torch.float64).masked_fill(zero, 0.0)
    with MatmulCalls() as counter:
        out = grouped_experts_forward(x, ids, weights, zero, gate_up, down)
    assert counter.calls == 4  # gate_up and down for each of the 2 touched experts
    reference = dense_reference(x, ids, weights, gate_up, down)
    torch.testing.assert_close(out, reference)
    grads = torch.autograd.grad(out.square().sum(), (x, gate_up, down))
    expected = torch.autograd.grad(reference.square().sum(), (x, gate_up, down))
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want)
    assert not grads[1][[0, 2, 3, 4, 6, 7]].any()  # untouched experts get no gradient


def test_all_zero_batch_costs_nothing() -> None:
    gate_up, down = experts()
    ids = torch.full((4, K), N)
    out, flops = counted_flops(
        lambda: grouped_experts_forward(torch.randn(4, H), ids, torch.zeros(4, K), ids >= N, gate_up, down)
    )
    assert flops == 0 and not out.any()


def test_empty_batch() -> None:
    gate_up, down = experts()
    ids = torch.zeros(0, K, dtype=torch.long)
    out = grouped_experts_forward(torch.zeros(0, H), ids, torch.zeros(0, K), ids > 0, gate_up, down)
    assert out.shape == (0, H)


def test_block_flops_are_router_plus_real_slots() -> None:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4, init="gaussian", seed=3)
    block = next(m for m in model.modules() if isinstance(m, ZeroExpertMoeBlock))
    captured = {}
    handle = block.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(token_batch())
    handle.remove()
    x = captured["x"]
    with torch.no_grad(), record_routing() as recorder, FlopCounterMode(display=False) as counter:
        block(x)
    real_slots, zero_slots = recorder.slot_counts().sum(dim=(0, 1)).tolist()
    assert zero_slots > 0
    tokens = x.shape[0] * x.shape[1]
    router_flops = 2 * tokens * block.gate.weight.numel()
    assert counter.get_total_flops() == router_flops + real_slots * expert_slot_flops(H, D)


def test_flop_report_matches_hand_count() -> None:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4)
    flop_model = FlopModel.from_model(model)
    assert (flop_model.slot_flops, flop_model.top_k, flop_model.moe_layers) == (3072, K, 2)
    assert flop_model.shared_flops_per_token == 0
    counts = torch.tensor([[7, 3], [10, 0]])  # 5 tokens x K=2 slots in each of 2 layers
    report = flop_report(counts, 5, flop_model)
    assert (report.real_slots, report.zero_slots) == (17, 3)
    assert report.expert_flops == 17 * 3072 and report.dense_expert_flops == 20 * 3072
    assert report.expert_flops_saved == 3 * 3072
    assert report.zero_expert_ratio == 3 / 20
    assert report.per_layer_zero_ratio == (0.3, 0.0)
    assert report.expert_flops_per_token == 17 * 3072 / 5
    assert report.usage() == {
        "zero_expert_ratio": 0.15,
        "real_slots": 17,
        "zero_slots": 3,
        "expert_flops": 17 * 3072,
        "expert_flops_saved": 3 * 3072,
        "dense_expert_flops": 20 * 3072,
    }
    assert 0 < report.total_flops_saved_ratio < report.zero_expert_ratio
    with pytest.raises(ZedaError, match="do not match"):
        flop_report(counts, 6, flop_model)


def test_shared_experts_are_accounted_separately() -> None:
    model = tiny_model("qwen2_moe")
    inject_zero_experts(model, 4)
    flop_model = FlopModel.from_model(model)
    block = next(m for m in model.modules() if isinstance(m, ZeroExpertMoeBlock))
    per_layer = 2 * sum(p.numel() for p in block.shared_expert.parameters()) + 2 * H
    assert flop_model.shared_flops_per_token == per_layer * flop_model.moe_layers


def test_padding_is_not_counted() -> None:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4, init="gaussian", seed=3)
    tokens = token_batch()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad(), record_routing(token_mask=mask) as recorder:
        model(tokens)
    counts = recorder.slot_counts()
    assert counts[0].sum(-1).tolist() == [9 * K] * 2
    assert counts[1].sum(-1).tolist() == [5 * K] * 2
