"""Sizes and counts as people write and read them: '2GiB' -> bytes, bytes -> '2.00 GiB'."""

from __future__ import annotations

import re

from cpmctl.errors import UserError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, *, total: int | None = None) -> int:
    """'2GiB', '512MB', '1.5g', '1000000' (bytes) or '25%' (of `total`) -> bytes."""
    raw = str(text).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(%|[a-z]*)", raw)
    if not match or (match.group(2) and match.group(2) != "%" and match.group(2) not in _UNITS):
        raise UserError(f"cannot read the size {text!r}: use bytes or a unit (512MB, 2GiB) or a percentage of the weights (25%)")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if total is None:
            raise UserError(f"a percentage ({text}) needs a model to be a percentage of")
        if not 0 < value <= 100:
            raise UserError(f"the size {text} must be a percentage in (0, 100]")
        return int(total * value / 100)
    size = int(value * _UNITS.get(unit or "b", 1))
    if size <= 0:
        raise UserError(f"a size must be positive, got {text!r}")
    return size


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units; whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: int) -> str:
    """12_345_678 -> '12.35M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
