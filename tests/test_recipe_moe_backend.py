"""The ``moe_backend`` recipe key: SFT and OPD train the student through the chosen experts backend."""

import json
from pathlib import Path

import pytest

from zeda_core import ZedaError
from zeda_core.model_queries import moe_blocks
from zeda_kernels import moe as moe_module
from zeda_trainer.common import loop
from zeda_trainer.common.recipes import load_recipe
from zeda_trainer.stages import opd, sft
from zeda_trainer.stages.opd import OpdConfig, train_opd
from zeda_trainer.stages.sft import SftConfig, train_sft

MODELS = Path(__file__).resolve().parents[1] / "models"
ONE_STEP = {"max_steps": 1, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 1}


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chat": False}) + "\n" for p in ("Sort: 3 1 2", "Add: 4 + 5")))
    return path


@pytest.fixture
def trained_backends(monkeypatch) -> dict[str, object]:
    """Records the student's experts backends and the weight-gradient kernel launches of the run."""
    seen: dict[str, object] = {"backends": set(), "wgrad": 0}

    def recording_run_training(accelerator, model, *args, **kwargs):
        seen["backends"] = {block.experts_backend.name for block in moe_blocks(model)}
        return loop.run_training(accelerator, model, *args, **kwargs)

    def counting_wgrad(*args, _real=moe_module._grouped_wgrad, **kwargs):
        seen["wgrad"] += 1
        return _real(*args, **kwargs)

    for stage in (sft, opd):
        monkeypatch.setattr(stage, "run_training", recording_run_training)
    monkeypatch.setattr(moe_module, "_grouped_wgrad", counting_wgrad)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return seen


def test_sft_trains_the_student_with_the_triton_kernel(prompts: Path, tmp_path: Path, trained_backends) -> None:
    config = SftConfig(
        teacher=MODELS / "tiny-teacher",
        prompts=prompts,
        run_dir=tmp_path / "run",
        out=tmp_path / "out",
        batch_size=2,
        rollout={"max_new_tokens": 2},
        optim=ONE_STEP,
        moe_backend="triton",
    )
    train_sft(config)
    assert trained_backends["backends"] == {"triton"} and trained_backends["wgrad"] > 0


def test_opd_trains_the_student_with_the_triton_kernel(prompts: Path, tmp_path: Path, trained_backends) -> None:
    config = OpdConfig(
        student=MODELS / "tiny-zeda",
        teacher=str(MODELS / "tiny-teacher"),
        prompts=prompts,
        run_dir=tmp_path / "run",
        out=tmp_path / "out",
        batch_size=1,
        sampling={"max_new_tokens": 2},
        optim=ONE_STEP,
        moe_backend="triton",
    )
    train_opd(config)
    assert trained_backends["backends"] == {"triton"} and trained_backends["wgrad"] > 0


@pytest.mark.parametrize("recipe", [SftConfig, OpdConfig])
def test_unknown_moe_backend_is_refused(recipe: type) -> None:
    with pytest.raises(ZedaError, match=r"moe_backend.*'auto', 'torch' or 'triton'"):
        load_recipe(recipe, None, ["moe_backend=fast"])
