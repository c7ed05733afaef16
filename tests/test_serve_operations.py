"""Operating a real ``zeda serve``: SIGTERM drain with streams in flight, readiness, deadlines, request logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from sglang_guard import sglang_marks, sglang_test

from zeda_server.launch import server_process

# The session's small ZEDA model (conftest): its greedy completions run to max_tokens, so the
# streams are still going when the signal arrives.
STREAMS = 8
LONG_TOKENS = 300
SHUTDOWN_TIMEOUT_S = 120.0


async def _stream(client: httpx.AsyncClient, url: str, index: int, started: asyncio.Event, count: list[int]) -> dict:
    """One streamed completion; returns its status, finish reason, and any error chunk."""
    body = {
        "model": "student",
        "prompt": f"Sort: {index} 9 4",  # greedy decoding of this prompt runs to max_tokens
        "max_tokens": LONG_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    finish, error, done, counted = None, None, False, False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                error = chunk["error"]
                continue
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                finish = chunk["choices"][0]["finish_reason"]
            if not counted and chunk["choices"] and chunk["choices"][0]["text"]:
                counted, count[0] = True, count[0] + 1
                if count[0] == STREAMS:  # every stream is producing text
                    started.set()
    return {"status": response.status_code, "finish": finish, "error": error, "done": done}


async def _streams_then_signal(url: str, process, during_drain, group: bool = False) -> tuple[list[dict], dict]:
    """Start STREAMS streams, SIGTERM the server (``group``: its whole process group, SGLang's subprocesses
    included, as systemd's default ``KillMode`` does) once they all produce text, probe it while it drains."""
    started, count = asyncio.Event(), [0]
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [asyncio.create_task(_stream(client, url, i, started, count)) for i in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 300)
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        probes = await during_drain(client, url)
        return list(await asyncio.gather(*tasks)), probes


async def _probe(client: httpx.AsyncClient, url: str) -> dict:
    body = {"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    late = await client.post(f"{url}/v1/chat/completions", json=body)
    return {
        "late": (late.status_code, late.headers.get("retry-after"), late.json()),
        "ready": ((ready := await client.get(f"{url}/ready")).status_code, ready.json()),
        "health": (await client.get(f"{url}/health")).status_code,
    }


@pytest.mark.parametrize("backend", ["torch", pytest.param("sglang", marks=[*sglang_marks(), pytest.mark.slow])])
def test_sigterm_drains_every_stream_then_exits_0(backend: str, small_student: Path, tmp_path: Path) -> None:
    """On SGLang the signal reaches every process of the group: its subprocesses must leave the exit to the server."""
    db = tmp_path / "capture.db"
    flags = ("--backend", backend, "--capture-db", str(db), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    with server_process(small_student, *flags, startup_timeout=600) as (url, process, log):
        assert httpx.get(f"{url}/ready", timeout=10).json() == {"ready": True, "state": "ready", "in_flight": 0}
        signalled = time.monotonic()
        streams, probes = asyncio.run(_streams_then_signal(url, process, _probe, group=backend == "sglang"))
        code = process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        log.seek(0)
        output = log.read()
    assert code == 0, output[-3000:]
    assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT_S
    assert all(s["status"] == 200 and s["finish"] in {"stop", "length"} and s["done"] for s in streams), streams
    assert not any(s["error"] for s in streams)
    status, retry_after, body = probes["late"]
    assert status == 503 and retry_after and body["error"]["code"] == "server_shutting_down"
    assert probes["ready"][0] == 503 and probes["ready"][1]["state"] == "draining"
    assert probes["ready"][1]["in_flight"] >= 1 and probes["health"] == 200
    assert "drained (0 requests cancelled" in output
    with sqlite3.connect(db) as captured:  # every finished stream was captured before the exit
        assert captured.execute("SELECT COUNT(*) FROM captures").fetchone()[0] == STREAMS


async def _probe_nothing(client: httpx.AsyncClient, url: str) -> dict:
    return {}


def test_a_drain_past_its_timeout_ends_streams_with_an_error_chunk(small_student: Path) -> None:
    with server_process(small_student, "--shutdown-timeout", "0.5") as (url, process, log):
        streams, _ = asyncio.run(_streams_then_signal(url, process, _probe_nothing))
        code = process.wait(timeout=60)
        log.seek(0)
        output = log.read()
    assert code == 0, output[-3000:]
    cut = [s for s in streams if s["error"]]
    assert cut and all(s["error"]["code"] == "server_shutting_down" and s["done"] for s in cut)
    assert f"drained ({len(cut)} requests cancelled" in output


def test_request_deadline_answers_504_or_ends_the_stream(small_student: Path) -> None:
    with server_process(small_student, "--request-timeout", "0.3") as (url, _process, _log):
        body = {"model": "student", "prompt": "Sort: 3 1 2", "max_tokens": 900, "temperature": 0}
        late = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert late.status_code == 504 and late.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=60) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
        assert lines[-1] == "data: [DONE]"
        short = httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 2}, timeout=60)
        assert short.status_code == 200
        assert httpx.get(f"{url}/ready", timeout=10).json()["in_flight"] == 0


def _log_lines(log) -> list[dict]:
    log.seek(0)
    return [json.loads(line) for line in log.read().splitlines() if line.startswith('{"request_id"')]


def test_request_id_is_echoed_and_every_request_logs_one_json_line(small_student: Path) -> None:
    with server_process(small_student) as (url, _process, log):
        body = {"model": "student", "prompt": "Sort: 3 1 2", "max_tokens": 5, "temperature": 0}
        given = httpx.post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": "job-42"}, timeout=60)
        assert given.status_code == 200 and given.headers["x-request-id"] == "job-42"
        made = httpx.post(f"{url}/v1/completions", json=body | {"stream": True}, timeout=60)
        assert made.status_code == 200 and len(made.headers["x-request-id"]) == 32
        bad = httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": -1}, headers={"X-Request-Id": "b"})
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "b"
        httpx.get(f"{url}/health", timeout=10)  # probes are not logged
        time.sleep(0.5)
        lines = {line["request_id"]: line for line in _log_lines(log)}
    usage = given.json()["usage"]
    assert lines["job-42"] | {"latency_s": 0} == {
        "request_id": "job-42",
        "method": "POST",
        "path": "/v1/completions",
        "status": 200,
        "latency_s": 0,
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "zero_expert_ratio": pytest.approx(usage["zeda"]["zero_expert_ratio"]),
        "disconnected": False,
    }
    streamed = lines[made.headers["x-request-id"]]
    assert streamed["status"] == 200 and streamed["completion_tokens"] == 5 and not streamed["disconnected"]
    assert lines["b"]["status"] == 400 and "completion_tokens" not in lines["b"]
    assert len(lines) == 3


async def _requests_while_the_engine_dies(url: str, kill=None) -> tuple[list[httpx.Response], float]:
    """One long request runs (max_batch 1), seven wait behind it; the engine dies meanwhile (``kill()``
    is called once they are all sent, when given)."""
    body = {"model": "student", "prompt": "Sort: 5 2 9", "max_tokens": 400, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:
        started = time.monotonic()
        sent = [asyncio.create_task(client.post(f"{url}/v1/completions", json=body)) for _ in range(8)]
        if kill is not None:
            await asyncio.sleep(1.0)
            started = time.monotonic()
            kill()
        answers = await asyncio.gather(*sent)
        return list(answers), time.monotonic() - started


def test_a_dead_engine_thread_turns_readiness_false_and_answers_503(small_student: Path) -> None:
    entry = (str(Path(__file__).with_name("faulty_engine_serve.py")),)
    with server_process(small_student, "--max-batch", "1", entry=entry) as (url, _process, _log):
        answers, seconds = asyncio.run(_requests_while_the_engine_dies(url))
        ready = httpx.get(f"{url}/ready", timeout=10)
        late = httpx.post(f"{url}/v1/completions", json={"model": "student", "prompt": "hi"}, timeout=10)
        health = httpx.get(f"{url}/health", timeout=10)
    assert seconds < 5.0 + 2.0  # the fault comes within a second of the first request
    assert [a.status_code for a in answers] == [503] * 8
    assert all(a.json()["error"]["code"] == "engine_unavailable" for a in answers)
    assert "fault injected in the forward" in answers[0].json()["error"]["message"]
    assert ready.status_code == 503 and ready.json()["state"] == "failed"
    assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable"
    assert health.status_code == 503 and health.json()["status"] == "failed"  # only a restart mends it


def _server_resources(url: str, pid: int) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {
        name: float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))
        for name in ("zeda_running_requests", "zeda_queue_depth", "zeda_event_loop_tasks")
    }
    values["in_flight"] = httpx.get(f"{url}/ready", timeout=10).json()["in_flight"]
    values["fds"] = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return values


async def _open_and_drop_streams(url: str, count: int) -> int:
    """Open ``count`` long streams, read each one's first chunk, then disconnect them all."""
    body = {"model": "student", "prompt": "Sort: 8 1 6", "max_tokens": 400, "temperature": 0, "stream": True}
    opened = 0
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=count)) as client:
        streams = [client.stream("POST", f"{url}/v1/completions", json=body) for _ in range(count)]
        responses = await asyncio.gather(*(s.__aenter__() for s in streams))
        for response in responses:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    opened += 1
                    break
        for stream in streams:
            await stream.__aexit__(None, None, None)
    return opened


def test_200_dropped_streams_leave_no_rows_tasks_or_descriptors(small_student: Path) -> None:
    flags = ("--max-batch", "256", "--max-queue", "512")  # all 200 decode at once: each round is one wave
    with server_process(small_student, *flags) as (url, process, _log):

        def drop_streams_and_settle() -> dict[str, float]:
            assert asyncio.run(_open_and_drop_streams(url, 200)) == 200
            deadline = time.monotonic() + 30
            while _server_resources(url, process.pid)["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # the closed sockets' last callbacks
            return _server_resources(url, process.pid)

        # The first round opens what the server creates once, lazily (sse-starlette's watcher task, worker
        # threads' descriptors); a leak shows as growth between the rounds, one per stream.
        before = drop_streams_and_settle()
        after = drop_streams_and_settle()
    assert after["in_flight"] == after["zeda_running_requests"] == after["zeda_queue_depth"] == 0
    assert after["zeda_event_loop_tasks"] <= before["zeda_event_loop_tasks"]
    # A leak is one descriptor per stream (+200); the slack covers a probe connection the server is still closing.
    assert after["fds"] <= before["fds"] + 2, (before, after)


def test_a_request_past_the_kv_token_cap_is_refused_with_400(small_student: Path) -> None:
    with server_process(small_student, "--max-total-tokens", "64") as (url, _process, _log):
        body = {"model": "student", "prompt": "Sort: 3 1 2", "max_tokens": 60}
        refused = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        served = httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 8}, timeout=60)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "max_tokens" and "--max-total-tokens 64" in error["message"]
    assert served.status_code == 200


@sglang_test
def test_a_dead_sglang_scheduler_answers_503_instead_of_resetting_connections(small_student: Path) -> None:
    import psutil  # an SGLang dependency

    flags = ("--backend", "sglang", "--max-batch", "1")
    with server_process(small_student, *flags, startup_timeout=600) as (url, process, _log):
        warm_up = {"model": "student", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=warm_up, timeout=60).status_code == 200

        def kill_scheduler() -> None:
            children = psutil.Process(process.pid).children(recursive=True)
            (scheduler,) = [c for c in children if "scheduler" in " ".join(c.cmdline())]
            scheduler.kill()

        answers, seconds = asyncio.run(_requests_while_the_engine_dies(url, kill_scheduler))
        ready = httpx.get(f"{url}/ready", timeout=10)
        late = httpx.post(f"{url}/v1/completions", json=warm_up, timeout=10)
        health = httpx.get(f"{url}/health", timeout=10)
        alive = process.poll() is None
    assert seconds < 5.0
    assert [a.status_code for a in answers] == [503] * 8
    assert all(a.json()["error"]["code"] == "engine_unavailable" for a in answers)
    assert ready.status_code == 503 and ready.json()["state"] == "failed"
    assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable"
    assert health.status_code == 503 and alive  # it answers, and the orchestrator restarts it
