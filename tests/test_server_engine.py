"""Torch engine: continuous batching, batch invariance, exact per-request routing attribution."""

import asyncio
import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from zeda_core import load_model
from zeda_core.sampling import sample_next_tokens
from zeda_server.engine import TorchEngine
from zeda_server.engine_api import Engine, QueueFull, SamplingParams
from zeda_server.text_stream import TextStream
from zeda_trainer.common.generation import generate


@pytest.fixture(scope="module")
def engine(small_student: Path):
    engine = TorchEngine(str(small_student), max_batch=32, max_queue=64)
    yield engine
    engine.shutdown()


def _prompts(engine: TorchEngine, count: int) -> list[list[int]]:
    return [engine.chat_prompt([{"role": "user", "content": f"What is {i} + {2 * i + 3}?"}]) for i in range(count)]


async def _run(engine: TorchEngine, prompt: list[int], params: SamplingParams):
    tokens, logprobs, text, final = [], [], "", None
    async for output in engine.submit(prompt, params):
        tokens += output.token_ids
        logprobs += output.logprobs
        text += output.text
        final = output
    return tokens, logprobs, text, final


@contextlib.contextmanager
def _forward_rows(model: torch.nn.Module) -> Iterator[list[int]]:
    """The batch rows of every forward ``model`` runs inside the block."""
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        yield rows
    finally:
        hook.remove()


def test_greedy_tokens_are_the_same_alone_and_in_a_batch_of_16(engine: TorchEngine) -> None:
    prompts = _prompts(engine, 16)
    assert len({len(p) for p in prompts}) > 1  # the batch is padded
    params = SamplingParams(max_tokens=12, temperature=0.0)

    async def alone():
        return [await _run(engine, p, params) for p in prompts]

    async def together():
        # The engine thread admits requests under this lock: holding it until all 16 are queued
        # makes them one prefill, then one decode batch.
        with engine._wake:
            tasks = [asyncio.create_task(_run(engine, p, params)) for p in prompts]
            while engine.queue_depth < len(prompts):
                await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    with _forward_rows(engine.model) as rows_alone:
        single = asyncio.run(alone())
    with _forward_rows(engine.model) as rows_together:
        batched = asyncio.run(together())
    assert set(rows_alone) == {1} and rows_together[0] == 16  # they really shared a batch
    for (tokens_a, logprobs_a, text_a, _), (tokens_b, logprobs_b, text_b, _) in zip(single, batched, strict=True):
        assert tokens_a == tokens_b and text_a == text_b
        torch.testing.assert_close(torch.tensor(logprobs_b), torch.tensor(logprobs_a), rtol=0, atol=1e-4)


def test_usage_is_exact_per_request_in_a_shared_batch(engine: TorchEngine, small_student: Path) -> None:
    """Each request's slot counts equal those of the same request generated alone by the reference loop."""
    prompts = _prompts(engine, 6)
    limits = [3, 9, 1, 6, 12, 5]
    model, tokenizer = load_model(small_student), AutoTokenizer.from_pretrained(small_student)

    async def together():
        return await asyncio.gather(
            *(
                _run(engine, p, SamplingParams(max_tokens=n, temperature=0.0))
                for p, n in zip(prompts, limits, strict=True)
            )
        )

    results = asyncio.run(together())
    for prompt, limit, (tokens, _, _, final) in zip(prompts, limits, results, strict=True):
        reference = generate(model, [prompt], limit, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
        assert tokens == reference.tokens
        expected = reference.slot_counts
        assert final.report.real_slots == int(expected[:, 0].sum())
        assert final.report.zero_slots == int(expected[:, 1].sum())
        assert final.report.tokens == reference.processed_tokens
        assert final.prompt_tokens == len(prompt) and final.completion_tokens == len(tokens)
        assert final.report.zero_slots > 0  # the student routes to zero experts


def test_seeded_sampling_is_reproducible_and_respects_max_tokens(engine: TorchEngine) -> None:
    prompt = _prompts(engine, 1)[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first = asyncio.run(_run(engine, prompt, params))
    second = asyncio.run(_run(engine, prompt, params))
    assert first[0] == second[0] and len(first[0]) <= 10
    assert first[3].finish_reason in {"stop", "length"}

    def tokens(**sampling) -> list[int]:
        return asyncio.run(_run(engine, prompt, SamplingParams(max_tokens=10, **sampling)))[0]

    greedy = tokens(temperature=0.0)
    model, tokenizer = engine.model, engine.tokenizer
    assert greedy == generate(model, [prompt], 10, tokenizer.eos_token_id, tokenizer.pad_token_id)[0].tokens
    sampled = [tokens(temperature=1.0, seed=seed) for seed in range(4)]
    assert len({tuple(t) for t in sampled}) > 1  # the seed matters
    assert all(t != greedy for t in sampled)  # temperature 1 samples, it does not take the argmax
    assert all(tokens(temperature=1.0, top_p=1e-6, seed=seed) == greedy for seed in range(2))  # a nucleus of 1


@pytest.mark.parametrize(("temperature", "top_p"), [(0.5, 1.0), (2.0, 1.0), (1.0, 0.8)])
def test_sampler_draws_from_the_tempered_nucleus(temperature: float, top_p: float) -> None:
    """Token frequencies over 4000 draws from one logit row match softmax(logits / T) cut to the top-p nucleus."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    generator = torch.Generator().manual_seed(0)
    draws = sample_next_tokens(logits.expand(4000, -1), temperature, top_p, generator)
    frequencies = torch.bincount(draws, minlength=len(logits)) / len(draws)
    expected = torch.softmax(logits / temperature, dim=-1)  # logits are sorted: the nucleus is a prefix
    expected = torch.where(expected.cumsum(-1) - expected <= top_p, expected, 0.0)
    expected /= expected.sum()
    assert (frequencies[expected == 0] == 0).all()
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.03)


def test_queue_bound_and_cancellation(small_student: Path) -> None:
    engine = TorchEngine(str(small_student), max_batch=1, max_queue=1)
    prompt = _prompts(engine, 1)[0]

    async def scenario():
        stream = engine.submit(prompt, SamplingParams(max_tokens=500, temperature=0.0))
        await anext(stream)
        with pytest.raises(QueueFull):
            await anext(engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0.0)))
        await stream.aclose()  # the client went away: its row leaves at the next step
        for _ in range(200):
            if engine.running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.running == 0
        return await _run(engine, prompt, SamplingParams(max_tokens=2, temperature=0.0))

    try:
        tokens, *_ = asyncio.run(scenario())
        assert len(tokens) <= 2
    finally:
        engine.shutdown()


def test_score_matches_a_full_forward(engine: TorchEngine, small_student: Path) -> None:
    sequences = [[1, 5, 9, 13, 2], [1, 7, 3]]
    scores, report, _ = asyncio.run(engine.score(sequences))
    model = load_model(small_student)
    for sequence, got in zip(sequences, scores, strict=True):  # the second one is padded in the batch
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sequence])).logits
        targets = torch.tensor(sequence[1:])
        expected = torch.log_softmax(logits[0, :-1].float(), -1)[torch.arange(len(targets)), targets]
        torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-5, atol=1e-5)
    assert len(scores[1]) == 2 and report.tokens == 8


@pytest.mark.parametrize(
    ("pieces", "stop", "shown", "stopped"),
    [
        (["Hel", "lo wor", "ld"], [], "Hello world", False),
        (["ab", "c<", "|e", "nd> more"], ["<|end>"], "abc", True),
        (["ab", "c<", "x"], ["<|end>"], "abc<x", False),
    ],
)
def test_text_stream_holds_back_possible_stop_strings(pieces, stop, shown, stopped) -> None:
    class Characters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(pieces[: len(ids)])

    stream = TextStream(Characters(), stop)
    out = ""
    for count in range(1, len(pieces) + 1):
        stream.update(list(range(count)))
        out += stream.delta(final=stream.stopped)
        if stream.stopped:
            break
    out += stream.delta(final=True)
    assert out == shown and stream.stopped == stopped


def test_kv_token_cap_queues_requests_past_it_and_serves_them_all(small_student: Path) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0)
    probe = TorchEngine(str(small_student), max_batch=8)
    prompts = _prompts(probe, 6)
    probe.shutdown()
    widest = max(len(p) for p in prompts) + params.max_tokens
    engine = TorchEngine(str(small_student), max_batch=8, max_total_tokens=2 * widest)  # 2 rows fit, not 3
    assert engine.max_total_tokens == 2 * widest
    most_running = [0]

    async def one(prompt: list[int]) -> str:
        final = None
        async for output in engine.submit(prompt, params):
            most_running[0] = max(most_running[0], engine.running)
            final = output
        return final.finish_reason

    async def everyone() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        finishes = asyncio.run(everyone())
    finally:
        engine.shutdown()
    assert all(reason in {"stop", "length"} for reason in finishes)
    assert most_running[0] == 2  # the cap, not max_batch, bounds the batch; the rest queued
    default = TorchEngine(str(small_student), max_batch=3)
    assert default.max_total_tokens == 3 * default.context_length
    default.shutdown()


def _protocol_members() -> dict[str, object]:
    """Name -> declaration of every member of the Engine protocol (attributes, properties, methods)."""
    declared = {name: value for name, value in vars(Engine).items() if not name.startswith("_")}
    return declared | {name: None for name in inspect.get_annotations(Engine)}


def _missing_members(engine_class: type) -> list[str]:
    """Protocol members ``engine_class`` lacks or declares differently (kind, parameters, async-ness)."""
    wrong = []
    for name, declared in _protocol_members().items():
        if declared is None:  # an attribute: set in __init__, declared on the class
            if name not in inspect.get_annotations(engine_class):
                wrong.append(name)
            continue
        actual = getattr(engine_class, name, None)
        if isinstance(declared, property):
            if not isinstance(actual, property):
                wrong.append(name)
            continue
        same_kind = actual is not None and inspect.iscoroutinefunction(declared) == inspect.iscoroutinefunction(actual)
        if not same_kind or list(inspect.signature(declared).parameters) != list(inspect.signature(actual).parameters):
            wrong.append(name)
    return wrong


def test_both_engines_implement_the_engine_protocol(engine: TorchEngine) -> None:
    pytest.importorskip("sglang")
    from zeda_server.sglang_engine import SglangEngine

    assert {"submit", "score", "on_failure", "tokenizer", "fingerprint"} <= set(_protocol_members())
    assert isinstance(engine, Engine)
    assert _missing_members(TorchEngine) == []
    assert _missing_members(SglangEngine) == []


def test_the_server_and_generate_run_one_runner(engine: TorchEngine) -> None:
    """Greedy requests sharing the server's batch get exactly generate()'s tokens and slot counts for that batch."""
    prompts = _prompts(engine, 8)
    limits = [3, 9, 1, 6, 12, 5, 2, 8]

    async def together():
        with engine._wake:  # one prefill of all 8, as generate() runs them
            tasks = [
                asyncio.create_task(_run(engine, p, SamplingParams(max_tokens=n, temperature=0.0)))
                for p, n in zip(prompts, limits, strict=True)
            ]
            while engine.queue_depth < len(prompts):
                await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    with _forward_rows(engine.model) as rows:
        served = asyncio.run(together())
    tokenizer = engine.tokenizer
    reference = generate(engine.model, prompts, limits, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert rows[0] == len(prompts)
    for (tokens, _, _, final), expected in zip(served, reference, strict=True):
        assert tokens == expected.tokens
        assert final.report.tokens == expected.processed_tokens
        assert final.report.real_slots == int(expected.slot_counts[:, 0].sum())
        assert final.report.zero_slots == int(expected.slot_counts[:, 1].sum())
