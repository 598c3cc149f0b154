"""Stage recipe files: a TOML table of a stage's options, overridden from the command line.

    # cpmctl pretrain recipes/llama-tiny.toml runs/llama-tiny
    preset = "llama-tiny"
    data = "runs/demo/shards"
    max_steps = 200

A stage recipe is the same thing as `--config FILE.toml` on any stage; reading and checking both
lives in cpmctl.options. `apply_recipe` is the scripting entry point: a typed config from a
recipe's values, then overrides, then explicit values.
"""

from __future__ import annotations

from typing import Any

from cpmctl.options import build_config, load_recipe, parse_override, read_toml

__all__ = ["apply_recipe", "load_recipe", "parse_override", "read_toml"]


def apply_recipe(config_cls: type, recipe: dict[str, Any], overrides: dict[str, Any] | None = None, **fixed: Any):
    """Instantiate `config_cls` from recipe values, then overrides, then `fixed` (None values are
    skipped); every value is checked against its field's type (cpmctl.options.build_config)."""
    return build_config(config_cls, ("recipe", recipe), ("overrides", overrides or {}),
                        ("arguments", {k: v for k, v in fixed.items() if v is not None}))
