"""The OpenAI-compatible HTTP API end to end: a real ``zeda serve`` process and the official SDK."""

import asyncio
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch

from zeda_server.launch import running_server
from zeda_trainer.teacher import LocalTeacher, RemoteTeacher

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(small_student: Path):
    with running_server(small_student, "--api-key", API_KEY, "--max-tokens-cap", "64") as url:
        yield url


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


ZEDA_COUNTERS = {
    "expert_flops": "zeda_expert_flops_total",
    "expert_flops_saved": "zeda_expert_flops_saved_total",
    "dense_expert_flops": "zeda_dense_expert_flops_total",
}


def test_sdk_chat_stream_and_completions_with_usage_matching_metrics(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    before = {key: _metric(server, name) for key, name in ZEDA_COUNTERS.items()}
    usages = []

    chat = client.chat.completions.create(
        model="student", messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in {"stop", "length"} and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens <= 8 and chat.system_fingerprint.startswith("fp_")
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
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY)

    async def one(i: int) -> str | None:
        stream = await client.chat.completions.create(
            model="student",
            messages=[{"role": "user", "content": f"What is {i} + {i}?"}],
            max_tokens=12,
            temperature=1.0,
            seed=i,
            stream=True,
        )
        finish = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    async def run_all():
        return await asyncio.gather(*(one(i) for i in range(32)))

    assert all(f in {"stop", "length"} for f in asyncio.run(run_all()))


def test_remote_teacher_scores_like_the_local_one(server: str, small_student: Path) -> None:
    remote = RemoteTeacher(server, model="student", api_key=API_KEY)
    local = LocalTeacher(str(small_student), torch.device("cpu"), cache_size=0)
    sequences, starts = [[1, 5, 9, 13, 2, 40], [1, 7, 3]], [3, 1]
    for got, expected in zip(remote.score(sequences, starts), local.score(sequences, starts), strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)


CHAT = "/v1/chat/completions"
GOOD_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        (CHAT, b"{not json", 400, "not valid JSON"),
        (CHAT, {"model": "student", "messages": "hi"}, 400, "messages"),
        (CHAT, {"model": "nope", "messages": GOOD_MESSAGES}, 404, "does not exist"),
        (CHAT, {"model": "student", "messages": []}, 400, "messages"),
        (CHAT, {"model": "student", "messages": GOOD_MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
        (CHAT, {"model": "student", "messages": GOOD_MESSAGES, "max_tokens": 65}, 400, "cap"),
        (CHAT, {"model": "student", "messages": GOOD_MESSAGES, "temperature": -1}, 400, "temperature"),
        (CHAT, {"model": "student", "messages": GOOD_MESSAGES, "top_p": 0}, 400, "top_p"),
        (CHAT, {"model": "student", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context window"),
        (CHAT, {"model": "student", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ("/v1/completions", {"model": "student", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "student", "prompt": [1, 99999]}, 400, "token ids"),
        ("/v1/completions", {"model": "student", "prompt": "x", "max_tokens": 0}, 400, "echo"),
        ("/v1/completions", {"model": "student", "prompt": ["a", "b"], "stream": True}, 400, "single prompt"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_invalid_requests_get_openai_style_4xx(server: str, path: str, body, status: int, fragment: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if isinstance(body, bytes):
        response = httpx.post(server + path, content=body, headers=headers | {"content-type": "application/json"})
    else:
        response = httpx.post(server + path, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"].endswith("_error")


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
