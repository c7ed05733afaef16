"""Code and prose documents from the running interpreter's standard library.

Each source file goes wholly to one split (chosen by a hash of its relative path), so code and
docstrings never leak between train, validation and test.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "__pycache__"}
MAX_CODE_CHARS = 1500
MIN_DOCSTRING_CHARS = 80


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Sorted ``.py`` files of the standard library, tests and bundled tools excluded."""
    root = stdlib_root()
    files = [p for p in root.rglob("*.py") if not SKIP_PARTS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(relative_path: str, seed: int) -> str:
    """'train', 'validation' or 'test' for a file: 90 / 5 / 5 by a seeded hash of its path."""
    bucket = int(hashlib.sha256(f"{seed}:{relative_path}".encode()).hexdigest(), 16) % 100
    return "validation" if bucket < 5 else "test" if bucket < 10 else "train"


def code_chunks(source: str) -> Iterator[str]:
    """Split source into chunks of at most MAX_CODE_CHARS at blank lines."""
    chunk: list[str] = []
    size = 0
    for block in source.split("\n\n"):
        if size + len(block) > MAX_CODE_CHARS and chunk:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
        if len(block) <= MAX_CODE_CHARS:
            chunk.append(block)
            size += len(block) + 2
    if chunk:
        yield "\n\n".join(chunk)


def docstrings(source: str) -> Iterator[str]:
    """Cleaned module, class and function docstrings of at least MIN_DOCSTRING_CHARS."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=False)
            if text and len(text) >= MIN_DOCSTRING_CHARS:
                yield inspect.cleandoc(text)
