"""The image for real: docker run, health, a non-root user, drain on docker stop, config errors, compose + A/B.

Marked ``docker`` (not in the default suite): ``docker/smoke.sh`` builds the image and runs
``pytest -m docker tests/test_docker_run.py`` with ``ZEDA_DOCKER_IMAGE`` set. Every container uses the
host network and the server listens on loopback only (``ZEDA_HOST=127.0.0.1``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from zeda_server.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("ZEDA_DOCKER_IMAGE", "zeda:cpu")
COMPOSE_CPU = ROOT / "docker" / "compose.cpu.yml"
MODEL = ROOT / "models" / "tiny-zeda"
START_S = 180.0  # image start to /health on a loaded 2-core machine
CONFIG_ERROR_S = 90.0  # a bad configuration ends the container within this (13 s measured, mostly imports)
# Fast health checks at run time (the image's own: 30 s interval, 180 s start period).
HEALTH_FLAGS = ("--health-interval", "2s", "--health-timeout", "3s", "--health-retries", "3")

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client"),
]


def docker(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


def logs(name: str) -> str:
    done = docker("logs", name, check=False)
    return done.stdout + done.stderr


def inspect(name: str, template: str) -> str:
    return docker("inspect", "-f", template, name).stdout.strip()


@dataclass
class Container:
    name: str
    url: str


def start(*env: str, mount: bool = True, extra: tuple[str, ...] = (), port: int | None = None) -> Container:
    """``docker run -d`` the image on the host network, serving on loopback; returns at once."""
    port = port or free_port()
    name = f"zeda-test-{uuid.uuid4().hex[:8]}"
    flags = ["--network", "host", "-e", "ZEDA_HOST=127.0.0.1", "-e", f"ZEDA_PORT={port}", *HEALTH_FLAGS, *extra]
    if mount:
        flags += ["-v", f"{MODEL}:/models/m:ro", "-e", "ZEDA_MODEL=/models/m"]
    for item in env:
        flags += ["-e", item]
    docker("run", "-d", "--name", name, *flags, IMAGE)
    return Container(name, f"http://127.0.0.1:{port}")


def wait_healthy(container: Container, timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if inspect(container.name, "{{.State.Running}}") != "true":
            raise AssertionError(f"container exited: {logs(container.name)[-3000:]}")
        try:
            if httpx.get(f"{container.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no /health in {timeout:.0f} s: {logs(container.name)[-3000:]}")


def remove(container: Container) -> None:
    docker("rm", "-f", container.name, check=False)


@pytest.fixture(scope="session", autouse=True)
def image_exists() -> None:
    if docker("info", check=False, timeout=30).returncode != 0:
        pytest.skip("no docker daemon")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is missing: docker/smoke.sh builds it", pytrace=False)


@pytest.fixture(scope="module")
def server() -> Iterator[Container]:
    container = start()
    try:
        wait_healthy(container)
        yield container
    finally:
        remove(container)


def test_image_has_a_size_and_no_build_leftovers() -> None:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    print(f"image {IMAGE}: {size / 1e6:.0f} MB")
    listing = docker("run", "--rm", "--network", "host", "--entrypoint", "ls", IMAGE, "-a", "/opt/zeda").stdout.split()
    assert not {"tests", "docs", ".git", ".venv", "build", "BENCHMARKS.md"} & set(listing), listing
    assert {"models", "loadtest", "pyproject.toml"} <= set(listing), listing


def test_health_models_and_a_chat_completion_with_zeda_usage(server: Container) -> None:
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    models = httpx.get(f"{server.url}/v1/models", timeout=5).json()["data"]
    assert [m["id"] for m in models] == ["m"]  # the mounted model's directory name
    body = {"model": "m", "messages": [{"role": "user", "content": "Sort: 3 1 2"}], "max_tokens": 16}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["finish_reason"] in {"stop", "length"}
    zeda = answer["usage"]["zeda"]
    assert {"zero_expert_ratio", "expert_flops", "expert_flops_saved", "dense_expert_flops"} <= set(zeda)
    assert zeda["dense_expert_flops"] > 0 and 0.0 <= zeda["zero_expert_ratio"] <= 1.0


def test_the_healthcheck_turns_healthy(server: Container) -> None:
    deadline, status = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        status = inspect(server.name, "{{.State.Health.Status}}")
        if status == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"health status {status!r}: {inspect(server.name, '{{json .State.Health}}')}")


def test_runs_as_a_non_root_user_on_a_read_only_model_mount(server: Container) -> None:
    assert docker("exec", server.name, "id", "-u").stdout.strip() not in {"", "0"}
    mounts = json.loads(inspect(server.name, "{{json .Mounts}}"))
    assert [(m["Destination"], m["RW"]) for m in mounts if m["Destination"] == "/models/m"] == [("/models/m", False)]
    write = docker("exec", server.name, "touch", "/models/m/written", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert inspect(server.name, "{{.Config.User}}") not in {"", "root", "0"}
    # zeda itself is PID 1 (exec-form ENTRYPOINT): docker stop's SIGTERM reaches it.
    assert "zeda" in docker("exec", server.name, "cat", "/proc/1/cmdline").stdout


DRAIN_STREAMS = 4


def _stream(url: str, index: int, producing: list[int], stopped: threading.Event) -> dict:
    """One streamed chat completion; how it ended, and how many chunks came after the stop."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": f"Write a long story about the number {index}."}],
        "max_tokens": 48,  # a few seconds on a loaded 2-core machine, well inside the drain
        "temperature": 1.0,
        "seed": index,
        "stream": True,
    }
    finish, error, done, after_stop = None, None, False, 0
    with (
        httpx.Client(timeout=300) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line.removeprefix("data: "))
            after_stop += stopped.is_set()
            if index not in producing:
                producing.append(index)
            if "error" in chunk:
                error = chunk["error"]
            elif chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                finish = chunk["choices"][0]["finish_reason"]
    return {"status": response.status_code, "finish": finish, "error": error, "done": done, "after_stop": after_stop}


def test_docker_stop_drains_the_streams_in_flight() -> None:
    # The server's own drain bound (ZEDA_SHUTDOWN_TIMEOUT) and docker stop's (-t) are both generous: the point is
    # that the streams finish rather than how fast a loaded machine decodes.
    container = start("ZEDA_SHUTDOWN_TIMEOUT=100")
    try:
        wait_healthy(container)
        stopped, producing = threading.Event(), []
        with ThreadPoolExecutor(DRAIN_STREAMS) as pool:
            streams = [pool.submit(_stream, container.url, i, producing, stopped) for i in range(DRAIN_STREAMS)]
            deadline = time.monotonic() + 120
            while len(producing) < DRAIN_STREAMS and time.monotonic() < deadline:
                time.sleep(0.05)  # every stream admitted and producing text
            assert len(producing) == DRAIN_STREAMS, "the streams did not start"
            assert not all(s.done() for s in streams), "the streams ended before the stop: make them longer"
            stopped.set()
            began = time.monotonic()
            docker("stop", "-t", "110", container.name, timeout=180)
            took = time.monotonic() - began
            results = [s.result(timeout=120) for s in streams]
        for result in results:
            assert result["status"] == 200 and result["error"] is None, result
            assert result["finish"] in {"stop", "length"} and result["done"], result
        assert any(r["after_stop"] for r in results), f"nothing was in flight at the stop: {results}"
        assert took < 110, f"docker stop needed the SIGKILL ({took:.0f} s)"
        assert inspect(container.name, "{{.State.ExitCode}}") == "0", logs(container.name)[-2000:]
        assert "drained (0 requests cancelled" in logs(container.name)
        print(f"docker stop drained {sum(bool(r['after_stop']) for r in results)} streams in flight in {took:.1f} s")
    finally:
        remove(container)


def test_the_sglang_backend_serves_the_embedded_model() -> None:
    """An image with the sglang extra (docker/smoke.sh with ZEDA_EXTRAS=sglang,loadtest): SGLang's CPU engine."""
    probe = docker(
        "run", "--rm", "--network", "host", "--entrypoint", "python", IMAGE, "-c", "import sglang", check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"{IMAGE} has no sglang extra")
    container = start(
        "ZEDA_BACKEND=sglang", "ZEDA_MODEL=/opt/zeda/models/tiny-zeda", mount=False, extra=("--shm-size", "1g")
    )
    try:
        wait_healthy(container, timeout=900)
        body = {"model": "tiny-zeda", "messages": [{"role": "user", "content": "Sort: 3 1 2"}], "max_tokens": 16}
        response = httpx.post(f"{container.url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        zeda = response.json()["usage"]["zeda"]
        assert zeda["dense_expert_flops"] > 0 and zeda["zero_expert_ratio"] > 0, zeda
    finally:
        remove(container)


def _fails_fast(container: Container, message: str) -> str:
    began = time.monotonic()
    code = docker("wait", container.name, timeout=CONFIG_ERROR_S).stdout.strip()
    took, text = time.monotonic() - began, logs(container.name)
    assert code not in {"", "0"}, f"exit {code}: {text[-2000:]}"
    assert took < CONFIG_ERROR_S, took
    assert message in text, text[-2000:]
    print(f"{container.name}: exit {code} after {took:.1f} s")
    return text


def test_a_missing_model_mount_is_a_clear_error() -> None:
    container = start("ZEDA_MODEL=/models/absent", mount=False)
    try:
        _fails_fast(container, "/models/absent")
    finally:
        remove(container)


def test_a_wrong_backend_is_a_clear_error_and_on_failure_3_gives_up() -> None:
    # compose's restart policy (docker/compose.cpu.yml, docker-compose.yml): on-failure:3 retries three times, then
    # leaves the container exited with its error, where unless-stopped would restart it forever.
    container = start("ZEDA_BACKEND=vllm", extra=("--restart", "on-failure:3"))
    try:
        deadline = time.monotonic() + 4 * CONFIG_ERROR_S
        while time.monotonic() < deadline:
            state = json.loads(inspect(container.name, "{{json .State}}"))
            if not state["Running"] and not state["Restarting"] and inspect(container.name, "{{.RestartCount}}") == "3":
                break
            time.sleep(1)
        assert inspect(container.name, "{{.RestartCount}}") == "3"
        assert inspect(container.name, "{{.State.Status}}") == "exited"
        assert inspect(container.name, "{{.State.ExitCode}}") == "2"
        assert "backend" in logs(container.name) and "vllm" in logs(container.name)
    finally:
        remove(container)


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        container = start(port=port)
        try:
            _fails_fast(container, "address already in use")
        finally:
            remove(container)


def compose(*args: str, env: dict[str, str], timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    command = ["docker-compose", "-p", env["COMPOSE_PROJECT_NAME"], "-f", str(COMPOSE_CPU), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    assert done.returncode == 0, f"{' '.join(command)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def test_compose_serves_runs_locust_and_an_ab_report(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("no docker-compose")
    reports = Path(os.environ.get("ZEDA_SMOKE_STATE", tmp_path)) / "ab-compose"
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir(parents=True)
    os.chown(reports, 10001, -1)  # the image's user writes the report
    env = {
        "COMPOSE_PROJECT_NAME": f"zedatest{uuid.uuid4().hex[:6]}",
        "ZEDA_IMAGE": IMAGE,
        "ZEDA_PORT": str(free_port()),
        "ZEDA_AB_A_PORT": str(free_port()),
        "ZEDA_LOCUST_RUN_TIME": "15s",
        "ZEDA_AB_RUN_TIME": "20s",
        "ZEDA_AB_OUT": str(reports),
    }
    try:
        compose("up", "-d", "--no-build", "zeda", env=env)
        locust = compose("--profile", "loadtest", "run", "--rm", "locust", env=env)
        summary = locust.stdout + locust.stderr
        aggregated = [line.split() for line in summary.splitlines() if line.strip().startswith("Aggregated")]
        assert aggregated and int(aggregated[0][1]) > 0 and aggregated[0][2] == "0(0.00%)", summary[-3000:]
        compose("--profile", "ab", "run", "--rm", "ab", env=env, timeout=900)
        result = json.loads((reports / "ab.json").read_text())
        assert (reports / "report.html").is_file() and (reports / "ab.csv").is_file()
        a, b = result["sides"]["A"], result["sides"]["B"]
        assert result["names"] == {"A": "tiny-teacher", "B": "tiny-zeda"}
        for side in (a, b):
            assert side["succeeded"] > 0 and side["errors"] == 0, side
        assert a["zero_expert_ratio"] == 0.0 and b["zero_expert_ratio"] > 0.0  # only the ZEDA model skips experts
        assert b["metrics_zero_expert_ratio"] == pytest.approx(b["zero_expert_ratio"], abs=0.02)
        fields = ("succeeded", "tokens_per_s", "p50_latency_s", "zero_expert_ratio")
        print(json.dumps({side: {f: summary[f] for f in fields} for side, summary in result["sides"].items()}))
    finally:
        subprocess.run(
            ["docker-compose", "-p", env["COMPOSE_PROJECT_NAME"], "-f", str(COMPOSE_CPU), "--profile", "ab",
             "--profile", "loadtest", "down", "-v", "--remove-orphans"],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        )  # fmt: skip
