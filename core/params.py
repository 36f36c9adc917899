"""Load one section of ``params.yaml`` into a typed, validated pydantic object.

Every section model uses ``extra="forbid"`` so that a misspelt key is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from core.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")

M = TypeVar("M", bound=BaseModel)


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"{p}: params file not found (expected a YAML file with one section per stage)"
        )
    try:
        with p.open(encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a mapping of stage sections at the top level")
    return raw


def load_section(model: type[M], section: str, path: str | Path = DEFAULT_PARAMS) -> M:
    """Validate ``params.yaml[section]`` against ``model``; errors name the section and key."""
    raw = read_params(path)
    return validate_section(model, section, raw.get(section, {}) or {}, source=str(path))


def validate_section(model: type[M], section: str, data: dict, source: str = "params") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(x) for x in (section, *err["loc"]))
            msg = "unknown key (misspelt?)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{source}: {key}: {msg}")
        raise UserError("\n".join(lines)) from None
