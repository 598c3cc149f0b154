"""Offload planning on shapes alone: which weights stay resident, which stream, and how many
slots a memory budget buys. The engine and the dry run (`cpmctl infer --dry-run`) share it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cpmctl.checkpoint import zero_copy_readable
from cpmctl.errors import UserError
from cpmctl.offload.reader import ALIGN_BYTES
from cpmctl.quant import QUANT_PARTS, is_quantized_part
from cpmctl.units import human_bytes

from cpmctl.command_configs import OFFLOAD_MODES


@dataclass(frozen=True)
class StoredTensor:
    """What planning needs of one stored tensor: its shape, stored dtype and where its bytes
    start in its file (None when unknown, e.g. a dry run before the weights exist: the slots are
    then laid out as for converted copies, at most a few 64-byte lines smaller)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    byte_offset: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def stored_tensors(ckpt, names) -> dict[str, StoredTensor]:
    """`names` (in that order) as the open checkpoint's headers describe them."""
    out = {}
    for name in names:
        info = ckpt.tensor_info(name)
        out[name] = StoredTensor(tuple(info.shape), info.dtype, info.byte_offset)
    return out


def run_weight_bytes(tensors: Mapping[str, StoredTensor], dtype: torch.dtype) -> int:
    """Bytes of every weight as it runs (the run dtype; quantized pieces as stored): what a
    percentage budget is a percentage of."""
    return sum(t.nbytes if is_quantized_part(name) else t.numel * dtype.itemsize for name, t in tensors.items())


@dataclass
class OffloadPlan:
    """Which weights stay resident, what streams in which units, and the budget's arithmetic."""

    mode: str                      # "cpu" (pinned host memory) or "disk"
    budget: int                    # bytes
    resident_names: list[str]
    units: list[tuple[tuple, list[tuple[str, int | None]]]]  # offload_units' layout: (key, [(tensor, expert or None)])
    unit_kind: str                 # "expert" or "block"
    slots: int
    arithmetic: "SlotArithmetic"   # resident and slot bytes, the minimum budget, the slots' layouts
    raw: bool = False              # slots hold the units' stored bytes (quantized experts), offsets in bytes


def offload_units(model: nn.Module) -> tuple[str, list[tuple[tuple, list[tuple[str, int | None]]]]]:
    """What streams: ("expert", one unit per expert of every routed MoE layer) or ("block", one
    unit per transformer block), each unit as [(tensor name, expert index or None for the whole
    tensor)]. Shapes only: works on a model built on the meta device (dry runs)."""
    units: list[tuple[tuple, list[tuple[str, int | None]]]] = []
    routed = [(stack, i, ffn) for stack, i, ffn in model.ffn_modules()
              if hasattr(ffn, "route") and not ffn.selects_all]
    if routed:
        for stack, i, ffn in routed:
            prefix = f"{stack}.blocks.{i}.ffn."
            tensors = [prefix + w for w in ("w_in", "w_gate", "w_out") if getattr(ffn, w) is not None]
            if getattr(ffn, "quantized", False):  # each weight is stored as its quantized pieces
                tensors = [f"{t}.{part}" for t in tensors for part in QUANT_PARTS if getattr(getattr(ffn, t.rpartition(".")[2]), part) is not None]
            for e in range(ffn.num_experts):
                units.append(((stack, i, e), [(t, e) for t in tensors]))
        return "expert", units
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name, None)
        if stack is None or len(stack.blocks) < 2:  # a shared block is applied every step: keep it
            continue
        for i, block in enumerate(stack.blocks):
            prefix = f"{stack_name}.blocks.{i}."
            units.append(((stack_name, i), [(prefix + n, None) for n in block.state_dict()]))
    return "block", units


def part_alignment(*, device: torch.device, stored_dtype: torch.dtype, dtype: torch.dtype, byte_offset: int,
                   tensor_offset: int | None = None) -> int:
    """Element offset (mod a 64-byte line) a piece must have in its slot: the alignment its
    resident copy would have. Zero-copy views of the file on a CPU keep the file's
    (`checkpoint.zero_copy_readable`); a tensor the reader copies instead (same dtype, stored at
    `tensor_offset`) starts aligned, so its piece keeps its offset within the tensor; converted
    copies are aligned. BLAS takes different paths for differently aligned operands (a one-row
    product differs in the last bit), and the offloaded model must compute what the resident one does."""
    itemsize = dtype.itemsize
    if device.type != "cpu" or stored_dtype != dtype:
        return 0
    start = byte_offset if tensor_offset is None else tensor_offset
    if zero_copy_readable(stored_dtype, start):
        return (byte_offset % ALIGN_BYTES) // itemsize
    return ((byte_offset - start) % ALIGN_BYTES) // itemsize


def staging_bytes(*, device: torch.device, mode: str, pieces: list[tuple[int, torch.dtype]], dtype: torch.dtype) -> int:
    """On a CPU the budget also covers the staging buffer that converts a stored dtype to the run
    dtype (on a GPU that buffer is in host memory, outside the device budget). `pieces`: (stored
    bytes, stored dtype) of every streamed piece."""
    if device.type != "cpu" or mode != "disk":
        return 0
    return max((nbytes for nbytes, stored in pieces if stored != dtype), default=0)


@dataclass(frozen=True)
class SlotArithmetic:
    """The budget arithmetic of an offloaded model (pure numbers, shared with the dry run)."""

    resident_bytes: int  # resident weights, staging buffer included
    slot_bytes: int      # one slot: the largest unit packed at its alignments, whole 64-byte lines
    units: int
    minimum: int         # resident_bytes + one slot
    offsets: tuple[tuple[int, ...], ...]  # element offset of each part in its unit's slot

    def slots(self, budget: int, unit_kind: str, *, quantized: bool = False) -> int:
        """Slots the budget buys (at most one per unit); UserError below the minimum."""
        if budget < self.minimum:
            what = ("one quantized expert slot" if quantized else "one expert slot") if unit_kind == "expert" else "one layer"
            raise UserError(f"a memory budget of {human_bytes(budget)} is below this model's minimum of {human_bytes(self.minimum)} "
                            f"(resident weights {human_bytes(self.resident_bytes)} + {what} {human_bytes(self.slot_bytes)}); raise it")
        return min(self.units, (budget - self.resident_bytes) // self.slot_bytes) if self.units else 0


def slot_arithmetic(*, resident_numel: int, unit_parts: list[list[tuple[int, int]]], itemsize: int,
                    staging: int = 0) -> SlotArithmetic:
    """Resident bytes, slot bytes and the minimum budget from element counts: `unit_parts` holds,
    per unit, (numel, wanted element offset mod a 64-byte line) of each part (part_alignment)."""
    per_line = ALIGN_BYTES // itemsize
    slot_numel = 0
    offsets = []
    for parts in unit_parts:
        offset, placed = 0, []
        for numel, want in parts:
            offset += (want - offset) % per_line
            placed.append(offset)
            offset += numel
        offsets.append(tuple(placed))
        slot_numel = max(slot_numel, offset)
    slot_numel += -slot_numel % per_line  # every slot starts on a 64-byte line
    slot_bytes = slot_numel * itemsize
    resident_bytes = resident_numel * itemsize + staging
    return SlotArithmetic(resident_bytes, slot_bytes, len(unit_parts), resident_bytes + slot_bytes, tuple(offsets))


def check_offload_device(mode: str, device: torch.device) -> None:
    """Refuses host-memory offload without a GPU to offload from (the mode itself is the
    caller's to validate: `plan_offload` takes "cpu" or "disk")."""
    if mode == "cpu" and device.type != "cuda":
        raise UserError("offloading to host memory (cpu) serves a GPU; on a CPU offload to disk")


def offload_run_dtype(stored: set, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype offloaded weights run in: the requested one, else the stored floating dtype if
    there is a single one (a quantized checkpoint's integer pieces do not count), else float32."""
    floats = {d for d in stored if d.is_floating_point}
    return dtype or (next(iter(floats)) if len(floats) == 1 else torch.float32)


def plan_offload(model: nn.Module, tensors: Mapping[str, StoredTensor], *, mode: str, budget: int, dtype: torch.dtype,
                 device: torch.device) -> OffloadPlan:
    """Which of the model's weights (`tensors`, by name in state-dict order) stay resident, which
    stream in units, and how many slots `budget` bytes buy (the numbers: `slot_arithmetic`).
    Shapes only: the model may be on the meta device."""
    if mode not in ("cpu", "disk"):
        raise ValueError(f"offload mode must be cpu or disk, got {mode!r}")
    kind, layout = offload_units(model)
    # Quantized experts move and sit in their slots as stored bytes (int8/uint8 values, bf16
    # scales): the slots are byte buffers, every piece on its own 64-byte line.
    raw = any(is_quantized_part(name) for _, parts in layout for name, _ in parts)
    unit_parts, pieces = [], []
    for _, parts in layout:
        placed = []
        for name, block in parts:
            t = tensors[name]
            shape = t.shape[1:] if block is not None else t.shape
            numel = math.prod(shape)
            want = 0
            if raw:
                numel *= t.dtype.itemsize
            elif t.byte_offset is not None:
                offset = t.byte_offset + (block * (t.nbytes // t.shape[0]) if block is not None else 0)
                want = part_alignment(device=device, stored_dtype=t.dtype, dtype=dtype, byte_offset=offset,
                                      tensor_offset=t.byte_offset)
            placed.append((numel, want))
            pieces.append((numel * t.dtype.itemsize, t.dtype))
        unit_parts.append(placed)
    streamed = {name for _, parts in layout for name, _ in parts}
    resident_names = [name for name in tensors if name not in streamed]
    resident_numel = sum(tensors[name].numel for name in resident_names)
    if raw:
        arithmetic = slot_arithmetic(resident_numel=resident_numel * dtype.itemsize, unit_parts=unit_parts, itemsize=1)
    else:
        arithmetic = slot_arithmetic(resident_numel=resident_numel, unit_parts=unit_parts, itemsize=dtype.itemsize,
                                     staging=staging_bytes(device=device, mode=mode, pieces=pieces, dtype=dtype))
    return OffloadPlan(mode, budget, resident_names, layout, kind, arithmetic.slots(budget, kind, quantized=raw), arithmetic, raw)
