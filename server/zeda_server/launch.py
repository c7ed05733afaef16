"""Start real ``zeda serve`` processes on loopback (end-to-end tests, benchmarks, A/B load tests)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    model: Path, *flags: str, env: dict[str, str] | None = None, startup_timeout: float = 120.0
) -> Iterator[str]:
    """Yield the base URL of a ``zeda serve`` subprocess serving ``model``; stop it afterwards.

    The server's log goes to a temporary file: an undrained pipe would fill up and block it.
    ``startup_timeout`` (seconds) bounds the wait for ``/health``; SGLang's engine needs longer.
    """
    with server_process(model, *flags, env=env, startup_timeout=startup_timeout) as (url, _process, _log):
        yield url


@contextlib.contextmanager
def server_process(
    model: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    startup_timeout: float = 120.0,
    entry: tuple[str, ...] = ("-m", "zeda_cli.main"),
) -> Iterator[tuple[str, subprocess.Popen, IO[str]]]:
    """:func:`running_server` that also yields the process and its log file (to signal it, read its exit).

    ``entry``: the interpreter arguments that run the ``zeda`` CLI (a script taking the same arguments).
    The server runs in a session of its own: its process group (``process.pid``) can be signalled
    as a whole, as a terminal's Ctrl-C or systemd's default ``KillMode`` signal every process.
    """
    port = free_port()
    command = [sys.executable, *entry, "serve", "--model", str(model), "--port", str(port), *flags]
    with tempfile.TemporaryFile(mode="w+") as log:
        environment = {**os.environ, **(env or {})}
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        try:
            url = _wait_healthy(process, port, log, startup_timeout)
            yield url, process, log
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(process: subprocess.Popen, port: int, log, timeout: float) -> str:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"zeda serve exited: {log.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"zeda serve did not become healthy in {timeout:.0f} s")
        time.sleep(0.2)
