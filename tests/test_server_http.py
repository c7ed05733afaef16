"""The OpenAI-compatible HTTP API end to end: a real ``zeda serve`` process and the official SDK."""

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from api_checks import API_KEY, CHAT, GOOD_MESSAGES, INVALID_REQUESTS, assert_refused
from transformers import AutoTokenizer

from zeda_core import load_model
from zeda_core.chat import chat_prompt_ids
from zeda_server.launch import running_server
from zeda_trainer.common.generation import generate
from zeda_trainer.common.teacher import LocalTeacher, RemoteTeacher


@pytest.fixture(scope="module")
def server(small_student: Path):
    with running_server(small_student, "--api-key", API_KEY, "--max-tokens-cap", "64") as url:
        yield url


def _metric(url: str, name: str) -> float:
    return _metric_from(httpx.get(f"{url}/metrics").text, name)


def _metric_from(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


ZEDA_COUNTERS = {
    "expert_flops": "zeda_expert_flops_total",
    "expert_flops_saved": "zeda_expert_flops_saved_total",
    "dense_expert_flops": "zeda_dense_expert_flops_total",
}


def test_sdk_chat_stream_and_completions_with_usage_matching_metrics(server: str, small_student: Path) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    before = {key: _metric(server, name) for key, name in ZEDA_COUNTERS.items()}
    usages = []

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    chat = client.chat.completions.create(model="student", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].finish_reason in {"stop", "length"} and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens <= 8 and chat.system_fingerprint.startswith("fp_")
    # The reply is the model's own greedy continuation of the templated chat, as the reference loop decodes it.
    tokenizer = AutoTokenizer.from_pretrained(small_student)
    prompt = chat_prompt_ids(tokenizer, messages)
    (greedy,) = generate(load_model(small_student), [prompt], 8, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert chat.choices[0].message.content == tokenizer.decode(greedy.tokens, skip_special_tokens=True)
    assert chat.choices[0].finish_reason == greedy.finish_reason
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(prompt), len(greedy.tokens))
    usages.append(chat.usage.model_extra["zeda"])

    stream = client.chat.completions.create(
        model="student",
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content  # greedy: the same answer streamed or not
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    usages.append(chunks[-1].usage.model_extra["zeda"])

    completion = client.completions.create(model="student", prompt="def add(a, b):", max_tokens=10, temperature=0)
    assert completion.choices[0].finish_reason in {"stop", "length"}
    usages.append(completion.usage.model_extra["zeda"])

    plain_stream = list(
        client.completions.create(
            model="student", prompt="import os", max_tokens=5, temperature=0.7, stream=True, seed=3
        )
    )
    assert plain_stream[-1].choices[0].finish_reason in {"stop", "length"}
    usages.append(plain_stream[-1].usage.model_extra["zeda"])  # without include_usage the finishing chunk carries it

    for usage in usages:
        assert usage["expert_flops"] + usage["expert_flops_saved"] == usage["dense_expert_flops"]
        assert 0.0 < usage["zero_expert_ratio"] < 1.0
    after = {key: _metric(server, name) for key, name in ZEDA_COUNTERS.items()}
    for key in ZEDA_COUNTERS:
        assert after[key] - before[key] == pytest.approx(sum(u[key] for u in usages), rel=1e-9)
    assert 0.0 < _metric(server, "zeda_zero_expert_ratio") < 1.0


def test_32_concurrent_streams_complete(server: str) -> None:
    """32 sampled streams at once: each one gets its own text and usage, the same as when sent alone."""
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY)

    def request(i: int) -> dict:
        messages = [{"role": "user", "content": f"What is {i} + {i}?"}]
        return {"model": "student", "messages": messages, "max_tokens": 12, "temperature": 1.0, "seed": i}

    async def one(i: int) -> tuple[str, str | None, dict]:
        stream = await client.chat.completions.create(**request(i), stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        return text, finish, usage

    peak, streaming = [0], threading.Event()

    def watch_running() -> None:  # the engine's running rows, while the streams are open
        with httpx.Client(base_url=server, timeout=30) as watcher:
            while streaming.is_set():
                peak[0] = max(peak[0], _metric_from(watcher.get("/metrics").text, "zeda_running_requests"))

    async def run_all():
        return await asyncio.gather(*(one(i) for i in range(32)))

    streaming.set()
    watcher = threading.Thread(target=watch_running)
    watcher.start()
    try:
        results = asyncio.run(run_all())
    finally:
        streaming.clear()
        watcher.join()
    assert all(f in {"stop", "length"} for _, f, _ in results)
    assert peak[0] > 1  # they were decoded together
    alone = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    for i, (text, finish, usage) in enumerate(results):
        single = alone.chat.completions.create(**request(i))
        assert (text, finish) == (single.choices[0].message.content, single.choices[0].finish_reason), i
        assert usage == single.usage.model_dump(), i  # the FLOPs attributed to each request are its own
    assert len({text for text, _, _ in results}) > 1


def test_remote_teacher_scores_like_the_local_one(server: str, small_student: Path) -> None:
    remote = RemoteTeacher(server, model="student", api_key=API_KEY)
    local = LocalTeacher(str(small_student), torch.device("cpu"), cache_size=0)
    sequences, starts = [[1, 5, 9, 13, 2, 40], [1, 7, 3]], [3, 1]
    for got, expected in zip(remote.score(sequences, starts), local.score(sequences, starts), strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("path", "body", "status", "fragment"), INVALID_REQUESTS)
def test_invalid_requests_get_openai_style_4xx(server: str, path: str, body, status: int, fragment: str) -> None:
    assert_refused(server, path, body, status, fragment)


@pytest.mark.parametrize(("header", "code"), [(None, "missing_api_key"), ("Bearer wrong", "invalid_api_key")])
def test_api_key_is_required(server: str, header: str | None, code: str) -> None:
    headers = {"Authorization": header} if header else {}
    response = httpx.post(f"{server}{CHAT}", json={"model": "student", "messages": GOOD_MESSAGES}, headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == code
    assert httpx.get(f"{server}/health").status_code == 200  # health stays open


def test_body_size_limit(server: str) -> None:
    big = {"model": "student", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    response = httpx.post(f"{server}{CHAT}", json=big, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_models_and_dashboard_feed(server: str) -> None:
    models = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert models["data"][0]["id"] == "student"
    assert "<canvas" in httpx.get(f"{server}/dashboard").text
    stats = httpx.get(f"{server}/dashboard/stats").json()
    assert {"zero_expert_ratio", "expert_flops_saved", "tokens_per_s", "queue_depth"} <= set(stats)


def test_stop_strings_cut_the_text_through_the_real_tokenizer(server: str) -> None:
    """A stop string that spans two tokens ends the request there, streamed or not, and is never shown."""
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def body(**fields) -> dict:
        return {"model": "student", "prompt": "Copy: a b c d", "max_tokens": 40, "temperature": 1.0} | fields

    def complete(**fields) -> dict:
        response = httpx.post(f"{server}/v1/completions", json=body(**fields), headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    for seed in range(20):  # a sample with a boundary between two printable, non-space characters
        full = complete(seed=seed, logprobs=0)["choices"][0]
        text, tokens = full["text"], full["logprobs"]["tokens"]
        spans = [
            (j, tokens[j][-1] + tokens[j + 1][0])
            for j in range(len(tokens) - 1)
            if tokens[j] and tokens[j + 1] and (tokens[j][-1] + tokens[j + 1][0]).isprintable()
        ]
        spans = [
            (j, stop) for j, stop in spans if stop.strip() == stop and "\ufffd" not in stop and text.find(stop) > 0
        ]
        if spans:
            break
    assert spans, "no sample had a usable token boundary"
    j, stop = spans[0]
    expected = text[: text.find(stop)]

    stopped = complete(seed=seed, stop=[stop])
    assert stopped["choices"][0]["text"] == expected and stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] <= j + 2  # generation ended at the stop, not only the text

    streamed, finish = "", None
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body(seed=seed, stop=[stop], stream=True), headers=headers
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                streamed += choice["text"]
                finish = choice["finish_reason"] or finish
    assert streamed == expected and finish == "stop"  # held back while it could still become the stop string


LONG_STREAM = {"model": "student", "prompt": "Sort: 1 2 9 4", "max_tokens": 1000, "temperature": 0, "stream": True}


async def _first_chunk(lines: AsyncIterator[str]) -> dict:
    async for line in lines:
        if line.startswith("data: "):
            return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended before its first chunk")


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_row(small_student: Path) -> None:
    """Two rows, two places: a third request is refused; a client leaving mid-stream gives its place back."""
    short = {"model": "student", "prompt": "What is 1 + 1?", "max_tokens": 2, "temperature": 0}

    async def running(client: httpx.AsyncClient) -> float:
        return _metric_from((await client.get("/metrics")).text, "zeda_running_requests")

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            kept_started, kept_ended = asyncio.Event(), asyncio.Event()

            async def kept_stream() -> None:  # greedy: this model does not stop before max_tokens
                async with client.stream("POST", "/v1/completions", json=LONG_STREAM) as response:
                    lines = response.aiter_lines()
                    await _first_chunk(lines)
                    kept_started.set()
                    async for _ in lines:
                        pass
                kept_ended.set()

            kept = asyncio.create_task(kept_stream())
            await kept_started.wait()
            async with client.stream("POST", "/v1/completions", json=LONG_STREAM) as leaving:
                lines = leaving.aiter_lines()  # held: closing this iterator would close the connection
                await _first_chunk(lines)
                busy = await client.post("/v1/completions", json=short)
                assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
                assert busy.json()["error"]["code"] == "queue_full"
            # The client left after one chunk of its 1000 tokens: its row goes while the kept stream still runs.
            async with asyncio.timeout(60):
                while await running(client) > 1:
                    await asyncio.sleep(0.01)
            served = await client.post("/v1/completions", json=short)
            assert served.status_code == 200 and not kept_ended.is_set(), served.text
            kept.cancel()  # the second client leaves too
            with contextlib.suppress(asyncio.CancelledError):
                await kept
            async with asyncio.timeout(60):
                while await running(client) > 0:
                    await asyncio.sleep(0.01)
            # Only the short request finished: the streams that left were never run to the end.
            metrics = (await client.get("/metrics")).text
            assert _metric_from(metrics, "zeda_completion_tokens_total") == served.json()["usage"]["completion_tokens"]

    with running_server(small_student, "--max-batch", "2", "--max-queue", "2") as url:
        asyncio.run(scenario(url))
