"""The compute dial: per-request ``zero_expert_bias``, named tiers, the server target controller, load mode.

The routing and controller pieces are checked directly; everything a client sees goes through a
real ``zeda serve`` process.
"""

import asyncio
import contextlib
import json
import math
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from zeda_core import inject_zero_experts, load_model, route, save_model
from zeda_core.chat import chat_prompt_ids
from zeda_core.flops import FlopReport
from zeda_core.spec import RoutingSpec
from zeda_server.compute_dial import LOAD_STEP, ComputeDial, PiController, SlotWindow, parse_tiers
from zeda_server.engine import TorchEngine
from zeda_server.engine_api import SamplingParams
from zeda_server.launch import running_server
from zeda_trainer.common.generation import generate
from zeda_trainer.data.packing import read_jsonl

TINY_ZEDA = Path(__file__).resolve().parents[1] / "models" / "tiny-zeda"
MODEL = "tiny-zeda"
SWEEP = [-40.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0]


def _spec(score_func: str, n: int = 8, z: int = 4, k: int = 2) -> RoutingSpec:
    sigmoid = score_func == "sigmoid"
    return RoutingSpec(n, z, k, score_func, norm_topk_prob=True, selection_bias=sigmoid)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_offset_moves_only_the_zero_columns(score_func: str) -> None:
    torch.manual_seed(0)
    spec = _spec(score_func)
    logits = torch.randn(64, spec.num_rows)
    bias = torch.zeros(spec.num_rows) if spec.selection_bias else None
    ratios = []
    for offset in SWEEP:
        routing = route(logits, spec, selection_bias=bias, zero_offset=torch.full((64,), offset))
        ratios.append(float(routing.zero_mask.float().mean()))
    assert ratios[0] == 0.0 and ratios[-1] > ratios[SWEEP.index(0.0)]
    assert ratios == sorted(ratios)
    plain = route(logits, spec, selection_bias=bias)
    zero = route(logits, spec, selection_bias=bias, zero_offset=torch.zeros(64))
    assert torch.equal(plain.topk_ids, zero.topk_ids) and torch.equal(plain.topk_weights, zero.topk_weights)
    # Per token: row 0 at -40 never takes a zero slot, row 1 at +40 takes only zero slots.
    offsets = torch.zeros(64)
    offsets[0], offsets[1] = -40.0, 40.0
    mixed = route(logits, spec, selection_bias=bias, zero_offset=offsets)
    assert not mixed.zero_mask[0].any() and mixed.zero_mask[1].all()
    assert torch.equal(mixed.topk_ids[2:], plain.topk_ids[2:])


def test_pi_controller_steps_and_output_are_bounded() -> None:
    controller = PiController(kp=1.0, ki=10.0, max_step=0.5, low=-2.0, high=2.0)
    outputs = [controller.update(1.0) for _ in range(10)]
    assert outputs[:4] == [0.5, 1.0, 1.5, 2.0] and outputs[-1] == 2.0
    assert controller.update(-1.0) == 1.5  # out of saturation at once: the velocity form winds up nothing


def test_slot_window_keeps_the_last_tokens() -> None:
    window = SlotWindow(max_tokens=100)
    window.add(60, 10, 10)
    window.add(60, 20, 0)
    assert window.tokens == 120 and window.zero_ratio == 10 / 40
    window.add(50, 0, 20)  # the first part leaves: the rest hold 110 >= 100 tokens
    assert window.tokens == 110 and window.zero_ratio == 20 / 40


def _report(tokens: int, ratio: float) -> FlopReport:
    """A finished request of ``tokens`` tokens (8 slots each) that spent ``ratio`` of its slots on zero experts."""
    zero = round(tokens * 8 * ratio)
    return FlopReport(tokens, tokens * 8 - zero, zero, (), 0, 0, 0, 0)


def test_controller_tracks_a_target_across_a_traffic_shift() -> None:
    """A simulated plant whose r_ze curve (as steep as the tiny model's) shifts by 2 logits halfway."""
    dial = ComputeDial(target=0.45)
    halves = []
    for shift in (1.0, -1.0):
        ratios = []
        for _ in range(200):
            report = _report(40, 1.0 / (1.0 + math.exp(-2.0 * (dial.offset + shift))))
            dial.observe(report)
            ratios.append(report.zero_expert_ratio)
        halves.append(sum(ratios[100:]) / 100)
    assert all(abs(ratio - 0.45) < 0.02 for ratio in halves), halves


def test_load_offset_rises_with_the_queue_and_falls_when_it_drains() -> None:
    dial = ComputeDial(target=0.5, adaptive="queue", queue_threshold=4, max_load_offset=1.2)
    dial.on_queue(10)
    assert dial.load_offset == LOAD_STEP
    for _ in range(10):
        dial.on_queue(10)
    assert dial.load_offset == 1.2
    before = dial.controller.output
    for _ in range(20):  # the controller holds while the load part is up
        dial.observe(_report(100, 0.9))
    assert dial.controller.output == before
    dial.on_queue(2)
    assert dial.load_offset == 1.2  # between the threshold and empty: hold
    for _ in range(10):
        dial.on_queue(0)
    assert dial.load_offset == 0.0


@pytest.mark.parametrize(
    ("text", "error"),
    [("fast", "name=offset"), ("fast=x", "name=offset"), ("a=1,a=2", "twice"), ("a=1e9", "<= 100"), ("a=nan", "")],
)
def test_bad_tiers_are_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_tiers(text)
    assert parse_tiers(" fast=2, quality=-30 ") == {"fast": 2.0, "quality": -30.0}


# -- a real server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with running_server(TINY_ZEDA, "--compute-tiers", "fast=2,quality=-30", "--max-batch", "16") as url:
        yield url


def _chat(url: str, content: str, max_tokens: int = 12, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/chat/completions", json=body | {"temperature": 0} | extra, timeout=120)


def _zeda(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["zeda"]


def test_offsets_apply_per_row_in_a_shared_batch(server: str) -> None:
    """One stream at -40 runs beside three at +4: it takes no zero slot, they take many."""

    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as client, contextlib.AsyncExitStack() as streams:
            responses = []
            for bias in (-40.0, 4.0, 4.0, 4.0):
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Copy: a b c d e f g h"}],
                    "max_tokens": 24,
                    "temperature": 0,
                    "stream": True,
                    "zero_expert_bias": bias,
                }
                responses.append(
                    await streams.enter_async_context(client.stream("POST", f"{server}/v1/chat/completions", json=body))
                )
            usages = []
            for response in responses:
                chunks = [
                    json.loads(line[5:])
                    async for line in response.aiter_lines()
                    if line.startswith("data:") and "[DONE]" not in line
                ]
                usages.append(chunks[-1]["usage"]["zeda"])
            return usages

    low, *high = asyncio.run(run())
    assert low["zero_slots"] == 0 and low["zero_expert_ratio"] == 0.0 and low["real_slots"] > 0
    assert all(zeda["zero_expert_ratio"] > 0.5 for zeda in high), high


def test_rows_with_different_offsets_share_one_forward(small_student: Path) -> None:
    """In the engine the server runs: four requests are prefilled and decoded as one batch, each at its own offset."""
    engine = TorchEngine(str(small_student), max_batch=8)
    try:
        prompt = engine.chat_prompt([{"role": "user", "content": "Copy: a b c d"}])
        rows: list[int] = []
        hook = engine.model.register_forward_pre_hook(
            lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )

        async def run() -> list:
            async def one(bias: float):
                final = None
                async for output in engine.submit(prompt, SamplingParams(8, 0.0, zero_expert_bias=bias)):
                    final = output
                return final.report

            return await asyncio.gather(*(one(bias) for bias in (-40.0, 4.0, 4.0, 4.0)))

        try:
            reports = asyncio.run(run())
        finally:
            hook.remove()
    finally:
        engine.shutdown()
    assert rows[0] == 4  # one prefill of all four rows
    assert reports[0].zero_slots == 0 and all(r.zero_expert_ratio > 0.5 for r in reports[1:])


def test_zero_expert_ratio_is_monotone_in_the_bias(server: str) -> None:
    prompts = ["What is 12 + 30?", "Reverse: abcdef", "Copy: zeda dial"]
    ratios = []
    for bias in SWEEP:
        usages = [_zeda(_chat(server, prompt, zero_expert_bias=bias)) for prompt in prompts]
        ratios.append(sum(u["zero_slots"] for u in usages) / sum(u["zero_slots"] + u["real_slots"] for u in usages))
    assert ratios[0] == 0.0 and ratios[-1] > 0.9
    assert ratios == sorted(ratios), ratios


def test_bias_zero_and_tiers_are_what_they_name(server: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_ZEDA)
    model = load_model(TINY_ZEDA)
    prompt = "What is 12 + 30?"
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    plain = _chat(server, prompt, max_tokens=16).json()
    at_zero = _chat(server, prompt, max_tokens=16, zero_expert_bias=0).json()
    (expected,) = generate(model, [ids], 16, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert at_zero["choices"] == plain["choices"]
    assert at_zero["choices"][0]["message"]["content"] == tokenizer.decode(expected.tokens, skip_special_tokens=True)
    assert at_zero["usage"] == plain["usage"]
    ratio = plain["usage"]["zeda"]["zero_expert_ratio"]
    for tier, bias in (("fast", 2.0), ("quality", -30.0)):
        by_tier = _chat(server, prompt, max_tokens=16, compute_tier=tier).json()["usage"]
        assert by_tier == _chat(server, prompt, max_tokens=16, zero_expert_bias=bias).json()["usage"]
        assert (by_tier["zeda"]["zero_expert_ratio"] > ratio) == (bias > 0), (tier, by_tier, ratio)


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        ({"zero_expert_bias": "x"}, "zero_expert_bias", "zero_expert_bias"),
        ({"zero_expert_bias": True}, "zero_expert_bias", "zero_expert_bias"),
        ({"zero_expert_bias": 1e9}, "zero_expert_bias", "less than or equal to 100"),
        ({"zero_expert_bias": -101}, "zero_expert_bias", "greater than or equal to -100"),
        ({"compute_tier": "turbo"}, "compute_tier", "unknown compute_tier 'turbo'; this server has: fast, quality"),
        ({"compute_tier": "fast", "zero_expert_bias": 1}, "compute_tier", "not both"),
    ],
)
def test_bad_dial_values_get_a_400(server: str, extra: dict, param: str, fragment: str) -> None:
    response = _chat(server, "hi", **extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and param in (error["param"] or error["message"])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_bias_gets_a_400(server: str, literal: str) -> None:
    body = (
        '{"model": "tiny-zeda", "messages": [{"role": "user", "content": "hi"}], "zero_expert_bias": ' + literal + "}"
    )
    response = httpx.post(
        f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400, response.text
    assert "zero_expert_bias" in response.text and "finite" in response.json()["error"]["message"]


def test_prompt_scoring_refuses_a_request_offset(server: str) -> None:
    body = {"model": MODEL, "prompt": "x y", "max_tokens": 0, "echo": True, "zero_expert_bias": 1.0}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "zero_expert_bias"


def test_a_router_only_student_at_minus_40_is_its_teacher(small_teacher: Path, tmp_path: Path) -> None:
    """Gaussian zero rows added, nothing trained: at -40 no slot goes to zero, so the student is the teacher."""
    student = load_model(small_teacher, zero_aware=False)
    inject_zero_experts(student, 4, init="gaussian", seed=0)
    path = save_model(student, tmp_path / "router-only", side_files_from=small_teacher)
    prompts = ["Sort: 4 2 9", "What is 7 + 8?", "Reverse: dial"]

    def served(model: Path, **extra) -> list[tuple[list[str], list[float], dict]]:
        out = []
        with running_server(model) as url:
            for prompt in prompts:
                body = {"model": model.name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1}
                response = httpx.post(f"{url}/v1/completions", json=body | extra, timeout=120)
                assert response.status_code == 200, response.text
                choice = response.json()["choices"][0]
                out.append(
                    (choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"], response.json()["usage"])
                )
        return out

    teacher = served(small_teacher)
    dialled = served(path, zero_expert_bias=-40.0)
    undialled = served(path)
    for (t_tokens, t_logprobs, _), (s_tokens, s_logprobs, usage) in zip(teacher, dialled, strict=True):
        assert s_tokens == t_tokens and usage["zeda"]["zero_slots"] == 0
        assert max(abs(a - b) for a, b in zip(s_logprobs, t_logprobs, strict=True)) < 1e-4
    assert any(usage["zeda"]["zero_slots"] > 0 for _, _, usage in undialled)


# -- the server target controller ------------------------------------------------------------------


@pytest.mark.slow
def test_target_holds_across_a_traffic_shift(small_data: Path, record_property) -> None:
    """Skills prompts, then code text: the served r_ze of each half lands within 0.05 of the target.

    The trained model spends r_ze 0.63 on skills and 0.26 on code, so the dial must move down,
    then up. The first ``settle`` requests of each half are the settling window; the test records
    how long they took (``compute_dial_target`` in the JUnit properties, and printed).
    """
    target, per_half, settle, workers = 0.45, 90, 40, 4
    skills = [
        row["prompt"]
        for split in ("test", "validation", "train")
        for row in read_jsonl(small_data / "skills" / f"{split}.jsonl")
    ]
    code = [
        row["text"][:120] for row in read_jsonl(small_data / "text" / "validation.jsonl") if row["domain"] == "code"
    ]
    assert len(skills) >= per_half and len(code) >= 20
    halves = {"skills": skills[:per_half], "code": [code[i % len(code)] for i in range(per_half)]}

    async def run_half(client: httpx.AsyncClient, url: str, prompts: list[str]) -> list[tuple[float, dict]]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for prompt in prompts:
            queue.put_nowait(prompt)
        done: list[tuple[float, dict]] = []

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}
                response = await client.post(f"{url}/v1/completions", json=body)
                assert response.status_code == 200, response.text
                done.append((time.monotonic(), response.json()["usage"]))

        await asyncio.gather(*(worker() for _ in range(workers)))
        return done

    async def run(url: str) -> dict[str, list[tuple[float, dict]]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return {name: await run_half(client, url, prompts) for name, prompts in halves.items()}

    flags = ("--target-zero-expert-ratio", str(target), "--zero-ratio-window-tokens", "512")
    with running_server(TINY_ZEDA, *flags) as url:
        started = time.monotonic()
        served = asyncio.run(run(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert f"zeda_target_zero_expert_ratio {target}" in metrics
    report = {}
    for name, done in served.items():
        settled = done[settle:]
        zero = sum(u["zeda"]["zero_slots"] for _, u in settled)
        ratio = zero / sum(u["zeda"]["zero_slots"] + u["zeda"]["real_slots"] for _, u in settled)
        report[name] = {"ratio": ratio, "settling_s": done[settle][0] - (done[0][0] if name == "code" else started)}
    record_property("compute_dial_target", json.dumps(report))
    print("compute dial target run:", report)
    assert all(abs(half["ratio"] - target) <= 0.05 for half in report.values()), report
