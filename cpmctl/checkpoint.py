"""Checkpoint storage: a directory of config.json, safetensors weights, tokenizer/ and cpmctl.json.

Writing streams one tensor at a time into safetensors files of our own making: the `safetensors`
package's writers take the whole state dict at once and cannot stream, so saving a model with them
would hold a second copy of its weights; ours computes the file hashes, the per-block CRC-32s and
the checkpoint's content hash from the same bytes as they go to disk. Reading goes through the
package (`safe_open`), which memory-maps each weights file once and hands out zero-copy,
copy-on-write tensor views, so a caller (the offload engine in particular) pays only for the
tensors it touches.

Layout written:
    config.json                      ModelConfig.to_json()
    model.safetensors                or, above max_shard_bytes, shards
    model-00001-of-0000N.safetensors + model.safetensors.index.json (Hugging Face's layout)
    tokenizer/                       optional, copied from a given directory
    cpmctl.json                      provenance: stage, parents' content hashes, options, metrics,
                                     content_hash, sha256 of every other file

The content hash identifies the weights independently of how they are sharded or laid out: it is
the sha256 over, for every tensor in sorted name order, a JSON record [name, dtype, shape]
followed by the sha256 of the tensor's raw little-endian bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors import safe_open

from cpmctl import __version__
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory, check_free_space, verification, verifying
from cpmctl.model import build_model
from cpmctl.quant import CPU_ALIGNMENT, is_quantized_part

log = logging.getLogger("cpmctl")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROVENANCE_FILE = "cpmctl.json"
TOKENIZER_DIR = "tokenizer"

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

# safetensors dtype codes <-> torch dtypes. Only these are written or read.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in _DTYPES.items()}

# The official reader refuses headers above 100 MB; a larger length field means corruption.
_MAX_HEADER_BYTES = 100_000_000
# Device tensors are copied to the host in pieces of this size, so saving from a GPU needs
# only this much extra host memory, not a whole tensor's worth.
_CHUNK_BYTES = 64 * 2**20
_HASH_READ_BYTES = 8 * 2**20
# Header metadata key of a single safetensors file written by write_safetensors (training states,
# adapters, task heads): {tensor name: [CRC-32 per block]} as JSON, checked on every read.
CRC_METADATA_KEY = "cpmctl_crc32"
# One-byte tensors (int8 / uint8 quantized weights) are read as zero-copy views only when they
# start on a CPU_ALIGNMENT line (cpmctl.quant says why: torch's int8 weight-only matmul crashes on
# misaligned weights); the file order (wider elements first) leaves one-byte tensors 1-aligned.
ONE_BYTE_ALIGN = CPU_ALIGNMENT


def zero_copy_readable(dtype: torch.dtype, byte_offset: int) -> bool:
    """Whether a tensor stored at absolute file offset `byte_offset` is used as a view of the mapped
    file (else the reader copies it into an aligned allocation): aligned to its element size, and
    for one-byte elements to ONE_BYTE_ALIGN."""
    if byte_offset % dtype.itemsize:
        return False
    return dtype.itemsize > 1 or byte_offset % ONE_BYTE_ALIGN == 0



def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


# =============================================================================================
# Writing: our own streaming writer. safetensors' save_file / save take every tensor at once
# (its serializer builds the whole file from the full state dict), so they cannot write one tensor
# at a time nor hash and checksum the bytes as they go; the files are the standard format either way.
# =============================================================================================


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by its dtype and shape, made by `produce()` only when its bytes are written.

    The writers (`save_checkpoint`, `write_safetensors`) call `produce` once, just before writing
    the tensor, and drop the result right after, so a conversion that hands them producers (read
    or convert from the source on demand) holds one produced tensor at a time, not the model.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class _PlannedTensor:
    name: str
    source: torch.Tensor | LazyTensor
    dtype: torch.dtype
    code: str
    shape: tuple[int, ...]
    nbytes: int

    def materialize(self) -> torch.Tensor:
        """The tensor to write: the given one, or the producer's, checked against its promise
        (the header was written from the promise)."""
        if isinstance(self.source, torch.Tensor):
            return self.source
        tensor = self.source.produce()
        if not isinstance(tensor, torch.Tensor):
            raise RuntimeError(f"the producer of {self.name} returned {type(tensor).__name__}, not a tensor")
        _check_storable(self.name, tensor)
        if tensor.dtype != self.dtype or tuple(tensor.shape) != self.shape:
            raise RuntimeError(
                f"the producer of {self.name} made {_dtype_name(tensor.dtype)} {_shape_str(tensor.shape)}, "
                f"it promised {_dtype_name(self.dtype)} {_shape_str(self.shape)}"
            )
        return tensor


def _check_storable(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":
        raise ValueError(f"cannot save {name}: it is on the meta device and has no data")
    if tensor.layout != torch.strided:
        raise ValueError(f"cannot save {name}: {tensor.layout} tensors are not supported, only dense ones")


def _plan_tensor(name: str, tensor: Any) -> _PlannedTensor:
    """Check that `tensor` (a tensor or a LazyTensor) can be stored, before anything is written."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    if name == "__metadata__":
        raise ValueError("'__metadata__' is reserved by the safetensors format and cannot name a tensor")
    if isinstance(tensor, LazyTensor):
        if not isinstance(tensor.dtype, torch.dtype) or not all(isinstance(d, int) and d >= 0 for d in tensor.shape):
            raise ValueError(f"cannot save {name}: a LazyTensor needs a torch dtype and a shape of non-negative ints")
    elif isinstance(tensor, torch.Tensor):
        _check_storable(name, tensor)
    else:
        raise ValueError(f"cannot save {name}: expected a torch.Tensor, got {type(tensor).__name__}")
    code = _CODES.get(tensor.dtype)
    if code is None:
        supported = ", ".join(_dtype_name(d) for d in _CODES)
        raise ValueError(f"cannot save {name}: dtype {_dtype_name(tensor.dtype)} is not supported ({supported})")
    shape = tuple(int(d) for d in tensor.shape)
    return _PlannedTensor(name, tensor, tensor.dtype, code, shape, math.prod(shape) * tensor.dtype.itemsize)


def _byte_chunks(tensor: torch.Tensor) -> Iterator[memoryview]:
    """The tensor's raw little-endian bytes in row-major order, without copying a CPU tensor."""
    if sys.byteorder != "little":
        raise RuntimeError("cpmctl writes safetensors only on little-endian machines")
    flat = tensor.detach().resolve_conj().resolve_neg()
    if not flat.is_contiguous():
        flat = flat.contiguous()  # one tensor at a time, never the whole state dict
    # Viewing as bytes sidesteps numpy's lack of bfloat16; reshape(-1) also covers 0-d tensors.
    flat = flat.reshape(-1).view(torch.uint8)
    total = flat.numel()
    on_host = flat.device.type == "cpu"
    step = total if on_host else _CHUNK_BYTES
    for start in range(0, total, max(step, 1)):
        piece = flat[start : start + step]
        if not on_host:
            piece = piece.cpu()
        yield memoryview(piece.numpy()).cast("B")


def _tensor_record(name: str, code: str, shape: Iterable[int]) -> bytes:
    return (json.dumps([name, code, [int(d) for d in shape]]) + "\n").encode()


def _combine_content_hash(records: Mapping[str, tuple[str, tuple[int, ...], bytes]]) -> str:
    """Content hash from each tensor's (dtype code, shape, sha256 of bytes), in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(records):
        code, shape, tensor_digest = records[name]
        digest.update(_tensor_record(name, code, shape))
        digest.update(tensor_digest)
    return "sha256:" + digest.hexdigest()


def content_hash(tensors: Mapping[str, torch.Tensor | LazyTensor]) -> str:
    """The content hash `save_checkpoint` records for these tensors, computed without writing.

    Works equally on an in-memory state dict and on `Checkpoint.state_dict()`, so a checkpoint's
    weights can be re-identified after loading.
    """
    records = {}
    for name, tensor in tensors.items():
        planned = _plan_tensor(name, tensor)
        records[name] = (planned.code, planned.shape, _tensor_digest(planned))
    return _combine_content_hash(records)


def _tensor_digest(planned: _PlannedTensor) -> bytes:
    digest = hashlib.sha256()
    for chunk in _byte_chunks(planned.materialize()):
        digest.update(chunk)
    return digest.digest()


class WrittenFile(NamedTuple):
    """What `write_safetensors` wrote: the file's sha256, per tensor its bytes' sha256 and its
    block CRC-32s (`BlockCRC`)."""

    sha256: str
    size: int
    tensor_digests: dict[str, tuple[str, tuple[int, ...], bytes]]
    block_crc32: dict[str, list[int]]


def crc_block_count(shape: tuple[int, ...]) -> int:
    """How many CRC-32 blocks a tensor of `shape` is checked in: a 3-D tensor (the expert blocks
    of a MoE layer, [E, d_e, d]) one per index of its first dimension, so a reader that loads one
    expert can check just those bytes; anything else as a whole."""
    return shape[0] if len(shape) == 3 and shape[0] > 0 else 1


class BlockCRC:
    """CRC-32 of equal consecutive blocks of a byte stream fed in arbitrary chunks."""

    def __init__(self, nbytes: int, blocks: int) -> None:
        self.block_bytes = nbytes // blocks if blocks else 0
        self.values: list[int] = []
        self._crc, self._filled = 0, 0

    def feed(self, data: memoryview) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            take = min(len(data), self.block_bytes - self._filled) if self.block_bytes else len(data)
            self._crc = zlib.crc32(data[:take], self._crc)
            self._filled += take
            data = data[take:]
            if self.block_bytes and self._filled == self.block_bytes:
                self.values.append(self._crc)
                self._crc, self._filled = 0, 0

    def result(self) -> list[int]:
        return self.values if self.block_bytes else [self._crc]


def _file_order(planned: Iterable[_PlannedTensor]) -> list[_PlannedTensor]:
    # Wider elements first, then by name: every tensor then starts at a multiple of its element
    # size (the data section starts 8-aligned), so the reader's zero-copy views are aligned.
    # This is the order the official writer uses too.
    return sorted(planned, key=lambda p: (-p.dtype.itemsize, p.name))


def _header_bytes(ordered: list[_PlannedTensor], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for p in ordered:
        header[p.name] = {"dtype": p.code, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Spaces pad the header so the data section starts on an 8-byte boundary.
    return raw + b" " * (-len(raw) % 8)


def _write_planned(path: Path, planned: list[_PlannedTensor], metadata: Mapping[str, str]) -> WrittenFile:
    ordered = _file_order(planned)
    header = _header_bytes(ordered, metadata)
    file_digest = hashlib.sha256()
    tensor_digests: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    block_crc32: dict[str, list[int]] = {}
    with open(path, "wb") as fh:
        size = _write_hashed(fh, file_digest, len(header).to_bytes(8, "little"))
        size += _write_hashed(fh, file_digest, header)
        for p in ordered:
            tensor_digest, crcs = _write_tensor(fh, file_digest, p)
            size += p.nbytes
            tensor_digests[p.name] = (p.code, p.shape, tensor_digest)
            block_crc32[p.name] = crcs
        fh.flush()
        os.fsync(fh.fileno())
    return WrittenFile(file_digest.hexdigest(), size, tensor_digests, block_crc32)


def _write_tensor(fh: BinaryIO, file_digest: Any, p: _PlannedTensor) -> tuple[bytes, list[int]]:
    """Write one tensor's bytes, returning their sha256 and block CRC-32s. A produced tensor
    (LazyTensor) lives only in this frame: it and its source pages go when the call returns."""
    tensor_digest = hashlib.sha256()
    crc = BlockCRC(p.nbytes, crc_block_count(p.shape))
    written = 0
    for chunk in _byte_chunks(p.materialize()):
        tensor_digest.update(chunk)
        crc.feed(chunk)
        written += _write_hashed(fh, file_digest, chunk)
    if written != p.nbytes:  # the header already promised p.nbytes
        raise RuntimeError(f"{p.name} produced {written} bytes, expected {p.nbytes}")
    return tensor_digest.digest(), crc.result()


def _write_hashed(fh: BinaryIO, digest: Any, data: bytes | memoryview) -> int:
    fh.write(data)
    digest.update(data)
    return len(data)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | LazyTensor], metadata: Mapping[str, str] | None = None
) -> WrittenFile:
    """Stream `tensors` into one safetensors file at `path`, one tensor at a time (a LazyTensor is
    produced just before its bytes are written and released right after).

    Every name gets its own bytes (tied weights are stored once per name: the format has no
    aliasing). `metadata` goes into the header's "__metadata__" (strings only); "format": "pt"
    is added so Hugging Face loaders accept the file.
    """
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata keys and values must be strings")
    planned = [_plan_tensor(name, tensor) for name, tensor in tensors.items()]
    if planned and all(isinstance(p.source, torch.Tensor) for p in planned):
        # Tensors in memory (a training state, an adapter): their CRC-32s go into the header, so
        # that every reader checks them; produced ones (an export) are read back by other tools.
        meta[CRC_METADATA_KEY] = json.dumps({p.name: tensor_crc32(p.source) for p in planned}, separators=(",", ":"))
    return _write_planned(Path(path), planned, meta)


def tensor_crc32(tensor: torch.Tensor) -> list[int]:
    """The CRC-32s the writer records for `tensor`'s bytes (one per crc_block_count block)."""
    crc = BlockCRC(tensor.numel() * tensor.element_size(), crc_block_count(tuple(tensor.shape)))
    for chunk in _byte_chunks(tensor):
        crc.feed(chunk)
    return crc.result()


# =============================================================================================
# Saving a checkpoint
# =============================================================================================


def _shard_plan(planned: list[_PlannedTensor], max_shard_bytes: int) -> list[list[_PlannedTensor]]:
    """Greedy in sorted name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_PlannedTensor]] = [[]]
    filled = 0
    for p in sorted(planned, key=lambda p: p.name):
        if shards[-1] and filled + p.nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(p)
        filled += p.nbytes
    return shards


def _shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _parent_record(parent: str | os.PathLike) -> dict[str, str]:
    path = Path(parent)
    if not (path / PROVENANCE_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise UserError(f"parent {path} is not a cpmctl checkpoint (it needs {CONFIG_FILE} and {PROVENANCE_FILE})")
    parent_hash = read_provenance(path).get("content_hash")
    if not isinstance(parent_hash, str) or not parent_hash.startswith("sha256:"):
        raise UserError(f"parent {path} has no content_hash in its {PROVENANCE_FILE}")
    verified = _VERIFIED.get(path.resolve()) == parent_hash
    if not verified and verifying():
        with open_checkpoint(path) as parent_ckpt:
            parent_ckpt.verify_tensors()
        verified = True
    return {"path": str(path.resolve()), "content_hash": parent_hash, "verified": verified}


# Checkpoints whose every tensor this process read with its CRC-32s checked (resolved path ->
# content hash): a checkpoint derived from one records its parent as verified without reading it
# twice.
_VERIFIED: dict[Path, str] = {}


def _dominant_dtype(counts: Mapping[str, int]) -> str | None:
    return max(counts, key=lambda name: (counts[name], name)) if counts else None


def save_checkpoint(
    out: str | os.PathLike,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor | LazyTensor],
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    stage: str = "unknown",
    parents: Iterable[str | os.PathLike] = (),
    options: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a checkpoint directory atomically and return the provenance stored in cpmctl.json.

    Everything that can be checked is checked before the first byte is written; the directory
    appears at `out` only once complete, and a failure leaves neither `out` nor a temporary
    directory behind. An existing `out` is a UserError unless `overwrite`.

    A LazyTensor entry is produced just before its bytes are written and dropped right after: a
    conversion that passes producers needs memory for one tensor at a time, not the whole model.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    planned = [_plan_tensor(name, tensor) for name, tensor in state_dict.items()]
    parent_records = [_parent_record(p) for p in parents]
    tokenizer_src = None
    if tokenizer_dir is not None:
        tokenizer_src = Path(tokenizer_dir)
        if not tokenizer_src.is_dir():
            raise UserError(f"tokenizer directory {tokenizer_src} does not exist or is not a directory")
    dtype_counts: dict[str, int] = {}
    for p in planned:
        name = _dtype_name(p.dtype)
        dtype_counts[name] = dtype_counts.get(name, 0) + math.prod(p.shape)
    provenance: dict[str, Any] = {
        "cpmctl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "stage": stage,
        "parents": parent_records,
        "options": dict(options or {}),
        "metrics": dict(metrics or {}),
        "content_hash": None,
        "files": {},
        # CRC-32 per tensor (per expert block for 3-D tensors, see crc_block_count): readers that
        # load pieces of the weights on demand (the offload engine) check what they read.
        "tensor_crc32": {},
        "dtype": _dominant_dtype(dtype_counts),
        "num_parameters": sum(dtype_counts.values()),
    }
    json.dumps(provenance)  # unserialisable options or metrics fail here, before any writing
    config_text = config.to_json() + "\n"
    check_free_space(out, sum(p.nbytes for p in planned))

    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        if tokenizer_src is not None:
            shutil.copytree(tokenizer_src, tmp / TOKENIZER_DIR)

        files: dict[str, str] = {}
        records: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
        crcs: dict[str, list[int]] = {}
        shards = _shard_plan(planned, max_shard_bytes)
        if len(shards) == 1:
            written = _write_planned(tmp / WEIGHTS_FILE, shards[0], {"format": "pt"})
            files[WEIGHTS_FILE] = written.sha256
            records.update(written.tensor_digests)
            crcs.update(written.block_crc32)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, start=1):
                filename = _shard_name(i, len(shards))
                written = _write_planned(tmp / filename, shard, {"format": "pt"})
                files[filename] = written.sha256
                records.update(written.tensor_digests)
                crcs.update(written.block_crc32)
                weight_map.update({p.name: filename for p in shard})
            index = {
                "metadata": {"total_size": sum(p.nbytes for p in planned)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

        # Small files are hashed from disk; the weights were hashed as they were written.
        for path in sorted(tmp.rglob("*")):
            rel = path.relative_to(tmp).as_posix()
            if path.is_file() and rel not in files:
                files[rel] = _sha256_file(path)
        provenance["content_hash"] = _combine_content_hash(records)
        provenance["files"] = dict(sorted(files.items()))
        provenance["tensor_crc32"] = dict(sorted(crcs.items()))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance


def save_checkpoint_with(out: str | os.PathLike, write_extra: "Callable[[Path], None]", *args: Any,
                         overwrite: bool = False, **kwargs: Any) -> dict[str, Any]:
    """`save_checkpoint` plus the files `write_extra(directory)` puts beside it (a task head, a
    report), all appearing at `out` in one atomic step; the extra files are outside the
    checkpoint's provenance. Arguments after `write_extra` are save_checkpoint's."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        inner = tmp / ".checkpoint"
        provenance = save_checkpoint(inner, *args, **kwargs)
        for item in inner.iterdir():
            os.rename(item, tmp / item.name)
        inner.rmdir()
        write_extra(tmp)
    return provenance


# =============================================================================================
# Reading
# =============================================================================================


class TensorInfo(NamedTuple):
    """Where a tensor lives: `byte_offset` is absolute within `file`, `nbytes` its length."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    byte_offset: int
    nbytes: int


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON ({exc})") from None


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def _parse_header(path: Path, file_size: int, head: bytes) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors header; `head` holds at least the file's first 8 bytes."""

    def corrupt(reason: str) -> UserError:
        return UserError(f"{path} has a corrupt safetensors header: {reason}")

    header_len = int.from_bytes(head[:8], "little")
    if header_len == 0 or header_len > _MAX_HEADER_BYTES:
        raise corrupt(f"implausible header length {header_len}")
    if 8 + header_len > file_size:
        raise UserError(
            f"{path} is truncated: expected at least {8 + header_len} bytes for its header, found {file_size}"
        )
    raw = head[8 : 8 + header_len]
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise corrupt(f"invalid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ must map strings to strings")

    data_start = 8 + header_len
    spans: list[tuple[int, int, str]] = []
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"entry for {name} must have exactly dtype, shape and data_offsets")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in _DTYPES:
            raise corrupt(f"unknown dtype {code!r} for {name} (supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise corrupt(f"shape of {name} must be a list of non-negative integers, got {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise corrupt(f"data_offsets of {name} must be two non-negative integers, got {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise corrupt(f"data_offsets of {name} are out of order: [{begin}, {end}]")
        dtype = _DTYPES[code]
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise corrupt(
                f"{name} has {end - begin} bytes but shape {_shape_str(shape)} of {code} needs {expected}"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(dtype, tuple(shape), path, data_start + begin, end - begin)

    # The data section must be tiled exactly: no overlaps (aliasing) and no holes, as the
    # official reader demands.
    position = 0
    previous = None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise corrupt(f"data of {name} overlaps {previous}")
        if begin > position:
            raise corrupt(f"unused bytes {position}..{begin} before {name}")
        position, previous = end, name
    expected_size = data_start + position
    if file_size < expected_size:
        raise UserError(f"{path} is truncated: expected {expected_size} bytes, found {file_size}")
    if file_size > expected_size:
        raise corrupt(f"{file_size - expected_size} bytes after the last tensor's data")
    return infos, metadata


def parse_crc_record(recorded: Any, shapes: Mapping[str, tuple[int, ...]], where: str) -> dict[str, tuple[int, ...]]:
    """Recorded CRC-32s ({name: [crc per block]}) checked for form: one unsigned 32-bit integer
    per block of each named tensor (crc_block_count). Malformed is a UserError, never "not
    recorded": a record that cannot be read must not switch the checking off."""
    def malformed(reason: str) -> UserError:
        return UserError(f"{where}: the recorded checksums (tensor_crc32) are malformed: {reason}")

    if not isinstance(recorded, dict):
        raise malformed(f"expected a table of tensor names, got {type(recorded).__name__}")
    out: dict[str, tuple[int, ...]] = {}
    for name, values in recorded.items():
        if not isinstance(values, list) or not all(type(v) is int and 0 <= v < 2**32 for v in values):
            raise malformed(f"{name}: expected a list of 32-bit integers, got {values!r}"[:300])
        if name in shapes and len(values) != crc_block_count(tuple(shapes[name])):
            raise malformed(f"{name}: {len(values)} values for {crc_block_count(tuple(shapes[name]))} blocks")
        out[name] = tuple(values)
    return out


class SafetensorsFile:
    """One safetensors file: its header parsed and checked here, its tensors read with the
    `safetensors` package (`safe_open`), which memory-maps the file once and hands out zero-copy,
    copy-on-write views (writing into one changes this process's pages, never the file). Views
    stay valid after `close()`.

    The header is parsed here too, not only by the package: its reader exposes no byte offsets
    (the offload engine preads tensors by offset, `info`), and a file it refuses gets the
    specific one-line reason below instead of the package's error.
    """

    def __init__(self, path: str | os.PathLike, expected_crc: Mapping[str, tuple[int, ...]] | None = None):
        """`expected_crc`: the CRC-32s recorded for this file's tensors elsewhere (a checkpoint's
        cpmctl.json); by default those in the file's own header (write_safetensors), if any."""
        self.path = Path(path)
        try:
            file_size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"weights file {self.path} does not exist") from None
        if file_size < 8:
            raise UserError(f"{self.path} is truncated: expected at least 8 bytes, found {file_size}")
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            header_len = int.from_bytes(head, "little")
            if 0 < header_len <= _MAX_HEADER_BYTES:
                head += fh.read(header_len)
        self._infos, self.metadata = _parse_header(self.path, file_size, head)
        self._size = file_size
        self._reader = None  # safe_open's handle, opened on the first tensor read
        if expected_crc is None and CRC_METADATA_KEY in self.metadata:
            try:
                recorded = json.loads(self.metadata[CRC_METADATA_KEY])
            except ValueError:
                raise UserError(f"{self.path}: its recorded checksums ({CRC_METADATA_KEY}) are not valid JSON; "
                                "the file is corrupt") from None
            expected_crc = parse_crc_record(recorded, {n: i.shape for n, i in self._infos.items()}, str(self.path))
        self.expected_crc = dict(expected_crc) if expected_crc is not None else None
        self._verified: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def _open(self):
        if self._reader is None:
            if self.path.stat().st_size != self._size:
                raise UserError(f"{self.path} changed size while being opened")
            self._reader = safe_open(self.path, framework="pt")
        return self._reader

    def mapping_address(self) -> tuple[int, int]:
        """(start address, length) of this file's memory map, for checking views lie inside it:
        every view of the package's one map sits at the map's start + its byte offset."""
        name = next((n for n, i in self._infos.items() if i.nbytes), None)
        if name is None:
            return 0, self._size
        info = self._infos[name]
        return self._open().get_tensor(name).data_ptr() - info.byte_offset, self._size

    def get(self, name: str) -> torch.Tensor:
        """The tensor (a zero-copy view where aligned), its bytes checked against the recorded
        CRC-32s on the first read of `name` while verification is on (`verification`)."""
        info = self.info(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        view = self._open().get_tensor(name)
        if not zero_copy_readable(info.dtype, info.byte_offset):
            # Files from writers that do not order tensors by element size can leave a tensor
            # misaligned, and one-byte tensors need a 64-byte line (ONE_BYTE_ALIGN); kernels
            # assume alignment, so such a tensor is copied instead.
            view = view.clone()
        if self.expected_crc is not None and name not in self._verified and verifying():
            self._check_crc(name, view)
        return view

    def _check_crc(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.expected_crc.get(name)
        if expected is None:
            raise UserError(f"{self.path}: no checksum is recorded for tensor {name}, though the others have one; "
                            "the file or its record was altered")
        if tuple(tensor_crc32(tensor)) != tuple(expected):
            raise UserError(f"checksum mismatch in tensor {name} of {self.path}: the file is corrupt; "
                            "re-create or re-copy it")
        self._verified.add(name)

    def state_dict(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in (self.names() if names is None else names)}

    def close(self) -> None:
        # Only our handle goes: live views keep the package's map alive until the last is gone.
        self._reader = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_alone(path: Path, name: str, expected_crc: tuple[int, ...] | None = None) -> torch.Tensor:
    """One tensor through a SafetensorsFile of its own: its memory map lives only as long as it
    (checked against `expected_crc`, a checkpoint's record, else the file's own)."""
    weights = SafetensorsFile(path, {name: expected_crc} if expected_crc is not None else None)
    try:
        return weights.get(name)
    finally:
        weights.close()


def _require_directory(path: Path) -> None:
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory (a checkpoint is a directory with {CONFIG_FILE})")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the checkpoint at `path`, without touching its weights."""
    path = Path(path)
    _require_directory(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"checkpoint {path} has no {CONFIG_FILE}")
    data = _load_json(config_path, "config")
    if not isinstance(data, dict):
        raise UserError(f"{config_path} is not a valid model config: expected a JSON object")
    hint = ""
    if "model_type" in data or "architectures" in data:
        hint = "; it looks like a Hugging Face model, import it with `cpmctl convert hf`"
    try:
        return ModelConfig.from_dict(data)
    except UserError as exc:
        raise UserError(f"{config_path} is not a valid model config: {exc}{hint}") from None
    except (TypeError, ValueError) as exc:  # a field of the wrong type fails inside validation
        raise UserError(f"{config_path} is not a valid model config: {exc}{hint}") from None


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's cpmctl.json, or {} if it has none (e.g. a hand-assembled directory)."""
    path = Path(path)
    _require_directory(path)
    provenance_path = path / PROVENANCE_FILE
    if not provenance_path.is_file():
        return {}
    data = _load_json(provenance_path, "provenance")
    if not isinstance(data, dict):
        raise UserError(f"provenance {provenance_path} is not a JSON object")
    return data


def _safe_filename(directory: Path, filename: Any, what: str) -> Path:
    # A shard named "../x" or "/etc/x" would read outside the checkpoint.
    if not isinstance(filename, str) or not filename or Path(filename).name != filename or filename in (".", ".."):
        raise UserError(f"{what} names an invalid shard file {filename!r}")
    return directory / filename


def _load_index(path: Path) -> dict[str, str]:
    index_path = path / INDEX_FILE
    index = _load_json(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UserError(f"{index_path} has no valid weight_map (tensor name -> shard file)")
    for filename in sorted(set(weight_map.values())):
        shard = _safe_filename(path, filename, str(index_path))
        if not shard.is_file():
            raise UserError(f"{index_path} names shard {filename}, which is missing")
    return weight_map


class Checkpoint:
    """A checkpoint directory opened for reading; tensors are memory-mapped views, fetched per name.

    `open_checkpoint(path)` validates the config, every weights header and the shard index up
    front (headers only, no tensor data), so later `get` calls are cheap and cannot fail on
    corruption a header reveals.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.provenance = read_provenance(self.path)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self.crcs: dict[str, tuple[int, ...]] | None = None  # recorded per-tensor CRC-32s (None: none recorded)
        self.nonfinite: list[str] = []  # float tensors holding NaN or infinity (found by load_model)
        try:
            self._open_weights()
            self._read_crcs()
        except BaseException:
            self.close()
            raise

    def _read_crcs(self) -> None:
        """The CRC-32s cpmctl.json records, checked for form and completeness; every weights file
        then checks the tensors it hands out against them."""
        if "tensor_crc32" not in self.provenance:
            return  # a hand-assembled directory, or one written before checksums were recorded
        where = str(self.path / PROVENANCE_FILE)
        crcs = parse_crc_record(self.provenance["tensor_crc32"], self.shapes(), where)
        if crcs or self._where:
            missing = sorted(set(self._where) - set(crcs))
            if missing:
                raise UserError(f"{where}: the recorded checksums (tensor_crc32) miss {len(missing)} tensor(s), "
                                f"e.g. {missing[0]}; the checkpoint or its record was altered")
        self.crcs = crcs
        for filename, st in self._files.items():
            st.expected_crc = {name: crcs[name] for name in st.names()}

    def tensor_crc(self, name: str) -> tuple[int, ...] | None:
        """The CRC-32s recorded for `name` (per block, crc_block_count), or None when none are."""
        return self.crcs.get(name) if self.crcs is not None else None

    def verify_tensors(self) -> None:
        """Read every tensor once, checking its recorded CRC-32s (a UserError names the first bad one)."""
        for name in self.tensor_names():
            self.get(name)

    def _open_weights(self) -> None:
        index_path = self.path / INDEX_FILE
        single_path = self.path / WEIGHTS_FILE
        if index_path.is_file():
            weight_map = _load_index(self.path)
            for filename in sorted(set(weight_map.values())):
                self._files[filename] = SafetensorsFile(self.path / filename)
            for filename, st in self._files.items():
                for name in st.names():
                    listed = weight_map.get(name)
                    if listed is None:
                        raise UserError(f"{INDEX_FILE} does not list {name}, found in {filename}")
                    if listed != filename:
                        raise UserError(f"{INDEX_FILE} places {name} in {listed}, but it is in {filename}")
            for name, filename in weight_map.items():
                if name not in self._files[filename]._infos:
                    raise UserError(f"{INDEX_FILE} places {name} in {filename}, but that file does not hold it")
            self._where = dict(weight_map)
        elif single_path.is_file():
            self._files[WEIGHTS_FILE] = SafetensorsFile(single_path)
            self._where = {name: WEIGHTS_FILE for name in self._files[WEIGHTS_FILE].names()}
        else:
            raise UserError(f"checkpoint {self.path} has no weights ({WEIGHTS_FILE} or {INDEX_FILE})")

    def tensor_names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def file_of(self, name: str) -> SafetensorsFile:
        """The opened weights file holding `name`."""
        try:
            return self._files[self._where[name]]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.path}") from None

    def tensor_info(self, name: str) -> TensorInfo:
        return self.file_of(name).info(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, for `check_state_dict_matches`."""
        return {name: self.tensor_info(name).shape for name in self.tensor_names()}

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy, copy-on-write view of one tensor on the file's memory map."""
        return self.file_of(name).get(name)

    def state_dict(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in (self.tensor_names() if names is None else names)}

    def lazy_state_dict(self, names: Iterable[str] | None = None) -> dict[str, LazyTensor]:
        """Each tensor as a LazyTensor read through a map of its own, which goes with the tensor:
        `get`'s views share one map per file, whose touched pages stay resident while it lives,
        so a writer walking the whole model through them would hold all of it."""
        lazy = {}
        for name in self.tensor_names() if names is None else names:
            info = self.tensor_info(name)
            lazy[name] = LazyTensor(info.dtype, info.shape, functools.partial(_read_alone, info.file, name, self.tensor_crc(name)))
        return lazy

    def weight_files(self) -> list[Path]:
        return [st.path for st in self._files.values()]

    def size_on_disk(self) -> int:
        """Bytes of every file in the checkpoint directory, tokenizer and metadata included."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def dtype_summary(self) -> dict[str, int]:
        """Number of parameters per dtype, e.g. {"bfloat16": 11_000_000_000, "int64": 64}."""
        counts: dict[str, int] = {}
        for name in self._where:
            info = self.tensor_info(name)
            key = _dtype_name(info.dtype)
            counts[key] = counts.get(key, 0) + math.prod(info.shape)
        return dict(sorted(counts.items()))

    def num_parameters(self) -> int:
        return sum(self.dtype_summary().values())

    def close(self) -> None:
        for st in self._files.values():
            st.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self._where)})"


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    return Checkpoint(path)


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Re-hash every file recorded in cpmctl.json and check the weights' structure.

    Returns the provenance. Raises UserError naming the first file that is missing or whose
    bytes differ from what was recorded.
    """
    path = Path(path)
    provenance = read_provenance(path)
    if not provenance:
        raise UserError(f"cannot verify {path}: it has no {PROVENANCE_FILE}")
    files = provenance.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"cannot verify {path}: {PROVENANCE_FILE} records no file hashes")
    for rel, expected in sorted(files.items()):
        file_path = path / rel
        if not file_path.resolve().is_relative_to(path.resolve()):
            raise UserError(f"{PROVENANCE_FILE} names a file outside the checkpoint: {rel}")
        if not file_path.is_file():
            raise UserError(f"checkpoint {path} is missing {rel}")
        if _sha256_file(file_path) != expected:
            raise UserError(f"checksum mismatch in {rel}")
    with open_checkpoint(path):
        pass  # opening validates the config, the headers and the index
    return provenance


def check_state_dict_matches(
    expected: Mapping[str, Iterable[int]], found: Mapping[str, Iterable[int]]
) -> None:
    """Raise a UserError naming the first (in name order) missing, unexpected or misshapen tensor.

    `expected` comes from the config (the model's own state dict shapes), `found` from the file.
    """
    problems = []
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            problems.append(f"{name} is missing from the weights")
        elif name not in expected:
            problems.append(f"{name} is in the weights but the config has no such tensor")
        else:
            want, have = [int(d) for d in expected[name]], [int(d) for d in found[name]]
            if want != have:
                problems.append(
                    f"{name} has shape {_shape_str(have)} in the file, the config expects {_shape_str(want)}"
                )
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise UserError(f"config does not match the weights: {problems[0]}{more}")


# -- models on top of the store --------------------------------------------------------------------
def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple["torch.nn.Module", Checkpoint]:
    """Build the checkpoint's model on the meta device and assign its weights (no init, no copy).

    On the CPU with the stored dtype the parameters stay zero-copy views of the memory-mapped
    files; a different device or dtype converts tensor by tensor. The model is in eval mode.
    A config that does not match the weights is a UserError naming the first mismatch. While
    verification is on (the default), every tensor is checked against its recorded CRC-32s (a
    mismatch is a UserError naming the file and tensor) and for NaN/infinity (a warning naming
    the tensor; `ckpt.nonfinite` lists them, and `infer` refuses them).
    """
    ckpt = open_checkpoint(path)
    try:
        model = build_model(ckpt.config, device="meta")
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        check_state_dict_matches(expected, ckpt.shapes())
        device = torch.device(device)
        state = {}
        check = verifying()
        for name in expected:
            tensor = ckpt.get(name)  # checked against its recorded CRC-32s (Checkpoint.crcs)
            if check and not all_finite(tensor):
                ckpt.nonfinite.append(name)
            # A quantized weight's pieces keep their stored dtypes (int8/uint8 values, bf16 scales).
            want = tensor.dtype if dtype is None or is_quantized_part(name) else dtype
            if tensor.device != device or tensor.dtype != want:
                tensor = tensor.to(device=device, dtype=want)
            state[name] = tensor
        model.load_state_dict(state, assign=True, strict=True)
    except BaseException:
        ckpt.close()
        raise
    if ckpt.nonfinite:
        more = f" and {len(ckpt.nonfinite) - 1} more" if len(ckpt.nonfinite) > 1 else ""
        log.warning(f"warning: {ckpt.path} holds NaN or infinite weights in {ckpt.nonfinite[0]}{more}")
    recorded_hash = ckpt.provenance.get("content_hash")
    if check and ckpt.crcs is not None and isinstance(recorded_hash, str):
        _VERIFIED[ckpt.path.resolve()] = recorded_hash
    return model.eval(), ckpt


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a weight holds no NaN or infinity (integer tensors always do). A sum is finite
    exactly when every term is, unless it overflows: only then are the elements looked at (a
    sum runs ~4x faster than an elementwise isfinite over memory-mapped pages)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def save_model(model: "torch.nn.Module", out: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Save a `Transformer` (its config and weights) as a checkpoint; kwargs as in save_checkpoint."""
    return save_checkpoint(out, model.config, model.state_dict(), **kwargs)
