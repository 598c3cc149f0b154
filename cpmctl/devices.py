"""Device and dtype choices shared by every stage."""

from __future__ import annotations

import torch

from cpmctl.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str | None) -> torch.device:
    """CUDA when present, else CPU; an explicit name must exist."""
    device = planned_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return device


def planned_device(name: str | None) -> torch.device:
    """The device a dry run plans for: as resolve_device, but a named device need not be here
    (planning a GPU run on a laptop is the point of a dry run)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda") from None


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return DTYPES[name]
