"""Triton kernels against their torch references (interpreter on CPU, compiled on CUDA)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from zeda_core import RoutingSpec, ZedaError, grouped_experts_forward, inject_zero_experts, set_moe_backend
from zeda_core.model_queries import moe_blocks
from zeda_core.routing import Routing
from zeda_kernels import (
    align_real_slots,
    fused_route,
    moe_reference,
    route_reference,
    triton_experts,
    zero_aware_moe,
)
from zeda_kernels import moe as moe_module
from zeda_kernels.configs import GemmConfig, fallback_config, pick_config

from family_checks import tiny_model, token_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = GemmConfig(16, 16, 16, num_warps=4, num_stages=2)

SPECS = {
    "qwen3 (softmax, norm)": RoutingSpec(8, 4, 2, "softmax", True),
    "olmoe (softmax, no norm)": RoutingSpec(8, 4, 3, "softmax", False),
    "glm (sigmoid, bias, scale)": RoutingSpec(
        8, 4, 4, "sigmoid", True, routed_scaling_factor=1.8, selection_bias=True, topk_sorted=False
    ),
    "deepseek (group limit)": RoutingSpec(
        8,
        4,
        2,
        "sigmoid",
        True,
        routed_scaling_factor=2.5,
        selection_bias=True,
        n_group=4,
        topk_group=2,
        topk_sorted=False,
    ),
    "static (zce mask)": RoutingSpec(8, 4, 2, "softmax", True, mask_zero_experts=True),
    "no zero experts": RoutingSpec(6, 0, 2, "softmax", True),
}


def by_id(ids: torch.Tensor, weights: torch.Tensor, zero: torch.Tensor):
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order), zero.gather(1, order)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_fused_route_equals_reference(name: str, tokens: int) -> None:
    spec = SPECS[name]
    g = torch.Generator().manual_seed(tokens)
    logits = (2 * torch.randn(tokens, spec.num_rows, generator=g)).to(DEVICE)
    if tokens > 1:  # a token whose slots all go to zero experts (distinct logits: no ties)
        logits[0, : spec.num_experts] = -20.0 - torch.arange(spec.num_experts, device=DEVICE)
        logits[0, spec.num_experts :] = 20.0 + torch.arange(spec.num_zero_experts, device=DEVICE)
    bias = (0.1 * torch.randn(spec.num_rows, generator=g)).to(DEVICE) if spec.selection_bias else None
    got = by_id(*fused_route(logits, spec, bias))
    want = by_id(*route_reference(logits, spec, bias))
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
    if spec.num_zero_experts and not spec.mask_zero_experts and tokens > 1 and spec.top_k <= spec.num_zero_experts:
        assert got[2][0].all()


def test_softmax_slots_come_in_reference_order() -> None:
    spec = SPECS["qwen3 (softmax, norm)"]
    logits = torch.randn(50, spec.num_rows, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert torch.equal(fused_route(logits, spec)[0], route_reference(logits, spec)[0])


def routing(tokens: int, num_experts: int, top_k: int, zero_share: float, seed: int, hot: int | None = None):
    """Distinct real ids per token (from the first ``hot`` experts only, if given) and a zero mask."""
    g = torch.Generator().manual_seed(seed)
    pool = hot or num_experts
    ids = (
        torch.stack([torch.randperm(pool, generator=g)[:top_k] for _ in range(tokens)])
        if tokens
        else (torch.zeros(0, top_k, dtype=torch.long))
    )
    zero = torch.rand(tokens, top_k, generator=g) < zero_share
    ids = torch.where(zero, num_experts + 1, ids)  # zero slots carry a zero-expert id
    weights = torch.rand(tokens, top_k, generator=g).masked_fill(zero, 0.0)
    return ids, weights, zero


def test_alignment_covers_each_real_slot_once() -> None:
    ids, _, zero = routing(40, 8, 4, 0.5, seed=0, hot=5)
    alignment = align_real_slots(ids, zero, 8, block_m=16)
    real = int((~zero).sum())
    assert alignment.num_slots == real
    sorted_slots = alignment.sorted_slots.view(-1, 16)
    valid = sorted_slots[sorted_slots < real]
    assert sorted(valid.tolist()) == list(range(real))
    flat_ids = ids.flatten()[alignment.slot_position]
    for block, expert in zip(sorted_slots, alignment.block_expert, strict=True):
        members = block[block < real].long()
        assert members.numel() > 0 and bool((flat_ids[members] == expert).all())
    assert set(alignment.block_expert.tolist()) <= set(range(5))  # experts 5..7 are empty: no block
    starts = alignment.expert_block_start.tolist()
    assert starts[0] == 0 and starts[-1] == alignment.num_blocks and starts[5:] == [starts[5]] * 4
    for expert in range(8):
        assert (alignment.block_expert[starts[expert] : starts[expert + 1]] == expert).all()
    assert torch.equal(alignment.token_of_slot.long(), alignment.slot_position // 4)


def test_all_zero_batch_launches_nothing(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(moe_module, "_grouped_gemm", lambda *a, **k: calls.append(1))
    ids, weights, zero = routing(6, 8, 2, 1.0, seed=0)
    hidden, gate_up, down = experts(6, 32, 16, 8, torch.float32)
    out = zero_aware_moe(hidden, ids.to(DEVICE), weights.to(DEVICE), zero.to(DEVICE), gate_up, down)
    assert calls == [] and not out.any()
    assert align_real_slots(ids, zero, 8, 16).num_blocks == 0


def experts(tokens: int, hidden: int, inter: int, num_experts: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    return tuple(t.to(DEVICE, dtype) for t in (x, gate_up, down))


CASES = {
    "single token": dict(tokens=1, top_k=2, zero_share=0.0),
    "empty batch": dict(tokens=0, top_k=2, zero_share=0.5),
    "ragged + empty experts": dict(tokens=33, top_k=4, zero_share=0.4, hot=5),
    "half zero": dict(tokens=50, top_k=2, zero_share=0.5),
    "all slots zero": dict(tokens=9, top_k=2, zero_share=1.0),
    "no zero slot": dict(tokens=20, top_k=3, zero_share=0.0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_aware_moe_equals_reference(case: str, dtype: torch.dtype) -> None:
    params = dict(CASES[case])
    tokens, top_k = params["tokens"], params["top_k"]
    ids, weights, zero = routing(tokens, 8, top_k, params["zero_share"], seed=3, hot=params.get("hot"))
    hidden, gate_up, down = experts(tokens, 32, 24, 8, dtype)
    ids, weights, zero = ids.to(DEVICE), weights.to(DEVICE), zero.to(DEVICE)
    got = zero_aware_moe(hidden, ids, weights, zero, gate_up, down, config=SMALL)
    want = moe_reference(hidden.float(), ids, weights, zero, gate_up.float(), down.float())
    assert got.dtype == dtype and got.shape == (tokens, 32)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)
    assert not got[zero.all(dim=-1)].any()  # all-zero tokens get exactly 0


def test_default_config_path() -> None:
    ids, weights, zero = routing(12, 8, 2, 0.25, seed=5)
    hidden, gate_up, down = experts(12, 32, 16, 8, torch.float32)
    got = zero_aware_moe(hidden, ids.to(DEVICE), weights.to(DEVICE), zero.to(DEVICE), gate_up, down)
    want = moe_reference(hidden, ids.to(DEVICE), weights.to(DEVICE), zero.to(DEVICE), gate_up, down)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_config_choice() -> None:
    assert fallback_config(4).block_m == 16 and fallback_config(500).block_m == 64
    assert pick_config(torch.device("cpu"), 8, 32, 16, torch.float32, 12, 24) == fallback_config(3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter mis-loads bf16)")
def test_bf16_on_gpu() -> None:
    ids, weights, zero = routing(64, 8, 2, 0.5, seed=4)
    hidden, gate_up, down = experts(64, 64, 32, 8, torch.bfloat16)
    ids, weights, zero = ids.cuda(), weights.cuda(), zero.cuda()
    got = zero_aware_moe(hidden, ids, weights, zero, gate_up, down)
    want = moe_reference(hidden.float(), ids, weights, zero, gate_up.float(), down.float())
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def _bad_inputs():
    ids, weights, zero = routing(4, 8, 2, 0.0, seed=0)
    hidden, gate_up, down = experts(4, 32, 16, 8, torch.float32)
    good = dict(
        hidden=hidden,
        topk_ids=ids.to(DEVICE),
        topk_weights=weights.to(DEVICE),
        zero_mask=zero.to(DEVICE),
        gate_up_proj=gate_up,
        down_proj=down,
    )
    out_of_range = ids.clone()
    out_of_range[0, 0] = 8
    return [
        ("hidden size", {**good, "hidden": hidden[:, :16].contiguous()}, "hidden must have shape"),
        ("dtype", {**good, "down_proj": down.half()}, "down_proj must be one of"),
        ("ids dtype", {**good, "topk_ids": ids.float().to(DEVICE)}, "topk_ids must be one of"),
        ("weights shape", {**good, "topk_weights": weights[:, :1].contiguous().to(DEVICE)}, "topk_weights must have"),
        ("non-contiguous", {**good, "hidden": hidden.t().contiguous().t()}, "hidden must be contiguous"),
        ("id out of range", {**good, "topk_ids": out_of_range.to(DEVICE)}, "must lie in \\[0, 8\\)"),
        ("device", {**good, "zero_mask": zero.to("meta")}, "one device"),
    ]


@pytest.mark.parametrize(("label", "kwargs", "message"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_moe_input_is_a_value_error(label: str, kwargs: dict, message: str) -> None:
    for fn in (zero_aware_moe, moe_reference):
        with pytest.raises(ValueError, match=message):
            fn(**kwargs)


def test_bad_route_input() -> None:
    spec = SPECS["qwen3 (softmax, norm)"]
    with pytest.raises(ZedaError, match="router_logits must have shape"):
        fused_route(torch.zeros(3, 5, device=DEVICE), spec)
    with pytest.raises(ZedaError, match="selection_bias"):
        fused_route(torch.zeros(3, 12, device=DEVICE), spec, torch.zeros(12, device=DEVICE))


def test_triton_backend_in_a_model_matches_torch(monkeypatch) -> None:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4, init="gaussian", seed=3)
    model.to(DEVICE)
    tokens = token_batch().to(DEVICE)
    calls = []
    monkeypatch.setattr(
        moe_module, "_grouped_gemm", lambda *a, _run=moe_module._grouped_gemm, **k: calls.append(1) or _run(*a, **k)
    )
    with torch.no_grad():
        expected = model(tokens).logits
        assert calls == []  # blocks compute with torch until told otherwise
        set_moe_backend(model, "triton")
        got = model(tokens).logits
    assert {block.experts_backend.name for block in moe_blocks(model)} == {"triton"} and calls
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_triton_backend_trains() -> None:
    ids, weights, zero = routing(5, 8, 2, 0.5, seed=1)
    hidden, gate_up, down = experts(5, 32, 16, 8, torch.float32)
    ids, weights, zero = ids.to(DEVICE), weights.to(DEVICE), zero.to(DEVICE)
    gate_up.requires_grad_(True)
    layer = SimpleNamespace(gate_up_proj=gate_up, down_proj=down, act_fn=F.silu)
    out = triton_experts(hidden_states=hidden, routing=Routing(ids, weights, zero, probs=torch.empty(0)), experts=layer)
    out.sum().backward()
    assert gate_up.grad is not None and gate_up.grad.abs().sum() > 0
    reference = gate_up.detach().clone().requires_grad_(True)
    grouped_experts_forward(hidden, ids, weights, zero, reference, down).sum().backward()
    torch.testing.assert_close(gate_up.grad, reference.grad, rtol=1e-5, atol=1e-5)


def forward_and_grads(fn, hidden, ids, weights, zero, gate_up, down):
    """``fn``'s output and the gradients of a random projection of it w.r.t. hidden, weights, gate_up, down.

    A gradient the output does not depend on (an all-zero batch) is returned as zeros.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weights, gate_up, down)]
    out = fn(leaves[0], ids, leaves[1], zero, leaves[2], leaves[3])
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    if not out.requires_grad:
        return out, [torch.zeros_like(leaf) for leaf in leaves]
    grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True)
    return out, [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]


@pytest.mark.parametrize("case", list(CASES))
def test_zero_aware_moe_gradients_equal_reference(case: str) -> None:
    params = dict(CASES[case])
    tokens, top_k = params["tokens"], params["top_k"]
    ids, weights, zero = routing(tokens, 8, top_k, params["zero_share"], seed=11, hot=params.get("hot"))
    if tokens > 2:
        zero[1] = True  # a token whose slots are all zero, next to tokens with real slots
    ids, weights, zero = ids.to(DEVICE), weights.to(DEVICE), zero.to(DEVICE)
    hidden, gate_up, down = experts(tokens, 32, 24, 8, torch.float32, seed=2)
    got, got_grads = forward_and_grads(
        lambda *a: zero_aware_moe(*a, config=SMALL), hidden, ids, weights, zero, gate_up, down
    )
    want, want_grads = forward_and_grads(grouped_experts_forward, hidden, ids, weights, zero, gate_up, down)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("hidden", "topk_weights", "gate_up_proj", "down_proj"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert not got_grads[1][zero].any()  # zero slots get no weight gradient
    unused = torch.ones(8, dtype=torch.bool, device=DEVICE)
    unused[ids[~zero]] = False
    assert not got_grads[2][unused].any() and not got_grads[3][unused].any()  # experts without tokens: 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter mis-loads bf16)")
def test_bf16_gradients_on_gpu() -> None:
    ids, weights, zero = routing(64, 8, 2, 0.5, seed=4, hot=6)
    ids, weights, zero = ids.cuda(), weights.cuda(), zero.cuda()
    hidden, gate_up, down = experts(64, 64, 32, 8, torch.bfloat16)
    _, got = forward_and_grads(zero_aware_moe, hidden, ids, weights, zero, gate_up, down)
    _, want = forward_and_grads(
        grouped_experts_forward, hidden.float(), ids, weights, zero, gate_up.float(), down.float()
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2)


def test_backward_runs_the_kernels_only_on_real_slots(monkeypatch) -> None:
    ids, weights, zero = routing(12, 8, 2, 0.5, seed=5, hot=4)
    hidden, gate_up, down = experts(12, 32, 16, 8, torch.float32)
    ids, weights, zero = ids.to(DEVICE), weights.to(DEVICE), zero.to(DEVICE)
    launches = {"gemm": 0, "wgrad": 0}
    for name in ("_grouped_gemm", "_grouped_wgrad"):
        real = getattr(moe_module, name)
        key = name.removeprefix("_grouped_")
        monkeypatch.setattr(
            moe_module, name, lambda *a, _r=real, _k=key, **k: launches.__setitem__(_k, launches[_k] + 1) or _r(*a, **k)
        )
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("host sync (.tolist) in the MoE kernel path"))
    _, grads = forward_and_grads(lambda *a: zero_aware_moe(*a, config=SMALL), hidden, ids, weights, zero, gate_up, down)
    assert launches == {"gemm": 4, "wgrad": 2}  # 2 forward + 2 input-gradient GEMMs, 2 weight-gradient GEMMs
    assert all(g.abs().sum() > 0 for g in grads)
