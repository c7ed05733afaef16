"""``zeda serve --backend sglang`` for real: SGLang's engine on CPU behind the OpenAI API, no stub.

Each server here is a real ``zeda serve`` process on loopback (SGLang's CPU engine, float32), driven
with the ``openai`` SDK and compared with the torch backend serving the same checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch
from api_checks import API_KEY, INVALID_REQUESTS, assert_refused
from sglang_guard import sglang_marks

from zeda_core import inject_zero_experts, load_model, save_model
from zeda_core.families import FAMILIES
from zeda_core.flops import expert_slot_flops
from zeda_core.losses import token_logprobs
from zeda_server.launch import running_server

pytestmark = [*sglang_marks(), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TINY_ZEDA, TINY_TEACHER = ROOT / "models" / "tiny-zeda", ROOT / "models" / "tiny-teacher"
SGLANG_START_S = 600.0
# Exact accounting: with SGLang's prefix cache on, a shared prompt prefix is routed (and reported)
# but not computed again, so the MoE forward would count fewer slots than usage reports.
SGLANG = ("--backend", "sglang", "--sglang-arg", "disable_radix_cache=true")
PROMPTS = [
    "What is 12 + 30?",
    "What is 7 + 5?",
    "Reverse: abcde",
    "Copy: hello world",
    "Sort: 3 1 2",
    "Write a Python function that adds two numbers.",
]
ZEDA_KEYS = ("expert_flops", "expert_flops_saved", "dense_expert_flops")


@pytest.fixture(scope="module")
def torch_url():
    with running_server(TINY_ZEDA) as url:
        yield url


@pytest.fixture(scope="module")
def sglang_url():
    with running_server(TINY_ZEDA, *SGLANG, "--max-batch", "16", startup_timeout=SGLANG_START_S) as url:
        yield url


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(rf"^{name}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def moe_forward_slots(url: str) -> tuple[float, float]:
    """(computed, skipped) slots counted inside SGLang's CPU MoE forward since the server started."""
    return (
        metric(url, "zeda_moe_forward_slots", '{kind="computed"}'),
        metric(url, "zeda_moe_forward_slots", '{kind="skipped"}'),
    )


def chat(url: str, prompt: str, max_tokens: int = 24):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    return client.chat.completions.create(
        model="tiny-zeda", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )


def assert_same_usage(got: dict, expected: dict) -> None:
    assert got["zero_expert_ratio"] == pytest.approx(expected["zero_expert_ratio"], abs=1e-6)
    for key in ZEDA_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key


def test_greedy_replies_and_usage_equal_the_torch_backend(torch_url: str, sglang_url: str) -> None:
    saved = 0.0
    for prompt in PROMPTS:
        expected, got = chat(torch_url, prompt), chat(sglang_url, prompt)
        assert got.choices[0].message.content == expected.choices[0].message.content, prompt
        assert got.choices[0].finish_reason == expected.choices[0].finish_reason
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
            expected.usage.prompt_tokens,
            expected.usage.completion_tokens,
        )
        assert_same_usage(got.usage.model_extra["zeda"], expected.usage.model_extra["zeda"])
        saved += got.usage.model_extra["zeda"]["expert_flops_saved"]
    assert saved > 0  # the ZEDA model does route to zero experts, so the comparison means something


def test_streaming_with_usage_and_completions_with_echo_and_logprobs(torch_url: str, sglang_url: str) -> None:
    client = openai.OpenAI(base_url=f"{sglang_url}/v1", api_key="none")
    whole = chat(sglang_url, PROMPTS[0])
    chunks = list(
        client.chat.completions.create(
            model="tiny-zeda",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert_same_usage(chunks[-1].usage.model_extra["zeda"], whole.usage.model_extra["zeda"])

    def complete(url: str):
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        return sdk.completions.create(
            model="tiny-zeda", prompt="def add(a, b):", max_tokens=12, temperature=0, echo=True, logprobs=1
        )

    expected, got = complete(torch_url), complete(sglang_url)
    assert got.choices[0].text == expected.choices[0].text and got.choices[0].text.startswith("def add(a, b):")
    assert got.choices[0].logprobs.tokens == expected.choices[0].logprobs.tokens
    torch.testing.assert_close(
        torch.tensor(got.choices[0].logprobs.token_logprobs),
        torch.tensor(expected.choices[0].logprobs.token_logprobs),
        rtol=0,
        atol=1e-4,
    )
    assert_same_usage(got.usage.model_extra["zeda"], expected.usage.model_extra["zeda"])


async def _concurrent_chats(url: str, prompts: list[str]) -> list:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
    calls = [
        client.chat.completions.create(
            model="tiny-zeda", messages=[{"role": "user", "content": p}], max_tokens=32, temperature=0
        )
        for p in prompts
    ]
    return await asyncio.gather(*calls)


def test_16_concurrent_requests_add_up_and_no_zero_slot_is_computed(sglang_url: str) -> None:
    config = json.loads((TINY_ZEDA / "config.json").read_text())
    slot_flops = expert_slot_flops(config["hidden_size"], config["moe_intermediate_size"])
    before = {key: metric(sglang_url, f"zeda_{key}_total") for key in ZEDA_KEYS}
    computed_before, skipped_before = moe_forward_slots(sglang_url)
    prompts = [f"What is {i} + {2 * i + 1}?" for i in range(16)]
    replies = asyncio.run(_concurrent_chats(sglang_url, prompts))
    usages = [r.usage.model_extra["zeda"] for r in replies]
    for key in ZEDA_KEYS:
        assert metric(sglang_url, f"zeda_{key}_total") - before[key] == pytest.approx(sum(u[key] for u in usages))
    real = sum(u["expert_flops"] for u in usages) / slot_flops
    zero = sum(u["expert_flops_saved"] for u in usages) / slot_flops
    computed, skipped = moe_forward_slots(sglang_url)
    assert zero > 0 and computed_before > 0
    # The MoE forward ran exactly the real slots the routed-experts return reports, and skipped every zero slot.
    assert (computed - computed_before, skipped - skipped_before) == (real, zero)


SEQUENCES = [[1, 5, 9, 13, 2, 40, 77, 301], [1, 7, 3, 900, 12]]


def served_logprobs(url: str, model: str, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Log-probs of tokens 1.. of each sequence, from the server's echo scoring."""
    body = {"model": model, "prompt": sequences, "echo": True, "max_tokens": 0, "logprobs": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [torch.tensor(c["logprobs"]["token_logprobs"][1:]) for c in response.json()["choices"]]


def zeda_core_logprobs(checkpoint: Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The same log-probs from ``zeda_core.load_model`` in float32."""
    model = load_model(checkpoint, dtype=torch.float32).eval()
    scores = []
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([sequence])
            scores.append(token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0])
    return scores


def assert_serves(url: str, model: str, checkpoint: Path) -> None:
    served, reference = served_logprobs(url, model, SEQUENCES), zeda_core_logprobs(checkpoint, SEQUENCES)
    for got, expected in zip(served, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_glm(tmp_path_factory) -> Path:
    """A random GLM4-MoE-Lite (sigmoid routing, correction bias, a shared expert, MLA) with 4 zero experts."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = FAMILIES["glm4_moe_lite"].tiny_config()
    config.vocab_size = 1024  # the committed tokenizer's
    model = AutoModelForCausalLM.from_config(config)
    inject_zero_experts(model, 4, init="gaussian", seed=0)
    return save_model(model, tmp_path_factory.mktemp("glm") / "glm", side_files_from=TINY_TEACHER)


def test_both_families_serve_the_log_probs_of_zeda_core(sglang_url: str, tiny_glm: Path) -> None:
    assert_serves(sglang_url, "tiny-zeda", TINY_ZEDA)
    with running_server(TINY_TEACHER, "--backend", "sglang", startup_timeout=SGLANG_START_S) as url:
        assert_serves(url, "tiny-teacher", TINY_TEACHER)  # the plain class: fused experts and tied embeddings
    with running_server(tiny_glm, "--backend", "sglang", startup_timeout=SGLANG_START_S) as url:
        assert_serves(url, "glm", tiny_glm)
        usage = httpx.post(
            f"{url}/v1/completions", json={"model": "glm", "prompt": [1, 5, 9], "max_tokens": 8}, timeout=120
        ).json()["usage"]["zeda"]
        assert usage["zero_expert_ratio"] > 0


def test_tensor_parallel_ranks_give_the_same_greedy_replies(torch_url: str) -> None:
    with running_server(TINY_ZEDA, "--backend", "sglang", "--tp-size", "2", startup_timeout=SGLANG_START_S) as url:
        for prompt in PROMPTS[:3]:
            expected, got = chat(torch_url, prompt), chat(url, prompt)
            assert got.choices[0].message.content == expected.choices[0].message.content, prompt
            assert_same_usage(got.usage.model_extra["zeda"], expected.usage.model_extra["zeda"])


ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def swap_candidates(tmp_path_factory) -> dict[str, Path]:
    """Retrained router rows of tiny-zeda, all weights changed, and a candidate with a NaN gate."""
    root = tmp_path_factory.mktemp("sglang-candidates")
    generator = torch.Generator().manual_seed(3)
    model = load_model(TINY_ZEDA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.gate.zero_logit_bias")):  # every router weight
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    router = save_model(model, root / "router", side_files_from=TINY_ZEDA)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.0 + 0.05 * torch.randn(param.shape, generator=generator))
    everything = save_model(model, root / "all", side_files_from=TINY_ZEDA)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))[0, 0] = float("nan")
    nan = save_model(model, root / "nan", side_files_from=TINY_ZEDA)
    return {"router": router, "all": everything, "nan": nan}


def test_swaps_and_rollback_serve_the_candidates_weights(swap_candidates: dict[str, Path]) -> None:
    """Router rows through update_weights_from_tensor, whole checkpoints from disk, each really served."""
    with running_server(TINY_ZEDA, "--backend", "sglang", "--admin-key", "admin-secret", startup_timeout=600) as url:

        def swap(checkpoint: Path, scope: str) -> httpx.Response:
            body = {"checkpoint": str(checkpoint), "scope": scope}
            return httpx.post(f"{url}/admin/swap", json=body, headers=ADMIN, timeout=600)

        original = httpx.get(f"{url}/health").json()["system_fingerprint"]
        for scope in ("router", "all"):
            refused = swap(swap_candidates["nan"], scope)
            assert refused.status_code == 422 and "non-finite" in refused.json()["error"]["message"]
        assert_serves(url, "tiny-zeda", TINY_ZEDA)

        routed = swap(swap_candidates["router"], "router")
        assert routed.status_code == 200, routed.text
        assert routed.json()["current"]["scope"] == "router" and routed.json()["previous"]["fingerprint"] == original
        assert_serves(url, "tiny-zeda", swap_candidates["router"])  # only its router rows differ from tiny-zeda

        whole = swap(swap_candidates["all"], "all")
        assert whole.status_code == 200, whole.text
        assert_serves(url, "tiny-zeda", swap_candidates["all"])

        back = httpx.post(f"{url}/admin/rollback", headers=ADMIN, timeout=600)
        assert back.status_code == 200 and back.json()["current"] == routed.json()["current"]
        assert_serves(url, "tiny-zeda", swap_candidates["router"])
        assert chat(url, PROMPTS[0]).system_fingerprint == routed.json()["current"]["fingerprint"]


@pytest.fixture(scope="module")
def guarded_sglang_url():
    """The SGLang backend under the settings of the torch backend's HTTP suite (key, name, cap)."""
    flags = ("--api-key", API_KEY, "--served-model-name", "student", "--max-tokens-cap", "64")
    with running_server(TINY_ZEDA, "--backend", "sglang", *flags, startup_timeout=SGLANG_START_S) as url:
        yield url


@pytest.mark.parametrize(("path", "body", "status", "fragment"), INVALID_REQUESTS)
def test_bad_input_gets_the_same_4xx_as_on_the_torch_backend(
    guarded_sglang_url: str, path: str, body, status: int, fragment: str
) -> None:
    assert_refused(guarded_sglang_url, path, body, status, fragment)
