"""MoE expert backends by name: the registry, its errors, and every loaded model holding one."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from zeda_core import MOE_BACKENDS, ZedaError, grouped_experts_forward, load_model, moe_backend, set_moe_backend
from zeda_core.model_queries import moe_blocks
from zeda_core.routing import Routing

TINY_ZEDA = Path(__file__).resolve().parents[1] / "models" / "tiny-zeda"


def backends_of(model: torch.nn.Module) -> set[str]:
    return {block.experts_backend.name for block in moe_blocks(model)}


def experts_inputs(device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 3], [1, 3], [2, 2]])
    zero = torch.tensor([[False, True], [False, False], [True, True]])
    inputs = dict(
        hidden_states=torch.randn(3, 16, generator=g),
        topk_ids=ids,
        topk_weights=torch.rand(3, 2, generator=g).masked_fill(zero, 0.0),
        zero_mask=zero,
        gate_up_proj=torch.randn(4, 32, 16, generator=g),
        down_proj=torch.randn(4, 16, 16, generator=g),
    )
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def run(backend, inputs: dict[str, torch.Tensor], act_fn=F.silu) -> torch.Tensor:
    """``backend`` on the raw tensors of :func:`experts_inputs`, called as a MoE layer calls it."""
    routing = Routing(inputs["topk_ids"], inputs["topk_weights"], inputs["zero_mask"], probs=torch.empty(0))
    experts = SimpleNamespace(gate_up_proj=inputs["gate_up_proj"], down_proj=inputs["down_proj"], act_fn=act_fn)
    return backend(hidden_states=inputs["hidden_states"], routing=routing, experts=experts)


def test_names_resolve_and_unknown_names_are_refused() -> None:
    assert set(MOE_BACKENDS) == {"auto", "torch", "triton"}
    assert {moe_backend(name).name for name in MOE_BACKENDS} == set(MOE_BACKENDS)
    with pytest.raises(ZedaError, match=r"unknown MoE backend 'bogus'; choose one of: auto, torch, triton"):
        moe_backend("bogus")


def test_load_model_gives_every_block_the_backend(monkeypatch) -> None:
    assert backends_of(load_model(TINY_ZEDA)) == {"auto"}
    assert backends_of(load_model(TINY_ZEDA, moe_backend="torch")) == {"torch"}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = load_model(TINY_ZEDA, moe_backend="triton")
    assert backends_of(model) == {"triton"} and len(moe_blocks(model)) == model.config.num_hidden_layers
    set_moe_backend(model, "torch")
    assert backends_of(model) == {"torch"}
    with pytest.raises(ZedaError, match="unknown MoE backend 'fast'"):
        load_model(TINY_ZEDA, moe_backend="fast")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = r"MoE backend 'triton' needs a CUDA device \(or TRITON_INTERPRET=1 on CPU\), got cpu"
    with pytest.raises(ZedaError, match=message):
        load_model(TINY_ZEDA, moe_backend="triton")
    model = load_model(TINY_ZEDA, moe_backend="torch")
    with pytest.raises(ZedaError, match=message):
        set_moe_backend(model, "triton")
    assert backends_of(model) == {"torch"}
    set_moe_backend(model, "triton", device="cuda")  # checked against where the model will run
    assert backends_of(model) == {"triton"}
    with pytest.raises(ZedaError, match=message):
        run(moe_backend("triton"), experts_inputs())  # and again on each call


def test_triton_refuses_other_activations_and_auto_falls_back(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = load_model(TINY_ZEDA, moe_backend="torch")
    for block in moe_blocks(model):
        block.experts.act_fn = torch.nn.GELU()
    with pytest.raises(ZedaError, match=r"MoE backend 'triton' computes SwiGLU \(SiLU\) experts only, not GELU"):
        set_moe_backend(model, "triton")
    set_moe_backend(model, "auto")
    assert backends_of(model) == {"auto"}
    inputs = experts_inputs()
    with pytest.raises(ZedaError, match="SwiGLU"):
        run(moe_backend("triton"), inputs, F.gelu)
    expected = grouped_experts_forward(*inputs.values(), act_fn=F.gelu)
    torch.testing.assert_close(run(moe_backend("auto"), inputs, F.gelu), expected)


class Spy:
    """A backend that records that it ran, then computes with torch."""

    name = "spy"

    def __init__(self) -> None:
        self.calls = 0

    def check(self, device: torch.device, act_fn) -> None:
        pass

    def __call__(self, *, hidden_states: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        self.calls += 1
        return moe_backend("torch")(hidden_states=hidden_states, routing=routing, experts=experts)


def test_auto_runs_torch_on_cpu(monkeypatch) -> None:
    spy = Spy()
    monkeypatch.setitem(MOE_BACKENDS, "triton", spy)
    inputs = experts_inputs()
    torch.testing.assert_close(run(moe_backend("auto"), inputs), grouped_experts_forward(*inputs.values()))
    assert spy.calls == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_runs_triton_on_cuda(monkeypatch) -> None:
    spy = Spy()
    monkeypatch.setitem(MOE_BACKENDS, "triton", spy)
    inputs = experts_inputs("cuda")
    run(moe_backend("auto"), inputs)
    assert spy.calls == 1
    run(moe_backend("auto"), inputs, F.gelu)
    assert spy.calls == 1


def test_zeda_core_does_not_import_the_kernels() -> None:
    code = (
        "import sys, zeda_core; "
        f"model = zeda_core.load_model({str(TINY_ZEDA)!r}); "
        "assert 'zeda_kernels' not in sys.modules, 'zeda_kernels imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
