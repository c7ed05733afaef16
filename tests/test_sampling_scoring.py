"""The shared sampler, sequence scorer and chat templater of zeda_core."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from zeda_core import ZedaError, chat_prompt_ids, load_model, sample_next_tokens, score_sequences
from zeda_core.model_queries import model_spec
from zeda_trainer.common.prompts import prompt_ids
from zeda_trainer.data.tokenizer import chat_text

TINY_ZEDA = Path(__file__).resolve().parents[1] / "models" / "tiny-zeda"


@pytest.fixture(scope="module")
def tiny_zeda() -> torch.nn.Module:
    return load_model(TINY_ZEDA).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_ZEDA)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    tokens = sample_next_tokens(logits, temperature=0.0, top_p=0.5)
    assert tokens.dtype == torch.long and tokens.shape == (8,)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(256, 40, generator=torch.Generator().manual_seed(1))
    first = sample_next_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(7))
    again = sample_next_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(7))
    other = sample_next_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_top_p_never_leaves_the_nucleus() -> None:
    # sorted mass 0.5, 0.8, 0.9, ...: the smallest set holding 0.75 is tokens {3, 1}
    probs = torch.tensor([0.05, 0.3, 0.05, 0.5, 0.1])
    logits = probs.log().repeat(4000, 1)
    tokens = sample_next_tokens(logits, 1.0, 0.75, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 3}
    share = float((tokens == 3).float().mean())
    assert share == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised inside the nucleus
    everything = sample_next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_logits(temperature: float) -> None:
    logits = torch.tensor([[0.0, 1.0]]).repeat(20000, 1)
    tokens = sample_next_tokens(logits, temperature, 1.0, torch.Generator().manual_seed(0))
    expected = float(torch.sigmoid(torch.tensor(1.0 / temperature)))
    assert float(tokens.float().mean()) == pytest.approx(expected, abs=0.015)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_with_cuda_logits() -> None:
    logits = torch.randn(16, 30, generator=torch.Generator().manual_seed(0))
    on_cpu = sample_next_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(3))
    on_gpu = sample_next_tokens(logits.cuda(), 1.0, 0.9, torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), on_cpu)


def _direct_logprobs(model: torch.nn.Module, sequence: list[int]) -> list[float]:
    """The reference: one unpadded sequence, one forward, no shared helper."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(sequence) - 1), sequence[1:]].tolist()


def test_score_sequences_equals_one_forward_per_sequence(tiny_zeda: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in (7, 1, 12, 3, 9)]
    spec = model_spec(tiny_zeda)
    for batch_size in (None, 2):
        scores = score_sequences(tiny_zeda, sequences, pad_token_id=0, batch_size=batch_size)
        assert [len(s) for s in scores.logprobs] == [n - 1 for n in map(len, sequences)]
        for got, sequence in zip(scores.logprobs, sequences, strict=True):
            assert got == pytest.approx(_direct_logprobs(tiny_zeda, sequence), abs=1e-5)
        assert scores.tokens == sum(map(len, sequences))
        counts = scores.slot_counts
        assert counts.dtype == torch.long and counts.shape == (len(tiny_zeda.model.layers), 2)
        assert counts.sum(dim=1).tolist() == [scores.tokens * spec.top_k] * counts.shape[0]
        assert int(counts[:, 1].sum()) > 0  # the zero experts do take slots
    whole = score_sequences(tiny_zeda, sequences, pad_token_id=0)
    assert torch.equal(whole.slot_counts, score_sequences(tiny_zeda, sequences, 0, batch_size=2).slot_counts)


class _PlainLm(torch.nn.Module):
    """A language model without zero-aware MoE blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.embed(input_ids) @ self.embed.weight.T)


def test_score_sequences_of_a_plain_model_and_empty_input() -> None:
    scores = score_sequences(_PlainLm(), [[1, 2, 3], [4, 5]], pad_token_id=0)
    assert scores.slot_counts is None and scores.tokens == 5
    assert [len(s) for s in scores.logprobs] == [2, 1]
    with pytest.raises(ZedaError, match="empty"):
        score_sequences(_PlainLm(), [[1, 2], []], pad_token_id=0)


def test_chat_prompt_ids_open_the_assistant_turn(tokenizer) -> None:
    messages = [{"role": "user", "content": "Copy: a b"}]
    ids = chat_prompt_ids(tokenizer, messages)
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert ids == tokenizer(chat_text("Copy: a b")).input_ids
    assert prompt_ids(tokenizer, "Copy: a b") == ids


def test_chat_prompt_ids_without_a_template(tokenizer) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ZedaError, match="no chat template"):
        chat_prompt_ids(plain, [{"role": "user", "content": "hi"}])
    assert prompt_ids(plain, "hi") == plain("hi").input_ids  # raw text, no template
