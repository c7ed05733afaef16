"""Router hot-swap on a running server: validation, admin auth, rollback, and a swap under streaming load.

Each test runs against both backends: the torch engine, and SGLang's real engine on CPU.
"""

import asyncio
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from sglang_guard import sglang_marks

from zeda_core.checkpoint import load_model, save_model
from zeda_server.launch import running_server

ADMIN_KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SGLANG_START_S = 600.0
LOAD_CLIENTS = 16
LONG_TOKENS = 400


@pytest.fixture(scope="module")
def candidates(small_student: Path, small_teacher: Path, tmp_path_factory) -> dict[str, Path]:
    """A good candidate (retrained router rows) and one broken candidate per check."""
    root = tmp_path_factory.mktemp("candidates")
    model = load_model(small_student)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    good = save_model(model, root / "good", side_files_from=small_student)

    def variant(name: str, edit) -> Path:
        path = root / name
        shutil.copytree(good, path)
        weights = path / "model.safetensors"
        state = load_file(weights)
        edit(state, weights)
        return path

    def nan_gate(state, weights):
        state["model.layers.0.mlp.gate.weight"][0, 0] = float("nan")
        save_file(state, weights)

    def wide_gate(state, weights):
        gate = state["model.layers.1.mlp.gate.weight"]
        state["model.layers.1.mlp.gate.weight"] = torch.cat([gate, gate[:, :1]], dim=1)
        save_file(state, weights)

    def truncate(state, weights):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])

    return {
        "good": good,
        "nan": variant("nan", nan_gate),
        "wrong_shape": variant("wrong-shape", wide_gate),
        "corrupt": variant("corrupt", truncate),
        "no_zero_experts": small_teacher,
    }


@pytest.fixture(scope="module", params=["torch", pytest.param("sglang", marks=[*sglang_marks(), pytest.mark.slow])])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(small_student: Path, backend: str):
    flags = ("--admin-key", ADMIN_KEY, "--max-batch", "32", "--backend", backend)
    with running_server(small_student, *flags, startup_timeout=SGLANG_START_S) as url:
        yield url


def _swaps(url: str, kind: str) -> float:
    """The server's ``zeda_model_swaps_total`` counter of ``kind`` (swap, rollback, rejected)."""
    match = re.search(rf'^zeda_model_swaps_total{{kind="{kind}"}} ([0-9.]+)$', httpx.get(f"{url}/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def _complete(url: str) -> dict:
    body = {"model": "student", "prompt": "What is 2 + 3?", "max_tokens": 4, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_bad_swaps_are_refused_and_the_server_keeps_serving(server: str, candidates: dict[str, Path]) -> None:
    before = _complete(server)["system_fingerprint"]
    rejected_before = _swaps(server, "rejected")
    good = {"checkpoint": str(candidates["good"]), "scope": "router"}

    missing = httpx.post(f"{server}/admin/swap", json=good, timeout=60)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.post(f"{server}/admin/swap", json=good, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    rollback = httpx.post(f"{server}/admin/rollback", headers=ADMIN, timeout=60)
    assert rollback.status_code == 409 and "no previous version" in rollback.json()["error"]["message"]

    reasons = {
        "nan": "non-finite",
        "wrong_shape": "has shape",
        "corrupt": "cannot read",
        "no_zero_experts": "routing spec differs",
    }
    for name, reason in reasons.items():
        for scope in ("router", "all"):
            body = {"checkpoint": str(candidates[name]), "scope": scope}
            response = httpx.post(f"{server}/admin/swap", json=body, headers=ADMIN, timeout=60)
            error = response.json()["error"]
            assert response.status_code == 422 and error["code"] == "checkpoint_rejected", (name, response.text)
            assert reason in error["message"], (name, error["message"])
            assert _complete(server)["system_fingerprint"] == before
    not_there = httpx.post(f"{server}/admin/swap", json={"checkpoint": "/nowhere"}, headers=ADMIN, timeout=60)
    assert not_there.status_code == 422 and "does not exist" in not_there.json()["error"]["message"]
    bad_scope = httpx.post(f"{server}/admin/swap", json=good | {"scope": "half"}, headers=ADMIN, timeout=60)
    assert bad_scope.status_code == 400 and bad_scope.json()["error"]["param"] == "scope"
    status = httpx.get(f"{server}/admin/status", headers=ADMIN, timeout=60).json()
    assert status["current"]["fingerprint"] == before and status["previous"] is None
    assert _swaps(server, "rejected") - rejected_before == 9  # 4 broken candidates x 2 scopes + one missing


async def _stream(client: httpx.AsyncClient, url: str, body: dict, on_first_chunk=None) -> dict:
    """One streamed completion: its status, finish reason, and (arrival time, fingerprint) of every chunk."""
    started = time.monotonic()
    chunks, status, finished = [], None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                status = 500
                continue
            chunks.append((time.monotonic(), chunk["system_fingerprint"]))
            if len(chunks) == 1 and on_first_chunk is not None:
                on_first_chunk()
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                finished = chunk["choices"][0]["finish_reason"]
    return {
        "started": started,
        "ended": time.monotonic(),
        "status": status,
        "end": finished,
        "chunks": chunks,
        "fps": {fp for _, fp in chunks},
    }


def _short(client_id: int, phase: str) -> dict:
    return {
        "model": "student",
        "prompt": f"Sort: {client_id} {phase} 9 4",
        "max_tokens": 24,
        "temperature": 1.0,
        "seed": client_id * 10 + len(phase),
    }


async def _client(url: str, client_id: int, mid_stream, swap_done: asyncio.Event) -> list[dict]:
    """A short request, a long one that is mid-stream when the swap starts, then a short one after the swap."""
    async with httpx.AsyncClient(timeout=300) as client:
        before = await _stream(client, url, _short(client_id, "before"))
        # Greedy decoding of this model does not stop early: the request lasts its max_tokens.
        long = {"model": "student", "prompt": f"Sort: {client_id} 9 4", "max_tokens": LONG_TOKENS, "temperature": 0}
        during = await _stream(client, url, long, on_first_chunk=mid_stream)
        await swap_done.wait()
        after = await _stream(client, url, _short(client_id, "after"))
    return [before, during, after]


def test_swap_under_streaming_clients_switches_version_without_failures(
    server: str, backend: str, candidates: dict[str, Path]
) -> None:
    old = _complete(server)["system_fingerprint"]
    swaps_before = {kind: _swaps(server, kind) for kind in ("swap", "rollback")}

    async def scenario():
        all_mid_stream, swap_done, waiting = asyncio.Event(), asyncio.Event(), [LOAD_CLIENTS]

        def mid_stream() -> None:
            waiting[0] -= 1
            if waiting[0] == 0:
                all_mid_stream.set()

        load = [asyncio.create_task(_client(server, c, mid_stream, swap_done)) for c in range(LOAD_CLIENTS)]
        await all_mid_stream.wait()  # every client has a long request streaming: swap now
        async with httpx.AsyncClient(timeout=300) as client:
            swap_sent = time.monotonic()
            body = {"checkpoint": str(candidates["good"]), "scope": "router"}
            response = await client.post(f"{server}/admin/swap", json=body, headers=ADMIN)
            swap_done_at = time.monotonic()
        swap_done.set()
        return response, swap_sent, swap_done_at, [r for task in load for r in await task]

    response, swap_sent, swap_done, records = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    new = response.json()["current"]["fingerprint"]
    assert new != old and response.json()["previous"]["fingerprint"] == old
    assert all(r["status"] == 200 and r["end"] in {"stop", "length"} for r in records)
    assert all(len(r["fps"]) == 1 for r in records)  # a request never changes version mid-stream
    before = [r for r in records if r["ended"] < swap_sent]
    after = [r for r in records if r["started"] > swap_done]
    assert len(before) >= LOAD_CLIENTS and len(after) == LOAD_CLIENTS and len(records) == 3 * LOAD_CLIENTS
    assert all(r["fps"] == {old} for r in before)
    assert all(r["fps"] == {new} for r in after)
    streaming_at_swap = [r for r in records if r["chunks"][0][0] < swap_sent < r["chunks"][-1][0]]
    assert streaming_at_swap and all(r["fps"] == {old} for r in streaming_at_swap)
    if backend == "torch":  # the new weights serve new requests while the old ones finish their streams
        in_flight = [r for r in streaming_at_swap if r["chunks"][-1][0] > swap_done]
        assert in_flight and all(fp == old for r in in_flight for at, fp in r["chunks"] if at > swap_done)
    else:  # SGLang swaps once the running requests have finished on the old weights
        assert all(r["ended"] <= swap_done for r in streaming_at_swap)

    rolled = httpx.post(f"{server}/admin/rollback", headers=ADMIN, timeout=60)
    assert rolled.status_code == 200 and rolled.json()["current"]["fingerprint"] == old
    assert rolled.json()["previous"]["fingerprint"] == new
    assert _complete(server)["system_fingerprint"] == old
    assert {kind: _swaps(server, kind) - count for kind, count in swaps_before.items()} == {"swap": 1, "rollback": 1}
    metrics = httpx.get(f"{server}/metrics", timeout=60).text
    assert f'fingerprint="{old}"' in metrics and "zeda_model_info" in metrics
    assert httpx.get(f"{server}/dashboard/stats", timeout=60).json()["model_version"] == old


def test_admin_api_is_disabled_without_an_admin_key(small_student: Path, candidates: dict[str, Path]) -> None:
    with running_server(small_student) as url:
        body = {"checkpoint": str(candidates["good"])}
        response = httpx.post(f"{url}/admin/swap", json=body, headers=ADMIN, timeout=60)
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"
