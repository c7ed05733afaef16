"""The compute dial: one offset on the zero-expert router logits trades quality for expert compute.

Every token is routed with ``server offset + its request's zero_expert_bias`` added to the zero
experts' logits (softmax families) or selection scores (sigmoid families), in every MoE layer
(:func:`zeda_core.routing.route`). Lower sends fewer slots to zero experts (-40: none), higher
skips more. The server offset has two parts, both bounded:

- **target** (``--target-zero-expert-ratio R``): a PI controller (velocity form, bounded steps)
  moves it so that the served r_ze tracks R. It measures the zero share of the routed slots of
  the requests that finished since its last update, once they hold ``control_tokens`` tokens
  (the control interval); ``/metrics`` and the dashboard show the share over a sliding window
  of the last ``window_tokens`` served tokens.
- **load** (``--adaptive-compute queue``): every tick (``TICK_SECONDS``) the queue is at least
  ``queue_threshold`` deep, it rises by ``LOAD_STEP`` up to ``max_load_offset``, so tokens get
  cheaper and throughput rises before requests are refused; each tick the queue is empty, it
  falls by ``LOAD_STEP`` back to 0. While it is above 0 the target controller holds still, so
  the two never fight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from zeda_core.flops import FlopReport
from zeda_core.routing import ZERO_EXPERT_BIAS_LIMIT

TARGET_OFFSET_LIMIT = 20.0  # |target offset| the controller may reach, in logits
TICK_SECONDS = 0.25
LOAD_STEP = 0.25  # logits per tick
CHANGE_EPSILON = 1e-3  # smaller moves of the server offset are not pushed to the engine

AdaptiveMode = Literal["off", "queue"]


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


@dataclass
class PiController:
    """A discrete PI controller in velocity form: ``u += clamp(kp * (e - e_prev) + ki * e, ±max_step)``.

    The velocity form needs no separate anti-windup: the output itself is clamped to
    ``[low, high]`` and the integral is that output.

    Attributes:
        kp, ki: proportional and integral gains (logits per unit of r_ze error).
        max_step: largest change of the output per update (logits).
        low, high: bounds of the output (logits).
        output: the current output (logits).
    """

    kp: float
    ki: float
    max_step: float
    low: float
    high: float
    output: float = 0.0
    _last_error: float | None = None

    def update(self, error: float) -> float:
        """Take one measured ``error`` (target - measured) and return the new output."""
        previous = error if self._last_error is None else self._last_error
        step = _clamp(self.kp * (error - previous) + self.ki * error, -self.max_step, self.max_step)
        self.output = _clamp(self.output + step, self.low, self.high)
        self._last_error = error
        return self.output


@dataclass
class SlotWindow:
    """Routed slots of the most recent served tokens, kept per finished request.

    Attributes:
        max_tokens: tokens kept; the oldest requests leave once the rest still hold that many.
    """

    max_tokens: int
    _parts: collections.deque[tuple[int, int, int]] = field(default_factory=collections.deque)
    _tokens: int = 0
    _real: int = 0
    _zero: int = 0

    def add(self, tokens: int, real_slots: int, zero_slots: int) -> None:
        """Account one finished request's tokens and routed slots."""
        self._parts.append((tokens, real_slots, zero_slots))
        self._tokens, self._real, self._zero = self._tokens + tokens, self._real + real_slots, self._zero + zero_slots
        while len(self._parts) > 1 and self._tokens - self._parts[0][0] >= self.max_tokens:
            old_tokens, old_real, old_zero = self._parts.popleft()
            self._tokens -= old_tokens
            self._real, self._zero = self._real - old_real, self._zero - old_zero

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def zero_ratio(self) -> float | None:
        """Zero share of the slots held, or None when none is held."""
        slots = self._real + self._zero
        return self._zero / slots if slots else None

    def clear(self) -> None:
        self._parts.clear()
        self._tokens = self._real = self._zero = 0


class ComputeDial:
    """The server-wide zero-expert offset: a target controller's part plus a load part.

    Args:
        target: r_ze to track, in [0, 1]; None leaves the target part at 0.
        adaptive: ``queue`` raises the load part while the queue is deep; ``off`` keeps it at 0.
        queue_threshold: queue depth (waiting requests) from which the load part rises.
        max_load_offset: the load part's ceiling (logits).
        window_tokens: tokens of the sliding window shown as the served r_ze.
        control_tokens: tokens per control interval (one controller update each).
        controller: the PI controller of the target part (defaults tuned on the tiny model).
    """

    def __init__(
        self,
        target: float | None = None,
        adaptive: AdaptiveMode = "off",
        queue_threshold: int = 8,
        max_load_offset: float = 1.0,
        window_tokens: int = 2048,
        control_tokens: int = 128,
        controller: PiController | None = None,
    ) -> None:
        self.target = target
        self.adaptive = adaptive
        self.queue_threshold = queue_threshold
        self.max_load_offset = max_load_offset
        self.window = SlotWindow(window_tokens)
        self.interval = SlotWindow(control_tokens)
        self.controller = controller or PiController(
            kp=0.5, ki=1.0, max_step=0.5, low=-TARGET_OFFSET_LIMIT, high=TARGET_OFFSET_LIMIT
        )
        self.load_offset = 0.0
        self.updates = 0
        self._task: asyncio.Task | None = None

    @property
    def active(self) -> bool:
        """Whether anything moves the server offset (a target or the load-adaptive mode)."""
        return self.target is not None or self.adaptive != "off"

    @property
    def target_offset(self) -> float:
        return self.controller.output if self.target is not None else 0.0

    @property
    def offset(self) -> float:
        """The server offset (logits) every token is routed with, before its request's own."""
        return self.target_offset + self.load_offset

    def observe(self, report: FlopReport) -> None:
        """Account one finished request; once a control interval is full, update the target part."""
        self.window.add(report.tokens, report.real_slots, report.zero_slots)
        if self.target is None:
            return
        self.interval.add(report.tokens, report.real_slots, report.zero_slots)
        measured = self.interval.zero_ratio
        if self.interval.tokens < self.interval.max_tokens or measured is None:
            return
        self.interval.clear()
        if self.load_offset == 0.0:  # hold still while the load part is raised
            self.controller.update(self.target - measured)
            self.updates += 1

    def on_queue(self, queue_depth: int) -> None:
        """One tick of the load-adaptive part, given the requests waiting now."""
        if self.adaptive != "queue":
            return
        if queue_depth >= self.queue_threshold:
            self.load_offset = min(self.load_offset + LOAD_STEP, self.max_load_offset)
        elif queue_depth == 0:
            self.load_offset = max(self.load_offset - LOAD_STEP, 0.0)

    def snapshot(self) -> dict[str, float | int | str | None]:
        """The dial's state for ``/dashboard/stats`` (offsets in logits)."""
        return {
            "zero_expert_offset": self.offset,
            "target_zero_expert_offset": self.target_offset,
            "load_zero_expert_offset": self.load_offset,
            "target_zero_expert_ratio": self.target,
            "window_zero_expert_ratio": self.window.zero_ratio,
            "window_tokens": self.window.tokens,
            "adaptive_compute": self.adaptive,
            "controller_updates": self.updates,
        }

    def run(self, queue_depth: Callable[[], int], apply: Callable[[float], Awaitable[None]]) -> None:
        """Start (once, on the running loop) the task that ticks the dial and pushes offset changes to ``apply``."""
        if not self.active or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._ticks(queue_depth, apply))

    async def stop(self) -> None:
        """Stop the ticking task, if it runs."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _ticks(self, queue_depth: Callable[[], int], apply: Callable[[float], Awaitable[None]]) -> None:
        applied = 0.0
        while True:
            self.on_queue(queue_depth())
            if abs(self.offset - applied) > CHANGE_EPSILON:
                applied = self.offset
                await apply(applied)
            await asyncio.sleep(TICK_SECONDS)


def parse_tiers(text: str) -> dict[str, float]:
    """``fast=2,quality=-30`` -> ``{"fast": 2.0, "quality": -30.0}`` (named request offsets, logits).

    Raises:
        ValueError: an entry is not ``name=number``, a number is not finite or lies outside
            ``±ZERO_EXPERT_BIAS_LIMIT``, or a name repeats.
    """
    tiers: dict[str, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = entry.partition("=")
        name = name.strip()
        try:
            offset = float(value)
        except ValueError:
            offset = math.nan
        if not sep or not name or not math.isfinite(offset) or abs(offset) > ZERO_EXPERT_BIAS_LIMIT:
            raise ValueError(
                f"compute tier {entry!r} must be name=offset with |offset| <= {ZERO_EXPERT_BIAS_LIMIT:g} logits"
            )
        if name in tiers:
            raise ValueError(f"compute tier {name!r} is given twice")
        tiers[name] = offset
    return tiers
