"""Session fixtures: a small local dataset and a reduced teacher trained on it (about a minute).

Without a CUDA device, Triton kernels run in its interpreter on CPU tensors; the variable must be
set before Triton is first imported.
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from zeda_core import inject_zero_experts, load_model, save_model
from zeda_trainer.common.loop import OptimConfig
from zeda_trainer.data.build import DataSizes, build_dataset
from zeda_trainer.stages.pretrain import PretrainConfig, TeacherShape, pretrain

SMALL_SIZES = DataSizes(
    train_per_skill=1500,
    eval_per_skill=12,
    code_train_chars=80_000,
    prose_train_chars=30_000,
    sft_prompts_per_skill=20,
    opd_prompts_per_skill=10,
    sft_text_prompts=20,
    opd_text_prompts=10,
)


def small_teacher_config(data_dir: Path, run_dir: Path, out: Path, max_steps: int = 60) -> PretrainConfig:
    return PretrainConfig(
        data_dir=data_dir,
        run_dir=run_dir,
        out=out,
        shape=TeacherShape(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            vocab_size=384,
        ),
        block_size=96,
        batch_size=16,
        optim=OptimConfig(max_steps=max_steps, warmup_steps=5, lr=3e-3, log_every=10, checkpoint_every=30),
    )


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data"
    build_dataset(path, seed=0, sizes=SMALL_SIZES)
    return path


@pytest.fixture(scope="session")
def small_teacher(tmp_path_factory, small_data: Path) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    return pretrain(small_teacher_config(small_data, root / "run", root / "teacher"))


@pytest.fixture(scope="session")
def small_student(small_teacher: Path, tmp_path_factory) -> Path:
    """The small teacher with 4 zero experts injected (gaussian init): a ZEDA model that uses zero slots."""
    model = load_model(small_teacher, zero_aware=False)
    inject_zero_experts(model, 4, init="gaussian", seed=0)
    return save_model(model, tmp_path_factory.mktemp("student") / "student", side_files_from=small_teacher)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``docker`` run only when ``-m`` names them (docker/smoke.sh: ``pytest -m docker``)."""
    if "docker" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("docker")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("docker")]
