"""Checks that need SGLang's CPU platform, run in a fresh process (``python sglang_cpu_process.py``).

SGLang reads ``SGLANG_USE_CPU_ENGINE`` once per process, so these run apart from the test
process. Each check prints nothing on success and raises on failure; the script exits non-zero.
"""

from zeda_server.sglang_env import prepare_sglang_environment

prepare_sglang_environment()

import torch  # noqa: E402
from sglang.srt.layers.moe.token_dispatcher import StandardDispatchOutput  # noqa: E402
from sglang.srt.layers.moe.topk import StandardTopKOutput  # noqa: E402
from sglang.srt.layers.moe.utils import MoeRunnerBackend  # noqa: E402
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod  # noqa: E402
from torch import nn  # noqa: E402

from zeda_core.errors import ZedaError  # noqa: E402
from zeda_core.experts import grouped_experts_forward  # noqa: E402
from zeda_server.sglang_models.cpu_moe import use_zero_skipping_cpu_moe  # noqa: E402
from zeda_server.sglang_models.zero_aware import check_experts_skip_zero_slots  # noqa: E402

N, H, I, T, K = 4, 8, 6, 10, 2  # noqa: E741


class Experts(nn.Module):
    """The attributes of an SGLang ``FusedMoE`` that the checks and the CPU forward read."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.quant_method, self.num_fused_shared_experts = method, 0
        self.num_experts = self.num_local_experts = N
        self.w13_weight = nn.Parameter(torch.randn(N, 2 * I, H, generator=generator), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.randn(N, H, I, generator=generator), requires_grad=False)
        self.moe_runner_config = type("Config", (), {"activation": "silu", "gemm1_alpha": None})()


def expect_refusal(experts: nn.Module, on_cpu: bool, words: str) -> None:
    try:
        check_experts_skip_zero_slots(experts, 3, on_cpu=on_cpu)
    except ZedaError as exc:
        assert words in str(exc), exc
        return
    raise AssertionError(f"not refused: {words}")


def check_refusals() -> None:
    """Upstream's CPU forward (which computes or crashes on zero slots) and non-Triton GPU runners are refused."""
    experts = Experts(UnquantizedFusedMoEMethod())
    expect_refusal(experts, True, "computes zero slots")
    use_zero_skipping_cpu_moe(experts, 3)
    check_experts_skip_zero_slots(experts, 3, on_cpu=True)
    experts.quant_method.runner = type("Runner", (), {"runner_backend": MoeRunnerBackend.TRITON})()
    check_experts_skip_zero_slots(experts, 3, on_cpu=False)
    experts.quant_method.runner.runner_backend = MoeRunnerBackend.FLASHINFER_TRTLLM
    expect_refusal(experts, False, "does not skip zero slots")
    experts.num_fused_shared_experts = 1
    expect_refusal(experts, True, "fused shared experts")


def check_forward() -> None:
    """The zero-skipping forward equals zeda_core's on real slots, with ids -1 and >= N never computed."""
    experts = Experts(UnquantizedFusedMoEMethod())
    use_zero_skipping_cpu_moe(experts, 0)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(T, H, generator=generator)
    ids = torch.randint(0, N, (T, K), generator=generator, dtype=torch.int32)
    ids[0], ids[1, 1], ids[2, 0] = -1, N + 1, -1  # zero slots, both encodings; token 0 has no real slot
    weights = torch.rand(T, K, generator=generator)
    zero = (ids < 0) | (ids >= N)
    output = StandardDispatchOutput(hidden, None, StandardTopKOutput(weights, ids, torch.zeros(T, N)))
    got = experts.quant_method.forward(experts, output).hidden_states
    expected = grouped_experts_forward(hidden, ids, weights, zero, experts.w13_weight, experts.w2_weight)
    torch.testing.assert_close(got, expected)
    assert bool((got[0] == 0).all())
    dense = torch.zeros_like(hidden)  # the textbook sum over real slots
    for t in range(T):
        for k in range(K):
            if not zero[t, k]:
                gate, up = (experts.w13_weight[ids[t, k]] @ hidden[t]).chunk(2)
                dense[t] += weights[t, k] * (experts.w2_weight[ids[t, k]] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    check_refusals()
    check_forward()
    print("ok")
