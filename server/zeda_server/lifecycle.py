"""The server's life: readiness, the requests in flight, and the drain on SIGTERM / SIGINT.

A server is *ready* once the model is loaded and until it starts draining. On the first signal
it drains: new inference requests get 503 with ``Retry-After``, ``/ready`` turns false, and every
admitted request (streams included) may finish within ``shutdown_timeout`` seconds; what is still
running then is cancelled and ends with an error chunk or a 503. Then uvicorn exits (code 0). A
second signal exits at once.

The engine reports its own stop here (:meth:`Lifecycle.fail`, the engine's failure callback): the
server is then failed, for good, and every request in flight ends with 503 ``engine_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

CANCEL_GRACE_S = 5.0  # after the drain timeout: how long cancelled requests get to send their error


class Cancelled(Exception):
    """A request the server ended before it finished: the drain timed out, or its deadline passed.

    ``status`` and ``code`` are the HTTP answer (503 ``server_shutting_down`` or 504 ``request_timeout``).
    """

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code

    @classmethod
    def engine_stopped(cls, reason: str) -> Cancelled:
        """The engine can serve nothing more: 503 ``engine_unavailable``."""
        return cls(f"the engine has stopped ({reason}); retry on another replica", 503, "engine_unavailable")


class Lifecycle:
    """Readiness, engine failure and the set of requests in flight, for one event loop.

    Attributes:
        ready: the model is loaded (and the server not draining).
        draining: the server is shutting down.
        failure: why the engine stopped, once it has (None while it serves).
    """

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop requests are admitted on
        self._in_flight: dict[object, Callable[[Cancelled], None]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def admit(self, key: object, cancel: Callable[[Cancelled], None]) -> None:
        """Count a request in flight until :meth:`release`; ``cancel(why)`` ends it early (on the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._in_flight[key] = cancel
        self._idle.clear()

    def release(self, key: object) -> None:
        self._in_flight.pop(key, None)
        if not self._in_flight:
            self._idle.set()

    def fail(self, reason: str) -> None:
        """The engine stopped (callable from any thread): fail the server and end every request in flight with 503.

        ``failure`` is set before this returns; the requests are cancelled on the event loop.
        """
        self.failure = reason
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:  # no loop in this thread: an engine thread
            on_loop = False
        if on_loop:
            self._cancel_all(Cancelled.engine_stopped(reason))
        else:
            loop.call_soon_threadsafe(self._cancel_all, Cancelled.engine_stopped(reason))

    def _cancel_all(self, why: Cancelled) -> None:
        for cancel in list(self._in_flight.values()):
            cancel(why)

    async def drain(self, timeout: float) -> int:
        """Stop admitting, wait up to ``timeout`` s for the requests in flight, cancel the rest.

        Returns:
            How many requests were cancelled.
        """
        self.draining, self.ready = True, False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return 0
        except TimeoutError:
            left = list(self._in_flight.values())
            why = Cancelled(
                f"the server shut down before the request finished ({timeout:g} s drain)", 503, "server_shutting_down"
            )
            for cancel in left:
                cancel(why)
            with contextlib.suppress(TimeoutError):  # a client that stopped reading cannot hold the exit
                await asyncio.wait_for(self._idle.wait(), CANCEL_GRACE_S)
            return len(left)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before it exits: first signal drains, a second exits at once."""

    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        shutdown_timeout: float,
        on_drained: Callable[[int], Awaitable[None]],
    ) -> None:
        """``on_drained(cancelled)`` runs after the drain, before uvicorn stops (flush and close there)."""
        super().__init__(config)
        self.lifecycle, self.shutdown_timeout, self.on_drained = lifecycle, shutdown_timeout, on_drained
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self.should_exit:  # the second signal
            self.force_exit = self.should_exit = True
            return
        if sig not in (signal.SIGTERM, signal.SIGINT):
            return super().handle_exit(sig, frame)
        loop = asyncio.get_event_loop()  # the signal arrives on the loop's (main) thread, between callbacks
        self._drain_task = loop.create_task(self._drain())

    async def _drain(self) -> None:
        cancelled = await self.lifecycle.drain(self.shutdown_timeout)
        await self.on_drained(cancelled)
        self.should_exit = True
