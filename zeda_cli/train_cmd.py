"""``zeda train``: pretrain the tiny teacher; ZEDA stage 1 (SFT on teacher rollouts) and stage 2 (OPD)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train models", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True)
    teacher = stages.add_parser("teacher", help="pretrain the tiny Qwen3-MoE teacher on the local data")
    _add_recipe_arguments(teacher, Path("trainer/configs/tiny-teacher.yaml"))
    teacher.set_defaults(run=run_teacher)
    sft = stages.add_parser("sft", help="stage 1: SFT of the zero-expert student on the teacher's rollouts")
    _add_recipe_arguments(sft, Path("trainer/configs/tiny-sft.yaml"))
    sft.set_defaults(run=run_sft)
    opd = stages.add_parser("opd", help="stage 2: on-policy distillation of the student against the teacher")
    _add_recipe_arguments(opd, Path("trainer/configs/tiny-opd.yaml"))
    opd.set_defaults(run=run_opd)


def _add_recipe_arguments(parser: argparse.ArgumentParser, default_recipe: Path) -> None:
    parser.add_argument("--config", type=Path, default=default_recipe, help=f"YAML recipe (default {default_recipe})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")


def run_teacher(args: argparse.Namespace) -> int:
    from zeda_trainer.common.recipes import load_recipe
    from zeda_trainer.stages.pretrain import PretrainConfig, pretrain

    config = load_recipe(PretrainConfig, args.config, args.set)
    out = pretrain(config, resume=args.resume)
    print(f"teacher written to {out}")
    return 0


def run_sft(args: argparse.Namespace) -> int:
    from zeda_trainer.common.recipes import load_recipe
    from zeda_trainer.stages.sft import SftConfig, train_sft

    config = load_recipe(SftConfig, args.config, args.set)
    out = train_sft(config, resume=args.resume)
    print(f"SFT student written to {out}")
    return 0


def run_opd(args: argparse.Namespace) -> int:
    from zeda_trainer.common.recipes import load_recipe
    from zeda_trainer.stages.opd import OpdConfig, train_opd

    config = load_recipe(OpdConfig, args.config, args.set)
    out = train_opd(config, resume=args.resume)
    print(f"OPD student written to {out}")
    return 0
