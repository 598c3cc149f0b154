"""Options declared once: a command's config dataclass is the only place its options are written.

    @dataclass
    class MoefyConfig:
        checkpoint: Path = option(help="A dense cpmctl checkpoint.", argument=True)
        experts: int | None = option(None, help="Experts per FFN (E).")

`option(...)` is `dataclasses.field` with the option's help and command-line spelling in the
field's metadata; the field's name, type annotation and default are the rest of the declaration.
The command line (cpmctl.cli), pipeline recipes (cpmctl.pipeline), `--config FILE.toml` and
`--set KEY=VALUE` all read these fields, and every value from any of them goes through
`build_config`, the one place where values are checked against the field types. A wrong value is
one `UserError` naming the field, the expected type and the value (the CLI exits 2 on it).

This module imports no torch: the CLI builds every command's options from it at `--help` time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from cpmctl.errors import UserError

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, *, help: str = "", flag: str | None = None, short: str | None = None,
           argument: bool = False, metavar: str | None = None, default_factory: Any = MISSING,
           renamed_from: Mapping[str, Callable[[Any], Any] | None] | None = None, off_with_json: bool = False,
           secondary: str | None = None) -> Any:
    """A config field that is also an option.

    flag: the long flag (default `--field-name`); short: e.g. "-n"; argument: a positional
    argument instead (in field order); renamed_from: earlier names of this option still accepted
    in config files, `--set` and recipes ({old name: converter of the old value, or None}); an old
    name whose value needs no converter also stays a command-line flag (`--old-name`);
    off_with_json: `--json` sets this boolean field False (progress bars, streamed tokens would
    mix with the JSON); secondary: the negative form of a boolean flag (default `--no-NAME` when
    the default is True).
    """
    metadata = {"help": help, "flag": flag, "short": short, "argument": argument, "metavar": metavar,
                "renamed_from": dict(renamed_from or {}), "off_with_json": off_with_json, "secondary": secondary}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"cpmctl": metadata})


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One field seen as an option: what the CLI generator and the recipe reader need."""

    name: str
    type: Any                 # the field's resolved annotation
    default: Any              # MISSING when required
    help: str
    argument: bool
    flags: tuple[str, ...]    # ("--max-steps",) or ("--input",) or ("--force", "-f"), then earlier spellings
    secondary: str | None     # "--no-normalize" for a boolean flag whose default is True
    metavar: str | None
    renamed_from: dict[str, Callable[[Any], Any] | None]
    off_with_json: bool

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def is_flag(self) -> bool:
        return base_type(self.type) is bool

    @property
    def spellings(self) -> set[str]:
        """Keys that name this option in a recipe or `--set`: the field name, its flags without dashes."""
        return {self.name, self.name.replace("_", "-"), *(f.lstrip("-") for f in self.flags if f.startswith("--"))}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@functools.cache
def specs(config_cls: type) -> tuple[OptionSpec, ...]:
    """The options of a config dataclass, in field order."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        meta = f.metadata.get("cpmctl", {})
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        old_flags = tuple("--" + old.replace("_", "-") for old, convert in meta.get("renamed_from", {}).items() if convert is None)
        flags = (flag,) + ((meta["short"],) if meta.get("short") else ()) + old_flags
        default = _default_of(f)
        typ = hints[f.name]
        secondary = meta.get("secondary")
        if secondary is None and base_type(typ) is bool and default is True:
            secondary = "--no-" + flag[2:]
        out.append(OptionSpec(name=f.name, type=typ, default=default, help=meta.get("help", ""),
                              argument=bool(meta.get("argument")), flags=flags,
                              secondary=secondary,
                              metavar=meta.get("metavar"), renamed_from=dict(meta.get("renamed_from", {})),
                              off_with_json=bool(meta.get("off_with_json"))))
    return tuple(out)


# -- types ----------------------------------------------------------------------------------------
def _without_none(typ: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`; (typ, False) otherwise."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) < len(typing.get_args(typ)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return typ, False


def base_type(typ: Any) -> Any:
    """The type an option holds, without `| None` and without container arguments."""
    inner, _ = _without_none(typ)
    return typing.get_origin(inner) or inner


def type_name(typ: Any) -> str:
    inner, optional = _without_none(typ)
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans", Path: "paths"}
        name = f"a list of {plural[args[0]]}" if args and args[0] in plural else "a list"
    elif origin is dict or inner is dict:
        name = "a table"
    elif inner is Any:
        name = "any value"
    else:
        name = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string",
                Path: "a path"}.get(inner, getattr(inner, "__name__", str(inner)))
    return name + (" or nothing" if optional else "")


class _Invalid(Exception):
    pass


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _convert(typ: Any, value: Any) -> Any:
    inner, optional = _without_none(typ)
    if value is None:
        if optional or inner is Any:
            return None
        raise _Invalid
    origin = typing.get_origin(inner)
    if inner is Any:
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Invalid
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                raise _Invalid from None
        raise _Invalid
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Invalid from None
        raise _Invalid
    if inner is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, Path)) and not isinstance(value, bool):
            return str(value)  # `--set to=512` or a number where a spec string is expected
        raise _Invalid
    if inner is Path:
        if isinstance(value, (str, os.PathLike)) and str(value) != "":
            return Path(value)
        raise _Invalid
    if origin in (list, tuple):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis] or [Any]
        if isinstance(value, str):  # "encoder.0,encoder.3" on the command line or in --set
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif args[0] in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--set eval_iterations=12` (TOML reads a number): a list of one
        if not isinstance(value, (list, tuple)):
            raise _Invalid
        items = [_convert(args[0], v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or inner is dict:
        if isinstance(value, str):  # an inline TOML table on the command line: "{d_model = 512}"
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                raise _Invalid from None
        if not isinstance(value, dict):
            raise _Invalid
        return dict(value)
    if isinstance(inner, type) and isinstance(value, inner):
        return value
    raise _Invalid


def _exact(typ: Any, value: Any) -> bool:
    """Whether a value read from JSON (a checkpoint's config.json, a state's trainer.json) has the
    field's type as it is: no conversion from text, which is for command lines and --set."""
    inner, optional = _without_none(typ)
    if value is None:
        return optional or inner is Any
    origin = typing.get_origin(inner)
    if inner is Any:
        return True
    if inner is bool:
        return isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is str:
        return isinstance(value, str)
    if inner is Path:
        return isinstance(value, str) and value != ""
    if origin in (list, tuple):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis] or [Any]
        return isinstance(value, (list, tuple)) and all(_exact(args[0], v) for v in value)
    if origin is dict or inner is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(inner):
        return isinstance(value, (dict, inner))  # its fields are checked by its own from_dict
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        return any(_exact(a, value) for a in typing.get_args(inner))
    return isinstance(inner, type) and isinstance(value, inner)


def check_field_types(cls: type, values: Mapping[str, Any], source: str) -> None:
    """The one check of values read from JSON metadata against a dataclass's field types: a
    UserError naming the source, the field, the expected type and the value."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _exact(hints[name], value):
            raise UserError(f"{source}: field {name} expects {type_name(hints[name])}, got {value!r}"[:400])


def check_value(spec: OptionSpec, value: Any, source: str) -> Any:
    """`value` as the field's type, or a UserError naming the field, the type and the value."""
    try:
        return _convert(spec.type, value)
    except _Invalid:
        raise UserError(f"option {spec.name} ({source}) expects {type_name(spec.type)}, got {value!r}") from None


# -- building a config ----------------------------------------------------------------------------
def spelling_map(config_cls: type) -> dict[str, tuple[OptionSpec, Callable[[Any], Any] | None]]:
    """Every accepted key (name, dashed name, flag, earlier names) -> (its option, value converter)."""
    out: dict[str, tuple[OptionSpec, Callable[[Any], Any] | None]] = {}
    for spec in specs(config_cls):
        for key in spec.spellings:
            out[key] = (spec, None)
        for old, convert in spec.renamed_from.items():
            out[old] = (spec, convert)
    return out


def known_names(config_cls: type) -> list[str]:
    return sorted(spec.name for spec in specs(config_cls))


def resolve(config_cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Keys of one source (a config file, `--set`, a recipe step) -> field names, values checked.

    A key `field.sub` sets one entry of a table-typed field (`model.d_model = 512`)."""
    spell = spelling_map(config_cls)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if key not in spell and dot and head in spell and base_type(spell[head][0].type) is dict:
            spec = spell[head][0]
            table = dict(out.get(spec.name) or {})
            table[rest] = value
            out[spec.name] = table
            continue
        if key not in spell:
            unknown.append(key)
            continue
        spec, convert = spell[key]
        if convert is not None:
            value = convert(value)
        value = check_value(spec, value, source)
        if base_type(spec.type) is dict and isinstance(out.get(spec.name), dict):
            value = {**out[spec.name], **value}
        out[spec.name] = value
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(sorted(unknown))} ({source}); known: {', '.join(known_names(config_cls))}")
    return out


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; table-typed values merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def build_config(config_cls: type, *layers: tuple[str, Mapping[str, Any]]):
    """The config from (source, values) layers, lowest precedence first, e.g.
    [("config file x.toml", ...), ("--set", ...), ("command line", ...)]. Every value is checked
    against its field's type; unknown and missing options are one UserError each."""
    resolved = [resolve(config_cls, values, source) for source, values in layers]
    values = merge(*resolved)
    missing = [s.name for s in specs(config_cls) if s.required and s.name not in values]
    if missing:
        spelled = ", ".join(s.name.upper() if s.argument else s.flags[0] for s in specs(config_cls) if s.name in missing)
        raise UserError(f"missing option(s) {spelled} (give them on the command line, in --config or with --set)")
    return config_cls(**values)


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
    """A recipe or config file's TOML document (stage and pipeline recipes alike)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    if path.suffix != ".toml":
        raise UserError(f"recipe {path} is not a .toml file (recipes are TOML)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from None


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A `--config FILE.toml` (or a stage recipe): its table, nested tables as dotted keys
    (`[model] d_model = 512` gives "model.d_model")."""
    return _flatten(read_toml(path))


def parse_override(text: str) -> tuple[str, Any]:
    """`--set KEY=VALUE` -> (key, value); the value is TOML when it parses (numbers, booleans,
    quoted strings, arrays, inline tables), else the plain string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r} is not KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def set_values(pairs: Iterable[str]) -> dict[str, Any]:
    """`--set KEY=VALUE ...` as a dict (a later KEY wins)."""
    return dict(parse_override(text) for text in pairs)
