"""The compute dial on the SGLang backend: SGLang's real CPU engine serving tiny-zeda, no stub.

SGLang reads its platform once per process, so one fresh process (this file run as a script) starts
one :class:`~zeda_server.sglang_engine.SglangEngine`, turns the dial and records what every request
got, then does the same on the torch engine; the tests check the record. SGLang's prefix cache stays
on: requests at another offset must not reuse KV cached at offset 0.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sglang_guard import sglang_test

ROOT = Path(__file__).resolve().parents[1]
TINY_ZEDA = ROOT / "models" / "tiny-zeda"
PROMPT = "What is 12 + 30?"
LONG_PROMPT = "Write a Python function that adds two numbers."
SCRIPT_TIMEOUT_S = 900


async def _reply(engine: Any, prompt: str, max_tokens: int = 16, bias: float = 0.0) -> dict[str, Any]:
    """One greedy request: its tokens, finish reason and routed slots."""
    from zeda_server.engine_api import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, zero_expert_bias=bias)
    outputs = [o async for o in engine.submit(engine.chat_prompt([{"role": "user", "content": prompt}]), params)]
    report = outputs[-1].report
    return {
        "tokens": [t for o in outputs for t in o.token_ids],
        "finish": outputs[-1].finish_reason,
        "real": report.real_slots,
        "zero": report.zero_slots,
    }


async def _counted(engine: Any, prompt: str, **kwargs: Any) -> dict[str, Any]:
    """:func:`_reply`, with the slots the CPU MoE forward computed and skipped meanwhile."""
    before = engine.forward_counts()
    reply = await _reply(engine, prompt, **kwargs)
    after = engine.forward_counts()
    reply["forward"] = [after.computed_slots - before.computed_slots, after.skipped_slots - before.skipped_slots]
    return reply


async def _in_flight(engine: Any) -> dict[str, Any]:
    """A request at offset 0 that sees the dial turn to -40 after its first chunk."""
    from zeda_server.engine_api import SamplingParams

    prompt = engine.chat_prompt([{"role": "user", "content": LONG_PROMPT}])
    stream = engine.submit(prompt, SamplingParams(max_tokens=48, temperature=0.0))
    first = await anext(stream)
    started = time.perf_counter()
    await engine.set_zero_offset(-40.0)
    seconds = time.perf_counter() - started
    outputs = [first] + [o async for o in stream]
    report = outputs[-1].report
    tokens = [t for o in outputs for t in o.token_ids]
    return {"finish": outputs[-1].finish_reason, "tokens": tokens, "zero": report.zero_slots, "dial_s": seconds}


async def _torch_replies() -> dict[str, Any]:
    """The torch engine's greedy replies at server offsets 0, -40 and +4."""
    from zeda_server.engine import TorchEngine

    engine = TorchEngine(str(TINY_ZEDA), max_batch=4)
    try:
        replies = {}
        for name, offset in (("base", 0.0), ("minus40", -40.0), ("plus4", 4.0)):
            await engine.set_zero_offset(offset)
            replies[name] = await _reply(engine, PROMPT)
        return replies
    finally:
        engine.shutdown()


async def observe() -> dict[str, Any]:
    """Start the SGLang engine, turn the dial, and record every reply (JSON-ready); then the torch engine's."""
    from zeda_server.sglang_engine import SglangEngine

    record = await _sglang_replies(SglangEngine(str(TINY_ZEDA), max_batch=4))
    record["torch"] = await _torch_replies()
    return record


async def _sglang_replies(engine: Any) -> dict[str, Any]:
    """Turn ``engine``'s dial (server and request offsets) and record each reply; shuts the engine down."""
    try:
        record: dict[str, Any] = {"request_zero_offsets": engine.request_zero_offsets}
        record["base"] = await _reply(engine, PROMPT)
        record["long_base"] = await _reply(engine, LONG_PROMPT, max_tokens=48)
        await engine.set_zero_offset(-40.0)
        record["minus40"] = await _counted(engine, PROMPT)
        await engine.set_zero_offset(4.0)
        record["plus4"] = await _counted(engine, PROMPT)
        await engine.set_zero_offset(0.0)
        record["back"] = await _reply(engine, PROMPT)
        record["in_flight"] = await _in_flight(engine)
        await engine.set_zero_offset(0.0)
        record["after_in_flight"] = await _reply(engine, PROMPT)
        together = await asyncio.gather(_reply(engine, PROMPT, bias=-40.0), _reply(engine, PROMPT))
        record["request_minus40"], record["request_zero_beside"] = together
        await engine.set_zero_offset(-4.0)
        record["request_cancels_server"] = await _reply(engine, PROMPT, bias=4.0)
        return record
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def record() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same_reply(got: dict[str, Any], expected: dict[str, Any]) -> None:
    keys = ("tokens", "finish", "real", "zero")
    assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}


@sglang_test
def test_server_offset_minus_40_routes_no_zero_slot(record: dict[str, Any]) -> None:
    assert record["base"]["zero"] > 0  # tiny-zeda does use zero slots at offset 0
    assert record["minus40"]["zero"] == 0 and record["minus40"]["real"] > 0
    # The CPU MoE forward computed what the routed-experts return reports, and skipped nothing.
    assert record["minus40"]["forward"] == [record["minus40"]["real"], 0]


@sglang_test
def test_server_offset_plus_4_routes_more_zero_slots(record: dict[str, Any]) -> None:
    plus4, base = record["plus4"], record["base"]
    assert plus4["zero"] / (plus4["real"] + plus4["zero"]) > base["zero"] / (base["real"] + base["zero"])
    assert plus4["forward"] == [plus4["real"], plus4["zero"]]


@sglang_test
def test_offset_back_at_0_gives_the_greedy_reply_of_before(record: dict[str, Any]) -> None:
    """Offset 0 serves tiny-zeda unchanged (test_sglang_serve.py compares that with the torch engine)."""
    assert record["plus4"]["tokens"] != record["base"]["tokens"]  # the dial did change the replies
    _same_reply(record["back"], record["base"])
    _same_reply(record["after_in_flight"], record["base"])


@sglang_test
def test_the_dial_routes_as_on_the_torch_engine(record: dict[str, Any]) -> None:
    for name in ("base", "minus40", "plus4"):
        got = {k: v for k, v in record[name].items() if k != "forward"}
        assert got == record["torch"][name], name


@sglang_test
def test_a_request_in_flight_finishes_across_a_dial_change(record: dict[str, Any]) -> None:
    got, before = record["in_flight"], record["long_base"]
    assert got["finish"] in ("stop", "length") and len(got["tokens"]) > 1
    # Its prompt and first tokens were routed at 0, the rest at -40: some zero slots, fewer than at 0.
    assert 0 < got["zero"] < before["zero"]
    assert got["dial_s"] < 5.0  # the update does not wait for the request to finish


@sglang_test
def test_request_offsets_add_to_the_server_offset(record: dict[str, Any]) -> None:
    assert record["request_zero_offsets"] is True  # SGLang's CPU engine: every forward runs eagerly
    assert record["request_minus40"]["zero"] == 0
    _same_reply(record["request_zero_beside"], record["base"])  # its batch neighbour kept offset 0
    _same_reply(record["request_cancels_server"], record["base"])  # -4 + 4 = 0


@sglang_test
def test_gpu_hosts_refuse_request_offsets() -> None:
    """Without an eager forward (CUDA-graph replays) a request's offset would be lost: it is refused."""
    from zeda_server.engine_api import FailureReport, SamplingParams
    from zeda_server.sglang_engine import SglangEngine

    engine = object.__new__(SglangEngine)  # the refusal comes before SGLang is asked anything
    engine._failure, engine.request_zero_offsets = FailureReport(), False
    with pytest.raises(ValueError, match="zero_expert_bias"):
        asyncio.run(anext(engine.submit([1, 2], SamplingParams(max_tokens=1, zero_expert_bias=-1.0))))


if __name__ == "__main__":
    print(json.dumps(asyncio.run(observe())))
