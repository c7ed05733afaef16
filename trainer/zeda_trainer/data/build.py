"""Build the local dataset: skills splits, stdlib code/prose splits, SFT/OPD prompt sets, manifest.

Layout of the output directory (all JSONL, one object per line, keys sorted)::

    skills/{train,validation,test}.jsonl   {"skill", "prompt", "answer", "scorer": "exact"}
    text/{train,validation,test}.jsonl     {"domain": "code"|"prose", "text"}
    prompts/{sft,opd}.jsonl                {"prompt", "domain", "chat": bool}
    manifest.json                          seed, sizes, python version, per-file count and sha256

No prompt of validation or test appears in train or in a prompt set; SFT and OPD prompts are
disjoint; every stdlib file belongs to exactly one split.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zeda_core.atomic import atomic_directory
from zeda_trainer.data.skills import EVAL_GENERATORS, SKILLS, Example
from zeda_trainer.data.stdlib import code_chunks, docstrings, split_of, stdlib_files, stdlib_root

DATA_VERSION = 2
SPLITS = ("train", "validation", "test")
TEXT_PROMPT_CHARS = 200
HELD_OUT_TEXT_CHARS = {"code": 300_000, "prose": 100_000}  # per held-out split


# Train examples per skill, relative to ``train_per_skill``. Skills that a tiny model learns in a
# few thousand steps (copy, reverse, brackets) get less; multi-digit arithmetic gets most.
SKILL_WEIGHTS = {
    "addition": 2.7,
    "subtraction": 1.3,
    "multiplication": 1.3,
    "copy": 0.35,
    "reverse": 0.35,
    "sort": 0.7,
    "brackets": 0.35,
    "recall": 0.95,
}


@dataclass(frozen=True)
class DataSizes:
    """How much of each part to build; skill ``s`` gets ``train_per_skill * SKILL_WEIGHTS[s]`` examples."""

    train_per_skill: int = 55_000
    eval_per_skill: int = 200
    code_train_chars: int = 4_000_000
    prose_train_chars: int = 1_500_000
    sft_prompts_per_skill: int = 1_000
    opd_prompts_per_skill: int = 300
    sft_text_prompts: int = 1_000
    opd_text_prompts: int = 300


def build_dataset(out_dir: str | Path, seed: int = 0, sizes: DataSizes | None = None, overwrite: bool = False) -> dict:
    """Write the dataset to ``out_dir`` atomically and return its manifest."""
    sizes = sizes or DataSizes()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        skills = _skill_splits(seed, sizes)
        text = _text_splits(seed, sizes)
        prompts = _prompt_sets(seed, sizes, skills, text)
        files = {f"skills/{k}.jsonl": v for k, v in skills.items()}
        files |= {f"text/{k}.jsonl": v for k, v in text.items()}
        files |= {f"prompts/{k}.jsonl": v for k, v in prompts.items()}
        manifest = {
            "version": DATA_VERSION,
            "seed": seed,
            "sizes": asdict(sizes),
            "python": platform.python_version(),
            "files": {name: _write_jsonl(tmp / name, rows) for name, rows in files.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows).encode()
    path.write_bytes(data)
    return {"count": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def _draw_examples(
    generate: Callable[[random.Random], Example],
    rng: random.Random,
    count: int,
    excluded: set[str],
    distinct: bool = True,
) -> list[Example]:
    """``count`` examples whose prompts are not in ``excluded``.

    With ``distinct`` the prompts are also distinct from each other and are added to ``excluded``.
    """
    examples: list[Example] = []
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise RuntimeError(f"cannot draw {count} distinct prompts from {generate.__name__}")
        prompt, answer = generate(rng)
        if prompt in excluded:
            continue
        if distinct:
            excluded.add(prompt)
        examples.append((prompt, answer))
    return examples


def _skill_rows(skill: str, examples: Iterable[Example]) -> list[dict[str, Any]]:
    return [{"skill": skill, "prompt": p, "answer": a, "scorer": "exact"} for p, a in examples]


def _skill_splits(seed: int, sizes: DataSizes) -> dict[str, list[dict[str, Any]]]:
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for index, skill in enumerate(tqdm(SKILLS, desc="skills", unit="skill")):
        taken: set[str] = set()
        for offset, split in ((2, "test"), (1, "validation")):
            rng = random.Random(seed * 1000 + index * 10 + offset)
            splits[split] += _skill_rows(
                skill, _draw_examples(EVAL_GENERATORS[skill], rng, sizes.eval_per_skill, taken)
            )
        rng = random.Random(seed * 1000 + index * 10)
        splits["train"] += _skill_rows(
            skill,
            _draw_examples(
                SKILLS[skill], rng, round(sizes.train_per_skill * SKILL_WEIGHTS[skill]), taken, distinct=False
            ),
        )
    return splits


def _text_splits(seed: int, sizes: DataSizes) -> dict[str, list[dict[str, Any]]]:
    docs: dict[str, dict[str, list[str]]] = {split: {"code": [], "prose": []} for split in SPLITS}
    root = stdlib_root()
    for path in tqdm(stdlib_files(), desc="stdlib", unit="file"):
        source = path.read_text(encoding="utf-8", errors="replace")
        split = split_of(path.relative_to(root).as_posix(), seed)
        docs[split]["code"] += code_chunks(source)
        docs[split]["prose"] += docstrings(source)
    # The stdlib repeats some chunks and docstrings verbatim across files: keep each text in the
    # first split that has it (train, then validation, then test), so no text crosses splits.
    seen: set[str] = set()
    for split in SPLITS:
        for domain, texts in docs[split].items():
            docs[split][domain] = [text for text in dict.fromkeys(texts) if text not in seen]
        seen.update(text for texts in docs[split].values() for text in texts)
    rng = random.Random(seed)
    caps = {"code": sizes.code_train_chars, "prose": sizes.prose_train_chars}
    splits: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        rows = []
        for domain, texts in docs[split].items():
            rng.shuffle(texts)
            budget = caps[domain] if split == "train" else HELD_OUT_TEXT_CHARS[domain]
            kept = 0
            for text in texts:
                if kept >= budget:
                    break
                rows.append({"domain": domain, "text": text})
                kept += len(text)
        splits[split] = rows
    return splits


def _prompt_sets(
    seed: int, sizes: DataSizes, skills: dict[str, list[dict[str, Any]]], text: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    held_out = {row["prompt"] for split in ("validation", "test") for row in skills[split]}
    sets: dict[str, list[dict[str, Any]]] = {"sft": [], "opd": []}
    for index, skill in enumerate(SKILLS):
        taken = set(held_out)
        for name, count, offset in (("sft", sizes.sft_prompts_per_skill, 3), ("opd", sizes.opd_prompts_per_skill, 4)):
            rng = random.Random(seed * 1000 + index * 10 + offset)
            examples = _draw_examples(SKILLS[skill], rng, count, taken)
            sets[name] += [{"prompt": p, "domain": skill, "chat": True} for p, _ in examples]
    train_docs = list(text["train"])
    random.Random(seed + 7).shuffle(train_docs)
    cut = sizes.sft_text_prompts
    for name, docs in (("sft", train_docs[:cut]), ("opd", train_docs[cut : cut + sizes.opd_text_prompts])):
        sets[name] += [{"prompt": d["text"][:TEXT_PROMPT_CHARS], "domain": d["domain"], "chat": False} for d in docs]
    return sets
