"""Server metrics: Prometheus counters for ``/metrics`` and a rolling history for ``/dashboard``."""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from zeda_core.flops import FlopReport

if TYPE_CHECKING:
    from zeda_server.compute_dial import ComputeDial
    from zeda_server.sglang_models.forward_counter import ForwardCounts

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HISTORY_SECONDS = 600


class ServerMetrics:
    """One registry per server, so several servers (and tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zeda_requests", "Finished requests.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("zeda_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("zeda_completion_tokens", "Tokens generated.", registry=r)
        self.expert_flops = Counter("zeda_expert_flops", "Routed-expert FLOPs spent.", registry=r)
        self.expert_flops_saved = Counter("zeda_expert_flops_saved", "Routed-expert FLOPs saved.", registry=r)
        self.dense_expert_flops = Counter("zeda_dense_expert_flops", "FLOPs the static model would spend.", registry=r)
        self.real_slots = Counter("zeda_real_slots", "Routed slots that went to real experts.", registry=r)
        self.zero_slots = Counter("zeda_zero_slots", "Routed slots that went to zero experts.", registry=r)
        self.zero_ratio = Gauge("zeda_zero_expert_ratio", "Zero-slot share since start.", registry=r)
        self.queue_depth = Gauge("zeda_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("zeda_running_requests", "Requests in the running batch.", registry=r)
        self.ttft = Histogram("zeda_time_to_first_token_seconds", "TTFT.", buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("zeda_request_latency_seconds", "End-to-end.", buckets=LATENCY_BUCKETS, registry=r)
        self.model = Info("zeda_model", "The model version new requests start on.", registry=r)
        self.swaps = Counter("zeda_model_swaps", "Hot-swaps and rollbacks applied.", ["kind"], registry=r)
        self.moe_slots_run = Gauge(
            "zeda_moe_forward_slots",
            "Expert slots the engine's MoE forward computed or skipped since start (SGLang CPU engine).",
            ["kind"],
            registry=r,
        )
        self.loop_tasks = Gauge("zeda_event_loop_tasks", "asyncio tasks alive in the server's event loop.", registry=r)
        self.forward_seconds = Gauge(
            "zeda_forward_seconds",
            "Seconds in the model forward and in its MoE blocks since start (SGLang CPU engine).",
            ["part"],
            registry=r,
        )
        self.zero_offset = Gauge(
            "zeda_zero_expert_offset",
            "The server's zero-expert offset (logits): target (controller), load (adaptive) and total.",
            ["part"],
            registry=r,
        )
        self.target_ratio = Gauge("zeda_target_zero_expert_ratio", "r_ze the controller tracks (-1: none).", registry=r)
        self.window_ratio = Gauge(
            "zeda_window_zero_expert_ratio", "Served r_ze over the dial's sliding token window.", registry=r
        )
        self._lock = threading.Lock()
        self._events: collections.deque[tuple[float, int, int, int]] = collections.deque()

    def record_forward_counts(self, counts: ForwardCounts) -> None:
        """Show what SGLang's CPU forward counted (slots, seconds) on ``/metrics``."""
        self.moe_slots_run.labels("computed").set(counts.computed_slots)
        self.moe_slots_run.labels("skipped").set(counts.skipped_slots)
        self.forward_seconds.labels("moe").set(counts.moe_seconds)
        self.forward_seconds.labels("model").set(counts.model_seconds)

    def record_dial(self, dial: ComputeDial) -> None:
        """Show the compute dial's offsets, target and windowed r_ze on ``/metrics``."""
        self.zero_offset.labels("target").set(dial.target_offset)
        self.zero_offset.labels("load").set(dial.load_offset)
        self.zero_offset.labels("total").set(dial.offset)
        self.target_ratio.set(dial.target if dial.target is not None else -1.0)
        window = dial.window.zero_ratio
        self.window_ratio.set(window if window is not None else 0.0)

    def record(self, endpoint: str, prompt_tokens: int, completion_tokens: int, report: FlopReport) -> None:
        """Account one finished request."""
        self.requests.labels(endpoint=endpoint, status="ok").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.expert_flops.inc(report.expert_flops)
        self.expert_flops_saved.inc(report.expert_flops_saved)
        self.dense_expert_flops.inc(report.dense_expert_flops)
        self.real_slots.inc(report.real_slots)
        self.zero_slots.inc(report.zero_slots)
        self.zero_ratio.set(self._zero_ratio())
        with self._lock:
            self._events.append((time.time(), completion_tokens, report.real_slots, report.zero_slots))
            self._trim()

    def record_error(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def snapshot(self, queue_depth: int, running: int, window: float = 10.0) -> dict[str, Any]:
        """Totals since start plus tokens/s and r_ze over the last ``window`` seconds (dashboard feed)."""
        now = time.time()
        with self._lock:
            self._trim()
            recent = [e for e in self._events if e[0] >= now - window]
        real, zero = sum(e[2] for e in recent), sum(e[3] for e in recent)
        saved, spent = self._total("zeda_expert_flops_saved"), self._total("zeda_expert_flops")
        requests = sum(
            sample.value
            for metric in self.requests.collect()
            for sample in metric.samples
            if sample.name == "zeda_requests_total" and sample.labels["status"] == "ok"
        )
        return {
            "time": now,
            "requests": int(requests),
            "completion_tokens": int(self._total("zeda_completion_tokens")),
            "expert_flops": spent,
            "expert_flops_saved": saved,
            "saved_share": saved / (saved + spent) if saved + spent else 0.0,
            "zero_expert_ratio": self._zero_ratio(),
            "recent_zero_expert_ratio": zero / (real + zero) if real + zero else None,
            "tokens_per_s": sum(e[1] for e in recent) / window,
            "queue_depth": queue_depth,
            "running": running,
        }

    def _total(self, name: str) -> float:
        """A counter's value since start, read back from the registry."""
        return self.registry.get_sample_value(f"{name}_total") or 0.0

    def _zero_ratio(self) -> float:
        """Zero-slot share of all routed slots since start."""
        slots = self._total("zeda_real_slots") + self._total("zeda_zero_slots")
        return self._total("zeda_zero_slots") / slots if slots else 0.0

    def _trim(self) -> None:
        horizon = time.time() - HISTORY_SECONDS
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()
