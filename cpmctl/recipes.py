"""Recipe files: a TOML table of a stage's options, overridden from the command line.

    # cpmctl pretrain recipes/llama-tiny.toml runs/llama-tiny
    preset = "llama-tiny"
    data = "runs/demo/shards"
    max_steps = 200

`load_recipe(path)` returns the flat dict (nested tables are flattened with dots: `[train] lr = 1e-3`
gives "train.lr"); `parse_override("lr=3e-4")` turns `--set KEY=VALUE` into a pair, the value read
as a TOML value when it parses as one (numbers, booleans, quoted strings, arrays), else as a bare
string; `apply_recipe(config_cls, recipe, overrides)` builds a typed config dataclass from them,
rejecting unknown keys with the list of known ones. TOML comes from the standard library
(tomllib), so recipes add no dependency.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

from cpmctl.errors import UserError


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file's TOML document (stage and pipeline recipes alike)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    if path.suffix not in (".toml",):
        raise UserError(f"recipe {path} is not a .toml file (recipes are TOML)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from None


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    return _flatten(read_toml(path))


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value); the value is TOML when it parses, else a plain string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r} is not KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def apply_recipe(config_cls: type, recipe: dict[str, Any], overrides: dict[str, Any] | None = None, **fixed: Any):
    """Instantiate the dataclass `config_cls` from recipe values, then overrides, then `fixed`
    (explicit command-line options; None values are skipped). Path-typed fields get Paths."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values = {**recipe, **(overrides or {}), **{k: v for k, v in fixed.items() if v is not None}}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = get_type_hints(config_cls)
    for name, value in list(values.items()):
        hint = str(hints.get(name, ""))
        if "Path" in hint and isinstance(value, str):
            values[name] = Path(value)
        if isinstance(value, list) and "tuple" in hint:
            values[name] = tuple(value)
    missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise UserError(f"missing option(s) {', '.join(missing)} (set them in the recipe or on the command line)")
    try:
        return config_cls(**values)
    except TypeError as exc:
        raise UserError(f"invalid options: {exc}") from None
