"""Atomic writes: a file or a whole directory appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zeda_core.errors import ZedaError


def _umask() -> int:
    """The process's file-creation mask.

    Read from ``/proc/self/status`` where Linux has it; setting the mask to read it back would
    change it, for an instant, for every thread (the server writes models from a worker thread).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_up(tree: Path) -> None:
    """Give ``tree`` (a file, or a directory and everything in it) the permissions a plain
    ``open``/``mkdir`` would have: temporary files and directories are created private (0600 /
    0700), and a model or report written through them must stay readable by other users, such
    as a server running under another account. Permission bits are only added, never removed."""
    mask = _umask()
    paths = [tree, *tree.rglob("*")] if tree.is_dir() else [tree]
    for item in paths:
        if item.is_symlink():
            continue
        wanted = (0o777 if item.is_dir() else 0o666) & ~mask
        mode = item.stat().st_mode & 0o7777
        if mode | wanted != mode:
            item.chmod(mode | wanted)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    The file gets the permissions a plain ``open`` would give it (``0666`` less the umask).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        _open_up(Path(tmp))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block succeeds.

    An existing ``path`` is refused unless ``overwrite``; it is removed only after the new
    directory is in place. On any error the temporary directory is deleted and ``path`` is kept.
    The directory and its files get the permissions of a plain ``mkdir``/``open`` (less the
    umask), also where a library wrote a file through a private temporary file.
    """
    out = Path(path).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ZedaError(f"output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _open_up(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_marked_section(path: Path, marker: str, section: str, header: str = "") -> None:
    """Replace the part of ``path`` between ``<!-- marker -->`` and ``<!-- /marker -->`` with ``section``.

    ``section`` must contain both marker comments. Without them in the file, the section is
    appended (after ``header`` when the file does not exist). The file is rewritten atomically.
    """
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    text = path.read_text() if path.is_file() else header
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


def publish_benchmark(section: str, marker: str, raw: object, json_path: Path | None, markdown: Path | None) -> None:
    """Print a benchmark's Markdown ``section``; write ``raw`` as JSON to ``json_path`` and the section
    into ``markdown`` (its ``marker`` part), each atomically and only when given."""
    print(section)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(raw, indent=2) + "\n")
    if markdown is not None:
        write_marked_section(markdown, marker, section)
