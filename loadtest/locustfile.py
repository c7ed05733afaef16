"""Chat-completion load for any OpenAI-compatible server, with ZEDA's per-request savings recorded.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 8 --run-time 60s --stop-timeout 60 \\
        --prompts loadtest/prompts.jsonl --stream-share 0.5 --max-requests 500 --records-out records.jsonl

Each simulated user sends chat completions built from a JSONL prompt file (``prompt`` per line;
the skills suite by default), streamed or not (``--stream-share``). Besides locust's own request
stats, every request is recorded: time to first token, mean inter-token latency, end-to-end
latency, completion tokens/s and the ``usage.zeda`` savings. Locust also reports TTFT and ITL as
their own request types. A run stops by itself at ``--run-time`` or after ``--max-requests``.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from pathlib import Path

from locust import HttpUser, events, task
from prompt_file import load_prompt_file

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.jsonl")
_records: list[dict] = []
_lock = threading.Lock()
_prompts: list[str] = []


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL prompt file ('prompt' per line)")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=0, help="stop after this many requests (0: no bound)")
    parser.add_argument("--model-name", default="", help="model id to send (default: the server's first model)")
    parser.add_argument("--api-key", default="", help="bearer key, if the server needs one")
    parser.add_argument("--records-out", default="", help="write one JSON line per request here at the end")
    parser.add_argument("--seed", type=int, default=0)


@events.test_start.add_listener
def _start(environment, **_kwargs) -> None:
    _prompts[:] = load_prompt_file(environment.parsed_options.prompts)
    with _lock:
        _records.clear()


@events.test_stop.add_listener
def _stop(environment, **_kwargs) -> None:
    out = environment.parsed_options.records_out
    if out:
        with _lock:
            text = "".join(json.dumps(record) + "\n" for record in _records)
        Path(out).write_text(text)


class ChatUser(HttpUser):
    """Sends chat completions back to back (no think time), streamed or not."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.rng = random.Random(options.seed + id(self))
        self.headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.model = options.model_name
        if not self.model:
            with self.client.get("/v1/models", headers=self.headers, name="/v1/models", catch_response=True) as reply:
                self.model = reply.json()["data"][0]["id"] if reply.status_code == 200 else "default"

    @task
    def chat(self) -> None:
        options = self.environment.parsed_options
        with _lock:
            if options.max_requests and len(_records) >= options.max_requests:
                self.environment.runner.quit()
                return
        stream = self.rng.random() < options.stream_share
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.rng.choice(_prompts)}],
            "max_tokens": options.max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        started = time.perf_counter()
        record = {"stream": stream, "ok": False, "start": time.time()}
        name = "chat (stream)" if stream else "chat"
        with self.client.post(
            "/v1/chat/completions", json=body, headers=self.headers, stream=stream, name=name, catch_response=True
        ) as reply:
            record["status"] = reply.status_code
            if reply.status_code != 200:
                reply.failure(f"HTTP {reply.status_code}: {reply.text[:200]}")
            else:
                usage, token_times = self._read(reply, stream, started)
                record |= self._timings(started, token_times, usage)
                record["ok"] = True
        record["end"] = time.time()
        with _lock:
            _records.append(record)

    def _read(self, reply, stream: bool, started: float) -> tuple[dict, list[float]]:
        """(usage, arrival time of each content chunk)."""
        if not stream:
            return reply.json()["usage"], [time.perf_counter()]
        usage, times = {}, []
        for line in reply.iter_lines():
            if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
            usage = chunk.get("usage") or usage
        return usage, times or [time.perf_counter()]

    def _timings(self, started: float, token_times: list[float], usage: dict) -> dict:
        end = time.perf_counter()
        ttft = token_times[0] - started
        gaps = [b - a for a, b in itertools.pairwise(token_times)]
        tokens = usage.get("completion_tokens", 0)
        fire = self.environment.events.request.fire
        fire(request_type="TTFT", name="chat", response_time=ttft * 1e3, response_length=0, exception=None)
        if gaps:
            itl = sum(gaps) / len(gaps)
            fire(request_type="ITL", name="chat", response_time=itl * 1e3, response_length=0, exception=None)
        return {
            "ttft_s": ttft,
            "itl_s": sum(gaps) / len(gaps) if gaps else None,
            "latency_s": end - started,
            "completion_tokens": tokens,
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "tokens_per_s": tokens / (end - started) if end > started else 0.0,
            "zeda": usage.get("zeda"),
        }
