"""The SGLang backend's hot-swap orchestration: file checks first, SGLang's weight update, smoke test, rollback.

SGLang's engine needs a GPU, so here its tokenizer manager is a stand-in that records the
weight-update calls it receives (and can refuse them), and the smoke generation is a stand-in
that can fail. What is under test is our side: the order of the steps, what is refused before
SGLang is asked, and what state is restored when a step fails.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file
from sglang_guard import HAVE_SGLANG, sglang_marks
from transformers import AutoTokenizer

from zeda_core.checkpoint import checkpoint_routing_spec
from zeda_server.candidates import CandidateRejected
from zeda_server.engine import StepOutput
from zeda_server.versions import checkpoint_fingerprint

pytestmark = sglang_marks()
if HAVE_SGLANG:  # the engine module imports SGLang; without it every test here is skipped
    from zeda_server.sglang_engine import SglangEngine


class TokenizerManagerStandIn:
    """Records ``update_weights_from_disk`` requests; refuses them while ``refuse`` is set."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.refuse = False

    async def update_weights_from_disk(self, request, _):
        if self.refuse:
            return False, "load failed", 0
        self.loaded.append(request.model_path)
        return True, "ok", 0


def _engine(served: Path, smoke_fails_on: set[str]) -> tuple[SglangEngine, TokenizerManagerStandIn]:
    manager = TokenizerManagerStandIn()
    engine = SglangEngine.__new__(SglangEngine)
    engine.checkpoint, engine.fingerprint, engine.previous = served, checkpoint_fingerprint(served), None
    engine.spec = checkpoint_routing_spec(served)
    engine.tokenizer = AutoTokenizer.from_pretrained(served)
    engine.engine = SimpleNamespace(tokenizer_manager=manager)

    async def smoke(prompt_ids, params):
        if str(engine.checkpoint) in smoke_fails_on:
            raise RuntimeError("NaN logits")
        yield StepOutput("ok", [1], [], finish_reason="length")

    engine.submit = smoke
    return engine, manager


@pytest.fixture()
def candidates(small_student: Path, tmp_path: Path) -> dict[str, Path]:
    good, bad = tmp_path / "good", tmp_path / "nan"
    for path in (good, bad):
        shutil.copytree(small_student, path)
    state = load_file(good / "model.safetensors")
    state["model.layers.0.mlp.gate.weight"] += 0.1
    save_file(state, good / "model.safetensors")
    state["model.layers.0.mlp.gate.weight"][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors")
    return {"good": good, "nan": bad}


def test_swap_then_rollback_go_through_the_weight_update(small_student: Path, candidates: dict[str, Path]) -> None:
    engine, manager = _engine(small_student, set())
    before = engine.fingerprint
    current = asyncio.run(engine.swap_checkpoint(str(candidates["good"]), "all"))
    assert manager.loaded == [str(candidates["good"])]
    assert current == {"fingerprint": checkpoint_fingerprint(candidates["good"]), "source": str(candidates["good"])}
    assert engine.versions()["previous"] == {"fingerprint": before, "source": str(small_student)}
    back = asyncio.run(engine.rollback())
    assert manager.loaded[-1] == str(small_student) and back["fingerprint"] == before


def test_bad_checkpoints_never_reach_sglang(small_student: Path, candidates: dict[str, Path]) -> None:
    engine, manager = _engine(small_student, set())
    with pytest.raises(CandidateRejected, match="non-finite"):
        asyncio.run(engine.swap_checkpoint(str(candidates["nan"]), "all"))
    with pytest.raises(CandidateRejected, match="whole checkpoints"):
        asyncio.run(engine.swap_checkpoint(str(candidates["good"]), "router"))
    with pytest.raises(LookupError, match="no previous version"):
        asyncio.run(engine.rollback())
    assert manager.loaded == [] and engine.checkpoint == small_student


def test_failed_smoke_test_or_refused_update_keeps_the_served_weights(
    small_student: Path, candidates: dict[str, Path]
) -> None:
    engine, manager = _engine(small_student, {str(candidates["good"])})
    before = engine.fingerprint
    with pytest.raises(CandidateRejected, match="smoke generation failed"):
        asyncio.run(engine.swap_checkpoint(str(candidates["good"]), "all"))
    assert manager.loaded == [str(candidates["good"]), str(small_student)]  # loaded, then put back
    assert (engine.checkpoint, engine.fingerprint, engine.previous) == (small_student, before, None)

    engine, manager = _engine(small_student, set())
    manager.refuse = True
    with pytest.raises(CandidateRejected, match="SGLang refused"):
        asyncio.run(engine.swap_checkpoint(str(candidates["good"]), "all"))
    assert engine.fingerprint == before and engine.previous is None
