"""The shipped full-size recipes, dry-run end to end (SFT, then OPD) on tiny models of the same families."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from zeda_core import load_model, save_model
from zeda_core.families import FAMILIES
from zeda_core.spec import read_num_zero_experts
from zeda_trainer.common.recipes import load_recipe
from zeda_trainer.stages.opd import OpdConfig, train_opd
from zeda_trainer.stages.sft import SftConfig, train_sft

CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.mark.parametrize(("recipe", "family"), [("qwen3-30b-a3b", "qwen3_moe"), ("glm-4.7-flash", "glm4_moe_lite")])
def test_full_size_recipe_dry_run(recipe: str, family: str, small_teacher: Path, small_data: Path, tmp_path: Path):
    torch.manual_seed(0)
    config = FAMILIES[family].tiny_config()
    config.vocab_size = load_model(small_teacher).config.vocab_size
    teacher = save_model(AutoModelForCausalLM.from_config(config), tmp_path / "teacher")
    for name in TOKENIZER_FILES:
        shutil.copy(small_teacher / name, teacher / name)
    num_experts = config.n_routed_experts if hasattr(config, "n_routed_experts") else config.num_experts

    sft = load_recipe(
        SftConfig,
        CONFIGS / f"{recipe}-sft.yaml",
        [
            f"teacher={teacher}",
            f"prompts={small_data / 'prompts' / 'sft.jsonl'}",
            f"run_dir={tmp_path / 'sft'}",
            f"out={tmp_path / 'student-sft'}",
            f"zero_experts={num_experts // 2}",
            "rollout.max_new_tokens=4",
            "batch_size=4",
            "optim.max_steps=2",
            "optim.warmup_steps=1",
        ],
    )
    assert sft.optim.lr == 2e-5 and sft.optim.betas == (0.9, 0.98) and sft.group_loss.alpha == 0.1
    student = train_sft(sft)
    opd = load_recipe(
        OpdConfig,
        CONFIGS / f"{recipe}-opd.yaml",
        [
            f"student={student}",
            f"teacher={teacher}",
            f"prompts={small_data / 'prompts' / 'opd.jsonl'}",
            f"run_dir={tmp_path / 'opd'}",
            f"out={tmp_path / 'student'}",
            "sampling.max_new_tokens=4",
            "batch_size=2",
            "optim.max_steps=2",
            "optim.warmup_steps=1",
        ],
    )
    assert opd.samples_per_prompt == 2 and opd.routing_replay
    out = train_opd(opd)
    assert read_num_zero_experts(json.loads((out / "config.json").read_text())) == num_experts // 2
    assert (tmp_path / "opd" / "metrics.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize(("name", "kind"), [("fsdp-8gpu.yaml", "FSDP"), ("deepspeed-zero3-8gpu.yaml", "DEEPSPEED")])
def test_multi_gpu_accelerate_configs_parse(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / name))
    assert config.distributed_type.name == kind and config.num_processes == 8 and config.mixed_precision == "bf16"


def test_tiny_sft_recipe_lands_its_zero_share_on_target(small_teacher: Path, small_data: Path, tmp_path: Path):
    """`make zeda`'s stage 1 (tiny-sft.yaml) on a smaller budget (120 steps, 40-step ramp, smaller
    batches): the training batches' zero share settles within 0.05 of the L_GA target after the ramp."""
    sft = load_recipe(
        SftConfig,
        CONFIGS / "tiny-sft.yaml",
        [
            f"teacher={small_teacher}",
            f"prompts={small_data / 'prompts' / 'sft.jsonl'}",
            f"text.path={small_data / 'text' / 'train.jsonl'}",
            f"run_dir={tmp_path / 'run'}",
            f"out={tmp_path / 'student'}",
            "rollout.max_new_tokens=24",
            "batch_size=8",
            "text.rows=4",
            "optim.max_steps=120",
            "zero_ramp_steps=40",  # 40 steps of 1 logit lift the zero rows from the preserve offset (-30)
            "zero_ramp_step_size=1.0",
            "optim.log_every=1",
            "optim.checkpoint_every=120",
        ],
    )
    train_sft(sft)
    summary = json.loads((tmp_path / "student" / "training.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    settled = [r["r_ze"] for r in records if r["step"] > 80]
    assert len(settled) == 40
    assert abs(sum(settled) / len(settled) - summary["target_zero_ratio"]) < 0.05
