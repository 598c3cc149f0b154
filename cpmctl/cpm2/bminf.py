"""Streaming reader for BMInf's own checkpoint layout (`checkpoint.pt` of the CPM-2.1 release).

The file is not a pickle. It is a tree of layers written depth first; every integer is
little-endian:

    layer     := u32 n_parameters, u32 n_sublayers, parameter * n_parameters,
                 (string name, layer) * n_sublayers
    parameter := string name, u8 ndim, u32 dim * ndim, u32 nbytes, u8 dtype code, nbytes of data
    string    := u32 length, UTF-8 bytes
    dtype code:  0 int8, 1 float16, 2 float32

A parameter's full name joins the names of the layers above it with dots
("encoder.3.self_attention.w_project_qkv"). An int8 parameter `X` is stored quantized: the
tensor `X_scale` (float16, broadcastable to X's shape, one scale per output row) gives
`X = int8 * scale`.

`scan` reads only the metadata, seeking over the data, so the index of an 11B file costs a few
kilobytes of reads; `BMInfFile` then memory-maps the file and hands out views, and dequantizes
one tensor (or one slice of a stacked tensor) at a time, so converting never holds more than the
tensor being written.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from cpmctl.errors import UserError

DTYPE_CODES: dict[int, torch.dtype] = {0: torch.int8, 1: torch.float16, 2: torch.float32}
SCALE_SUFFIX = "_scale"
# Far beyond anything real; a larger value read from the file means it is not a BMInf file.
_MAX_NAME_BYTES = 4096
_MAX_NDIM = 8


@dataclass(frozen=True)
class Record:
    """One parameter of the file: where its bytes are and what they hold."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


class _Cursor:
    """Sequential reads of the metadata with truncation reported by parameter name."""

    def __init__(self, fh, path: Path, size: int) -> None:
        self.fh, self.path, self.size = fh, path, size

    def read(self, n: int, what: str) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise UserError(f"{self.path} is truncated: it ends inside {what} (file size {self.size} bytes)")
        return data

    def u8(self, what: str) -> int:
        return self.read(1, what)[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def string(self, what: str) -> str:
        length = self.u32(what)
        if length > _MAX_NAME_BYTES:
            raise UserError(f"{self.path} is not a BMInf checkpoint: {what} claims a {length}-byte name")
        raw = self.read(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{self.path} is not a BMInf checkpoint: {what} is not UTF-8") from None

    def skip(self, n: int, what: str) -> int:
        start = self.fh.tell()
        if start + n > self.size:
            raise UserError(
                f"{self.path} is truncated: {what} needs {n} bytes at offset {start}, "
                f"but the file ends at {self.size}"
            )
        self.fh.seek(n, os.SEEK_CUR)
        return start


def _parameter(cur: _Cursor, name: str) -> Record:
    ndim = cur.u8(f"the shape of {name}")
    if ndim > _MAX_NDIM:
        raise UserError(f"{cur.path} is not a BMInf checkpoint: {name} claims {ndim} dimensions")
    shape = tuple(cur.u32(f"the shape of {name}") for _ in range(ndim))
    nbytes = cur.u32(f"the size of {name}")
    code = cur.u8(f"the dtype of {name}")
    dtype = DTYPE_CODES.get(code)
    if dtype is None:
        known = ", ".join(f"{c} ({str(d).removeprefix('torch.')})" for c, d in DTYPE_CODES.items())
        raise UserError(f"{cur.path}: {name} has unknown dtype code {code}; BMInf writes {known}")
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise UserError(
            f"{cur.path}: {name} declares {nbytes} bytes, but shape {list(shape)} of "
            f"{str(dtype).removeprefix('torch.')} needs {expected}"
        )
    offset = cur.skip(nbytes, f"the data of {name}")
    return Record(name, shape, dtype, offset, nbytes)


def scan(path: str | os.PathLike) -> dict[str, Record]:
    """Every parameter of a BMInf checkpoint, in file order, from its metadata alone."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    records: dict[str, Record] = {}
    with open(path, "rb") as fh:
        cur = _Cursor(fh, path, size)
        # Depth-first walk with an explicit stack of (layer prefix, sublayers still to read).
        pending: list[tuple[str, int]] = []
        prefix = ""
        while True:
            what = f"the header of layer {prefix or '<root>'}"
            n_params, n_sub = cur.u32(what), cur.u32(what)
            for _ in range(n_params):
                name = prefix + cur.string(f"a parameter name in layer {prefix or '<root>'}")
                if name in records:
                    raise UserError(f"{path}: parameter {name} appears twice")
                records[name] = _parameter(cur, name)
            pending.append((prefix, n_sub))
            # Descend into the next unread sublayer, climbing up past finished layers.
            while pending and pending[-1][1] == 0:
                pending.pop()
            if not pending:
                break
            parent, left = pending[-1]
            pending[-1] = (parent, left - 1)
            prefix = parent + cur.string(f"a sublayer name in layer {parent or '<root>'}") + "."
        if fh.tell() != size:
            raise UserError(f"{path} has {size - fh.tell()} bytes after its last layer; it is not a BMInf checkpoint or it is corrupt")
    if not records:
        raise UserError(f"{path} holds no parameters")
    return records


def check_scales(records: dict[str, Record], path: Path) -> None:
    """Every `X_scale` has its `X`, and every int8 `X` has its `X_scale`, of a fitting shape."""
    for name, rec in records.items():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] not in records:
            raise UserError(f"{path}: scale {name} has no tensor {name[: -len(SCALE_SUFFIX)]}")
        if rec.dtype == torch.int8 and name + SCALE_SUFFIX not in records:
            raise UserError(f"{path}: int8 tensor {name} has no {name}{SCALE_SUFFIX} to dequantize it")
        scale = records.get(name + SCALE_SUFFIX)
        if scale is not None:
            if scale.dtype == torch.int8:
                raise UserError(f"{path}: scale {scale.name} is int8; scales are floating point")
            if len(scale.shape) != len(rec.shape) or any(s not in (1, d) for s, d in zip(scale.shape, rec.shape)):
                raise UserError(
                    f"{path}: scale {scale.name} has shape {list(scale.shape)}, which does not "
                    f"broadcast over {name} {list(rec.shape)}"
                )


class BMInfFile:
    """A BMInf checkpoint opened for conversion: the index up front, tensors on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records = scan(self.path)
        check_scales(self.records, self.path)
        self._map: mmap.mmap | None = None
        self._buffer: memoryview | None = None

    def tensor_names(self) -> list[str]:
        """The model's tensors: every record except the scales."""
        return [n for n in self.records if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in self.records)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.records[name].shape

    def is_quantized(self, name: str) -> bool:
        return name + SCALE_SUFFIX in self.records

    def _mapping(self) -> memoryview:
        if self._buffer is None:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._buffer = memoryview(self._map)
        return self._buffer

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor as a view of the file (a copy only if the file misaligns it)."""
        rec = self.records[name]
        if rec.nbytes == 0:
            return torch.empty(rec.shape, dtype=rec.dtype)
        view = torch.frombuffer(self._mapping(), dtype=rec.dtype, count=rec.nbytes // rec.dtype.itemsize,
                                offset=rec.offset).reshape(rec.shape)
        # The variable-length metadata before each tensor leaves fp16/fp32 data at any offset.
        return view.clone() if rec.offset % rec.dtype.itemsize else view

    def value(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor (or its slice `index` along dim 0) in float32, dequantized if stored int8.

        A float tensor without a scale comes back as a view when it is already float32.
        """
        data = self.raw(name)
        scale = self.raw(name + SCALE_SUFFIX) if self.is_quantized(name) else None
        if index is not None:
            data = data[index]
            if scale is not None:
                scale = scale[index] if scale.shape[0] != 1 else scale[0]
        if scale is None:
            return data.to(torch.float32)
        # A fresh buffer to scale in place (never the file's pages); int8 (8 bits) times a
        # float16 scale (11 significant bits) is exact in float32.
        return data.to(torch.float32, copy=True).mul_(scale.to(torch.float32))

    def close(self) -> None:
        # Views handed out keep the map alive through the memoryview; only our references go.
        self._map = None
        self._buffer = None
