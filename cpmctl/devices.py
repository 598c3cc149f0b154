"""Device and dtype choices shared by every stage."""

from __future__ import annotations

import resource
import sys

import torch

from cpmctl.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str | None) -> torch.device:
    """CUDA when present, else CPU; an explicit name must exist."""
    device = planned_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA device is available")
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
    """The torch dtype of a name in DTYPES (None stays None: the stored dtype)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return DTYPES[name]


# -- memory probes --------------------------------------------------------------------------------
def peak_memory_bytes(device) -> int:
    """Peak memory of this run: CUDA's allocator peak on a GPU, else the process's peak RSS
    (ru_maxrss counts bytes on macOS, KiB elsewhere)."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_memory_bytes(device) -> int:
    """Memory in use now: CUDA's allocated bytes on a GPU, else the process's resident set (Linux;
    the peak elsewhere)."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_memory_bytes(device)
