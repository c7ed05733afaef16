"""Training recipes: a YAML file validated by a pydantic model, with ``key=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from zeda_core.errors import ZedaError

Recipe = TypeVar("Recipe", bound=BaseModel)


def load_recipe(model: type[Recipe], path: Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read ``path`` (optional), apply dotted ``key=value`` overrides (values parsed as YAML), validate.

    Raises:
        ZedaError: naming the file, the override or the field that is wrong.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ZedaError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ZedaError(f"recipe {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ZedaError(f"recipe {path} must be a mapping of keys to values")
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ZedaError(f"override {override!r} must look like key=value")
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ZedaError(f"override {override!r}: {part} is not a section")
        target[leaf] = yaml.safe_load(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        )
        source = f"recipe {path}" if path else "recipe"
        raise ZedaError(f"{source} is invalid: {problems}") from exc
