"""Reading offloaded weights: the pieces of stored tensors that move (`Part`, `Unit`) and the
pread-based reader that checks each piece against the CRC-32s the checkpoint writer recorded."""

from __future__ import annotations

import math
import os
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from cpmctl.errors import UserError

ALIGN_BYTES = 64


class OffloadError(UserError):
    """Weights could not be brought in correctly (short read, checksum mismatch, loader failure)."""


@dataclass(frozen=True)
class Part:
    """A contiguous piece of one stored tensor: all of it, or block `block` of a 3-D tensor."""

    name: str  # parameter name in the model
    shape: tuple[int, ...]  # the piece's shape
    file: Path
    byte_offset: int  # absolute in `file`
    nbytes: int
    stored_dtype: torch.dtype
    expected_crc: tuple[int, ...] | None  # CRC-32 per equal block of these bytes, or None (not recorded)


@dataclass
class Unit:
    """What one cache slot holds: one expert (its w_in, w_gate, w_out blocks) or one block's weights."""

    key: tuple
    parts: list[Part]
    offsets: list[int] = field(default_factory=list)  # element offset of each part in the slot

    @property
    def numel(self) -> int:
        return sum(math.prod(p.shape) for p in self.parts)


def _crc_blocks(data, blocks: int) -> tuple[int, ...]:
    view = memoryview(data).cast("B")
    size = len(view) // blocks
    return tuple(zlib.crc32(view[i * size : (i + 1) * size]) for i in range(blocks))


class DiskSource:
    """Reads pieces of the checkpoint's files with pread into memory the caller owns (nothing is
    memory-mapped, so nothing read lingers in the process's resident memory, and a file truncated
    under us is a short read, not a SIGBUS), checking each piece's CRC-32 on its first read.

    Copying out of a memory map and dropping the pages again (madvise MADV_DONTNEED) measured 3.4x
    cheaper per MiB in a single-threaded loop (benchmarks/offload_copy.py), but 1.5x dearer inside
    `infer` (0.68 against 0.44 ms per 1 MiB expert, batch 1), where each drop interrupts the core
    that computes, so pread stays."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._verified: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise OffloadError(f"weights file {path} has disappeared; the checkpoint is incomplete") from None
            return self._fds[path]

    def read_part(self, part: Part, dest: Tensor) -> None:
        """Fill `dest` (a contiguous CPU tensor of the part's stored dtype) with the part's bytes."""
        view = memoryview(dest.view(torch.uint8).reshape(-1).numpy()).cast("B")
        got = os.preadv(self.fd(part.file), [view], part.byte_offset)
        if got != part.nbytes:
            raise OffloadError(f"short read of {part.name} from {part.file}: {got} of {part.nbytes} bytes "
                               "(the file is truncated or was replaced)")
        key = (part.name, part.byte_offset)
        if part.expected_crc is not None and key not in self._verified:
            if _crc_blocks(view, len(part.expected_crc)) != part.expected_crc:
                raise OffloadError(f"checksum mismatch in {part.name} read from {part.file}: the file is corrupt; "
                                   "re-create or re-copy the checkpoint")
            self._verified.add(key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def make_part(ckpt, name: str, block: int | None) -> Part:
    """Tensor `name` of `ckpt` as a Part: all of it, or expert block `block` of a 3-D tensor,
    with the CRC-32s the writer recorded for those bytes (None for checkpoints without them)."""
    info = ckpt.tensor_info(name)
    expected = None
    values = ckpt.tensor_crc(name)  # checked for form when the checkpoint was opened
    if values is not None:
        if block is None:
            expected = values
        elif len(values) == info.shape[0]:
            expected = (values[block],)
    if block is None:
        return Part(name, tuple(info.shape), info.file, info.byte_offset, info.nbytes, info.dtype, expected)
    size = info.nbytes // info.shape[0]
    return Part(name, tuple(info.shape[1:]), info.file, info.byte_offset + block * size, size, info.dtype, expected)


def resident_copy(part: Part, source: DiskSource, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A resident weight read into memory of its own with pread (checked against its CRC-32s),
    never a view of the memory map: a file truncated under a map kills the process (SIGBUS), and
    pages read through the map would sit in the process twice. On a CPU in the stored dtype the
    copy keeps the address alignment the plain loader's zero-copy view has, so both compute bit
    for bit the same (see plan_offload)."""
    itemsize = part.stored_dtype.itemsize
    numel = part.nbytes // itemsize
    shift = (part.byte_offset % ALIGN_BYTES) // itemsize if part.byte_offset % itemsize == 0 else 0
    storage = torch.empty(numel + shift, dtype=part.stored_dtype)
    raw = storage[shift:]
    source.read_part(part, raw)
    if device.type == "cpu" and part.stored_dtype == dtype:
        return raw.view(part.shape)
    return raw.view(part.shape).to(device=device, dtype=dtype)
