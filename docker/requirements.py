"""Print the project's pip requirements (pyproject dependencies plus extras), one per line.

Used where torch must come from elsewhere than the pin (a CPU image: the CPU build of torch, no Triton):

    python docker/requirements.py --extras loadtest --without torch,triton > requirements.txt
    pip install torch==2.13.0+cpu -r requirements.txt && pip install --no-deps .

Self-references (``zeda[loadtest]`` in ``dev``) are expanded.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(pyproject: Path, extras: list[str], without: set[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    name, optional = requirement_name(project["name"]), project.get("optional-dependencies", {})
    found: list[str] = []
    pending, seen = list(project["dependencies"]), set()
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"pyproject.toml has no extra {extra!r} (has {', '.join(sorted(optional))})")
        pending += optional[extra]
    while pending:
        requirement = pending.pop(0).strip()
        key = requirement_name(requirement)
        if key == name:  # zeda[loadtest]: that extra's requirements
            inner = re.search(r"\[([^\]]*)\]", requirement)
            for extra in (e.strip() for e in (inner.group(1) if inner else "").split(",") if e.strip()):
                if extra not in seen:
                    seen.add(extra)
                    pending += optional[extra]
            continue
        if key not in without and requirement not in found:
            found.append(requirement)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. loadtest or sglang,loadtest")
    parser.add_argument(
        "--without", action="append", default=[], help="leave these packages out (comma-separated, repeatable)"
    )
    args = parser.parse_args()
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    without = {requirement_name(w) for item in args.without for w in item.split(",") if w.strip()}
    print("\n".join(requirements(args.pyproject, extras, without)))


if __name__ == "__main__":
    main()
