"""Inference under a memory budget: weights that do not fit stay in host memory or on disk and are
streamed in as the forward pass needs them (`cpmctl infer --offload cpu|disk --memory-budget`).

    cpmctl infer ./moe-ckpt "text" --offload disk --memory-budget 25% --json

What stays resident: every weight except the experts of routed MoE layers (MoE models) or except
the transformer blocks (dense models), read into memory of its own (pread, checked). Then as many
units (experts, or blocks) as fit the rest of the budget: they live in a cache of equal slots on
the device, one slot per unit, each unit packed so that a move is one contiguous copy into its
slot (from pinned host memory with --offload cpu; with --offload disk, pread from the files,
which on a CPU measured 2-3x cheaper per megabyte than mapping the pages in and dropping them
again). What does not fit is loaded when needed:

- MoE layers (`OffloadedMoE`, InfMoE's scheme, see ../shared/REFERENCES.md): the layer routes its
  tokens, then computes the experts that are already in the cache first while a loader thread
  brings the missing ones in (a copy stream on CUDA), in an order (`infmoe_order`) that hides
  each load behind the compute before it, from compute and load times measured at start-up.
  While it computes, the next MoE layer's router is applied to the current hidden state and its
  likely experts are prefetched, for as long as those guesses are mostly right
  (`OffloadEngine.should_prefetch`). Slots are evicted least-frequently-used first (ties: least
  recently used): an LRU cache smaller than the experts a token needs misses on every access,
  because layers are visited in a cycle; counting uses keeps the popular experts.
- dense blocks (`StreamedBlock`): loaded layer by layer, the next streamed block loading while the
  current one computes.

Correctness: experts and blocks compute with the same functions as the resident model
(`cpmctl.moe.expert_output`, `combine_pairs`; the block's own forward on its loaded weights), so
outputs equal the resident model's bit for bit. Every piece read from disk is checked once against
the CRC-32s the checkpoint writer recorded (`tensor_crc32` in cpmctl.json); a short read, a
checksum mismatch or a loader that died is an `OffloadError` (a UserError: one line, exit 2),
never a wrong output.
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from cpmctl.errors import UserError
from cpmctl.moe import expert_jobs, expert_output, fill_for_skipped

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "cpu", "disk")
_ALIGN_BYTES = 64
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class OffloadError(UserError):
    """Weights could not be brought in correctly (short read, checksum mismatch, loader failure)."""


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
            raise UserError(f"--memory-budget {text} must be a percentage in (0, 100]")
        return int(total * value / 100)
    size = int(value * _UNITS.get(unit or "b", 1))
    if size <= 0:
        raise UserError(f"--memory-budget must be positive, got {text!r}")
    return size


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# -- what moves: units made of parts of tensors -------------------------------------------------------
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


# -- the slot cache and its loader -----------------------------------------------------------------------
class UnitCache:
    """K equal slots on the device holding units, filled by one loader thread.

    `request(unit)` pins the unit and returns at once (a hit, or a load queued behind earlier
    ones); `acquire(unit)` waits until its bytes are in and returns views of its slot;
    `release(unit)` unpins it. A pinned or loading unit is never evicted; an unpinned one is
    evicted least-frequently-used first. `prefetch(unit)` loads into a free or evictable slot
    and never waits for one. A failed load raises in whoever acquires it, and the slot is freed.
    """

    def __init__(self, slots: int, store: "CopySlots") -> None:
        self.device, self.slots, self.store = store.device, slots, store
        self._slot_of: dict[tuple, int] = {}
        self._holder: list[tuple | None] = [None] * slots
        self._pins: dict[tuple, int] = {}
        self._loading: dict[tuple, Future] = {}
        self._events: dict[tuple, object] = {}  # CUDA: the copy's completion event per loaded unit
        self._uses: dict[tuple, int] = {}
        self._last_use: dict[tuple, int] = {}
        self._clock = 0
        self._cond = threading.Condition()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpmctl-offload")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._slot_free_event: list = [None] * slots
        self.failed: BaseException | None = None
        self.hits = self.misses = self.loads = self.prefetches = self.bytes_moved = 0
        self.load_seconds = 0.0
        # Prefetched units not yet asked for; and how many prefetches were used before eviction
        # (useful) or evicted unused (wasted): a prefetch that guesses badly only churns the cache.
        self._prefetched: set[tuple] = set()
        self.prefetch_useful = self.prefetch_wasted = 0

    # -- bookkeeping (under self._cond) --
    def _touch(self, key: tuple) -> None:
        self._clock += 1
        self._uses[key] = self._uses.get(key, 0) + 1
        self._last_use[key] = self._clock

    def _victim(self) -> int | None:
        """A free slot, else the unpinned loaded unit used least often (then least recently)."""
        best, best_rank = None, None
        for slot, key in enumerate(self._holder):
            if key is None:
                return slot
            if self._pins.get(key, 0) or key in self._loading:
                continue
            rank = (self._uses.get(key, 0), self._last_use.get(key, 0))
            if best_rank is None or rank < best_rank:
                best, best_rank = slot, rank
        return best

    def _claim(self, key: tuple, slot: int) -> None:
        old = self._holder[slot]
        if old is not None:
            del self._slot_of[old]
            if old in self._prefetched:
                self._prefetched.discard(old)
                self.prefetch_wasted += 1
        self._holder[slot] = key
        self._slot_of[key] = slot

    # -- loading (loader thread) --
    def _load(self, unit: Unit, slot: int) -> object:
        started = time.perf_counter()
        try:
            if self._copy_stream is not None:
                with torch.cuda.stream(self._copy_stream):
                    event = self._slot_free_event[slot]
                    if event is not None:  # the last compute that read this slot must be done
                        self._copy_stream.wait_event(event)
                    moved = self.store.fill(unit, slot)
                    done = torch.cuda.Event()
                    done.record(self._copy_stream)
            else:
                moved, done = self.store.fill(unit, slot), None
        except BaseException as exc:
            with self._cond:
                self._holder[slot] = None
                self._slot_of.pop(unit.key, None)
                self._loading.pop(unit.key, None)
                self.failed = exc
                self._cond.notify_all()
            raise
        with self._cond:
            self._events[unit.key] = done
            self.loads += 1
            self.bytes_moved += moved
            self.load_seconds += time.perf_counter() - started
            self._loading.pop(unit.key, None)
            self._cond.notify_all()
        return done

    def _submit(self, unit: Unit, *, wait_for_slot: bool) -> Future | None:
        """Queue a load; the slot is chosen when the loader gets to it (units ahead may free one)."""

        def task():
            with self._cond:
                while True:
                    slot = self._victim()
                    # A prefetch that a layer has asked for since must load like a demand.
                    if slot is not None or not (wait_for_slot or self._pins.get(unit.key, 0)):
                        break
                    self._cond.wait()
                if slot is None:  # a prefetch that found no room: drop it
                    self._loading.pop(unit.key, None)
                    return None
                self._claim(unit.key, slot)
            return self._load(unit, slot)

        future = self._loader.submit(task)
        self._loading[unit.key] = future
        return future

    # -- the compute side --
    def request(self, unit: Unit) -> bool:
        """Pin `unit` for the caller's next `acquire`; True when it was already cached or on its way."""
        with self._cond:
            if self.failed is not None:
                self._raise_failed()
            self._touch(unit.key)
            self._pins[unit.key] = self._pins.get(unit.key, 0) + 1
            self._count_prefetch_use(unit.key)
            if unit.key in self._slot_of or unit.key in self._loading:
                self.hits += 1
                return True
            self.misses += 1
            self._submit(unit, wait_for_slot=True)
            return False

    def pin_cached(self, keys: list[tuple]) -> set[tuple]:
        """Pin those of `keys` whose bytes are in a slot now (hits) and return them."""
        with self._cond:
            if self.failed is not None:
                self._raise_failed()
            found = set()
            for key in keys:
                if key in self._slot_of and key not in self._loading:
                    self._count_prefetch_use(key)
                    self._touch(key)
                    self._pins[key] = self._pins.get(key, 0) + 1
                    self.hits += 1
                    found.add(key)
            return found

    def _count_prefetch_use(self, key: tuple) -> None:
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.prefetch_useful += 1

    def prefetch_precision(self) -> float | None:
        decided = self.prefetch_useful + self.prefetch_wasted
        return self.prefetch_useful / decided if decided else None

    def prefetch(self, unit: Unit) -> None:
        with self._cond:
            if self.failed is None and unit.key not in self._slot_of and unit.key not in self._loading:
                self.prefetches += 1
                self._prefetched.add(unit.key)
                self._submit(unit, wait_for_slot=False)

    def _raise_failed(self) -> None:
        failed = self.failed
        if isinstance(failed, OffloadError):
            raise OffloadError(str(failed)) from failed
        raise OffloadError(f"the weight loader failed: {failed}") from failed

    def try_acquire(self, unit: Unit) -> list[Tensor] | None:
        """Views of `unit`'s parts in its slot once its bytes are in (requested before), else None."""
        with self._cond:
            if self.failed is not None:
                self._raise_failed()
            if unit.key in self._loading:
                return None
            slot = self._slot_of.get(unit.key)
            if slot is None:  # a prefetch that found no room before it was asked for: load it now
                self._submit(unit, wait_for_slot=True)
                return None
            event = self._events.get(unit.key)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return self.store.views(unit, slot)

    def wait_for_load(self, loads_seen: int) -> None:
        """Block until a load finishes after `loads_seen` loads (or one fails)."""
        with self._cond:
            while self.loads == loads_seen and self.failed is None:
                self._cond.wait()

    def acquire(self, unit: Unit) -> list[Tensor]:
        while True:
            seen = self.loads
            views = self.try_acquire(unit)
            if views is not None:
                return views
            self.wait_for_load(seen)

    def release(self, unit: Unit) -> None:
        with self._cond:
            left = self._pins.get(unit.key, 0) - 1
            if left > 0:
                self._pins[unit.key] = left
            else:
                self._pins.pop(unit.key, None)
            slot = self._slot_of.get(unit.key)
            if self._copy_stream is not None and slot is not None:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self._slot_free_event[slot] = event
            self._cond.notify_all()

    def mean_load_seconds(self) -> float:
        return self.load_seconds / self.loads if self.loads else 0.0

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)


class CopySlots:
    """Slots as rows of one buffer on the device: a load copies the unit in (one contiguous copy
    from host memory with --offload cpu; pread from the files with --offload disk)."""

    def __init__(self, slots: int, slot_numel: int, dtype: torch.dtype, device: torch.device,
                 read_unit: Callable[[Unit, Tensor], int]) -> None:
        self.device = device
        self.buffer = torch.empty(slots, slot_numel, dtype=dtype, device=device)
        self.nbytes = self.buffer.nbytes
        self._read_unit = read_unit

    def fill(self, unit: Unit, slot: int) -> int:
        return self._read_unit(unit, self.buffer[slot])

    def views(self, unit: Unit, slot: int) -> list[Tensor]:
        row = self.buffer[slot]
        return [row[o : o + math.prod(p.shape)].view(p.shape) for p, o in zip(unit.parts, unit.offsets)]


# -- the InfMoE order --------------------------------------------------------------------------------------
def infmoe_order(resident: dict[int, float], missing: dict[int, float], load_seconds: float) -> tuple[list[int], bool]:
    """Compute order of one layer's experts and whether it hides every load.

    `resident` and `missing` map expert -> compute time a_i; the missing ones load one after
    another, b = `load_seconds` each, in their order here. InfMoE's two constraints on an order
    (REFERENCES.md), counted with the resident experts' compute: the j-th missing expert, at
    position t, starts after its load is done, sum_{i<t} a_i >= j b; and loads never run more
    than K slots ahead, sum_{i<t} a_i <= (t + K - 1) b. Resident experts go first (their compute
    covers the first loads), cheapest first so their slots free early; then the missing ones,
    most expensive first. That order maximises every prefix sum, so if any order meets the first
    constraint this one does. The second needs no search here: the cache's loader waits for a
    free slot, so running ahead is impossible by construction (it can only idle)."""
    order = sorted(resident, key=lambda e: (resident[e], e))
    elapsed = sum(resident.values())
    hidden = True
    for j, e in enumerate(sorted(missing, key=lambda e: (-missing[e], e)), start=1):
        hidden &= elapsed >= j * load_seconds
        order.append(e)
        elapsed += missing[e]
    return order, hidden


# -- modules swapped into the model ---------------------------------------------------------------------
class OffloadedMoE(nn.Module):
    """A routed MoE FFN whose experts live in the `UnitCache`; the router, biases and fill stay
    resident on `moe` (whose expert weights are left on the meta device)."""

    def __init__(self, moe: nn.Module, units: list[Unit], engine: "OffloadEngine") -> None:
        super().__init__()
        self.moe = moe
        self.units = units
        self.engine = engine
        self.next_layer: OffloadedMoE | None = None

    def link_next(self, layer: "OffloadedMoE") -> None:
        # Stored past nn.Module's __setattr__: a link is not a child module (no cycles, no
        # duplicate parameters).
        self.__dict__["next_layer"] = layer

    def forward(self, x: Tensor) -> Tensor:
        moe, engine = self.moe, self.engine
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights = moe.route(flat)
        n, k = experts.shape
        moe.counts[0] += n
        moe.counts[1] += experts.numel()
        jobs, width, finish = expert_jobs(flat, experts, weights)
        job_of = {job.expert: job for job in jobs}
        cache = engine.cache
        # Pin the cached experts first, so that nothing evicts them before they compute.
        hits = cache.pin_cached([self.units[e].key for e in job_of])
        resident = {e: engine.compute_seconds(j.end - j.start) for e, j in job_of.items() if self.units[e].key in hits}
        missing = {e: engine.compute_seconds(j.end - j.start) for e, j in job_of.items() if e not in resident}
        order, hidden = infmoe_order(resident, missing, engine.load_seconds())
        engine.layer_calls += 1
        engine.hidden_calls += hidden
        for e in order:
            if e in missing:
                cache.request(self.units[e])
        if self.next_layer is not None and engine.should_prefetch():
            self.next_layer.prefetch_for(flat)
        out = flat.new_empty(width, flat.shape[-1])
        b_in, b_gate = moe.b_in, moe.b_gate
        # Compute in that order, except that an expert whose load is done goes before one still
        # loading (prefetches queued earlier can complete out of order): the outputs land in
        # fixed rows, so the order changes no bit, and a slot is never held by an expert that
        # waits behind one that cannot load.
        pending = list(order)
        while pending:
            seen = cache.loads
            for e in pending:
                views = cache.try_acquire(self.units[e])
                if views is not None:
                    break
            else:
                cache.wait_for_load(seen)
                continue
            pending.remove(e)
            job = job_of[e]
            w_in, w_gate, w_out = engine.expert_views(views)
            try:
                expert_output(job.rows, w_in, w_gate, w_out, None if b_in is None else b_in[e],
                              None if b_gate is None else b_gate[e], moe.activation, job.weights, out=out[job.start : job.end])
            finally:
                cache.release(self.units[e])
        out = finish(out)
        if moe.b_out is not None:
            out = out + moe.b_out
        if moe.fill_out is not None and k < moe.num_experts:
            out = out + fill_for_skipped(moe.fill_out, experts).to(out.dtype)
        return out.view(shape)

    @torch.no_grad()
    def prefetch_for(self, x: Tensor) -> None:
        """Pre-gating: this layer's router on the previous layer's FFN input predicts its experts."""
        experts, _ = self.moe.route(x)
        for e in torch.unique(experts).tolist():
            self.engine.cache.prefetch(self.units[e])


class StreamedBlock(nn.Module):
    """A transformer block whose weights are loaded into a cache slot for each call."""

    def __init__(self, block: nn.Module, unit: Unit, engine: "OffloadEngine") -> None:
        super().__init__()
        self.block = block
        self.unit = unit
        self.engine = engine
        self.next_block: StreamedBlock | None = None
        prefix = f"{unit.key[0]}.blocks.{unit.key[1]}."
        self.local_names = [p.name[len(prefix):] for p in unit.parts]

    def link_next(self, block: "StreamedBlock") -> None:
        self.__dict__["next_block"] = block  # a link, not a child module (the last links to the first)

    def forward(self, *args, **kwargs):
        cache = self.engine.cache
        cache.request(self.unit)
        if self.next_block is not None and self.engine.should_prefetch():
            cache.prefetch(self.next_block.unit)
        try:
            views = cache.acquire(self.unit)
            params = dict(zip(self.local_names, views))
            return torch.func.functional_call(self.block, params, args, kwargs, strict=False)
        finally:
            cache.release(self.unit)


def make_part(ckpt, name: str, block: int | None) -> Part:
    """Tensor `name` of `ckpt` as a Part: all of it, or expert block `block` of a 3-D tensor,
    with the CRC-32s the writer recorded for those bytes (None for checkpoints without them)."""
    crcs = ckpt.provenance.get("tensor_crc32") if isinstance(ckpt.provenance, dict) else None
    info = ckpt.tensor_info(name)
    expected = None
    if crcs and name in crcs:
        values = tuple(int(v) for v in crcs[name])
        if block is None:
            expected = values
        elif len(values) == info.shape[0]:
            expected = (values[block],)
    if block is None:
        return Part(name, tuple(info.shape), info.file, info.byte_offset, info.nbytes, info.dtype, expected)
    size = info.nbytes // info.shape[0]
    return Part(name, tuple(info.shape[1:]), info.file, info.byte_offset + block * size, size, info.dtype, expected)


# -- planning and building ----------------------------------------------------------------------------
@dataclass
class OffloadPlan:
    mode: str
    budget: int
    resident_names: list[str]
    resident_bytes: int
    units: list[Unit]
    unit_kind: str  # "expert" or "block"
    slots: int
    slot_bytes: int
    minimum: int  # resident_bytes (staging included) + one slot


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


def part_alignment(*, device: torch.device, stored_dtype: torch.dtype, dtype: torch.dtype, byte_offset: int) -> int:
    """Element offset (mod a 64-byte line) a piece must have in its slot: the alignment its
    resident copy would have. Zero-copy views of the file on a CPU keep the file's, converted
    copies are aligned. BLAS takes different paths for differently aligned operands (a one-row
    product differs in the last bit), and the offloaded model must compute what the resident one does."""
    itemsize = dtype.itemsize
    zero_copy = device.type == "cpu" and stored_dtype == dtype and byte_offset % itemsize == 0
    return (byte_offset % _ALIGN_BYTES) // itemsize if zero_copy else 0


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

    def slots(self, budget: int, unit_kind: str) -> int:
        """Slots the budget buys (at most one per unit); UserError below the minimum."""
        if budget < self.minimum:
            what = "one expert slot" if unit_kind == "expert" else "one layer"
            raise UserError(f"--memory-budget {human_bytes(budget)} is below this model's minimum of {human_bytes(self.minimum)} "
                            f"(resident weights {human_bytes(self.resident_bytes)} + {what} {human_bytes(self.slot_bytes)}); raise it")
        return min(self.units, (budget - self.resident_bytes) // self.slot_bytes) if self.units else 0


def slot_arithmetic(*, resident_numel: int, unit_parts: list[list[tuple[int, int]]], itemsize: int,
                    staging: int = 0) -> SlotArithmetic:
    """Resident bytes, slot bytes and the minimum budget from element counts: `unit_parts` holds,
    per unit, (numel, wanted element offset mod a 64-byte line) of each part (part_alignment)."""
    per_line = _ALIGN_BYTES // itemsize
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
    if mode not in ("cpu", "disk"):
        raise UserError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
    if mode == "cpu" and device.type != "cuda":
        raise UserError("--offload cpu keeps weights in host memory for a GPU; on a CPU use --offload disk")


def offload_run_dtype(stored: set, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype offloaded weights run in: the requested one, else the stored one if there is
    a single one, else float32."""
    return dtype or (next(iter(stored)) if len(stored) == 1 else torch.float32)


def plan_offload(model: nn.Module, ckpt, *, mode: str, budget: int, dtype: torch.dtype, device: torch.device) -> OffloadPlan:
    """Which weights stay resident, which are streamed, and how many slots the budget buys
    (the numbers: `slot_arithmetic`)."""
    kind, layout = offload_units(model)
    units = [Unit(key, [make_part(ckpt, name, block) for name, block in parts]) for key, parts in layout]
    streamed = {p.name for u in units for p in u.parts}
    resident_names = [n for n in model.state_dict() if n not in streamed]
    arithmetic = slot_arithmetic(
        resident_numel=sum(math.prod(ckpt.tensor_info(n).shape) for n in resident_names),
        unit_parts=[[(math.prod(p.shape), part_alignment(device=device, stored_dtype=p.stored_dtype, dtype=dtype,
                                                          byte_offset=p.byte_offset)) for p in u.parts] for u in units],
        itemsize=dtype.itemsize,
        staging=staging_bytes(device=device, mode=mode, pieces=[(p.nbytes, p.stored_dtype) for u in units for p in u.parts],
                              dtype=dtype),
    )
    for unit, offsets in zip(units, arithmetic.offsets):
        unit.offsets.extend(offsets)
    slots = arithmetic.slots(budget, kind)
    return OffloadPlan(mode, budget, resident_names, arithmetic.resident_bytes, units, kind, slots, arithmetic.slot_bytes,
                       arithmetic.minimum)


class OffloadEngine:
    """Owns the plan, the cache and the swapped-in modules of one offloaded model."""

    def __init__(self, model: nn.Module, ckpt, plan: OffloadPlan, device: torch.device, dtype: torch.dtype,
                 source: DiskSource, *, prefetch: bool = True) -> None:
        self.plan, self.device, self.dtype, self.prefetch = plan, device, dtype, prefetch
        self.source = source
        self.host: dict[tuple, Tensor] = {}
        self.layer_calls = self.hidden_calls = 0
        self._prefetch_calls = 0
        self.resident_tensor_bytes = 0  # set by load_offloaded: bytes of the weights it assigned
        self.staging_bytes = 0  # host buffers that convert stored dtypes (counted on a CPU)
        self._compute = (0.0, 0.0)  # seconds = c0 + c1 * rows for one expert
        self._staging = threading.local()
        if plan.mode == "cpu":
            self._pack_in_host_memory()
        self.cache = None
        if plan.units:
            store = CopySlots(plan.slots, plan.slot_bytes // dtype.itemsize, dtype, device, self._read_unit)
            self.cache = UnitCache(plan.slots, store)
        self._swap_modules(model)
        if plan.unit_kind == "expert" and plan.units:
            self._measure(next(m.moe.activation for m in model.modules() if isinstance(m, OffloadedMoE)))

    # -- reading --
    def _pack_in_host_memory(self) -> None:
        """--offload cpu: every unit packed once into (pinned, on CUDA) host memory."""
        pin = self.device.type == "cuda"
        for unit in self.plan.units:
            span = unit.offsets[-1] + math.prod(unit.parts[-1].shape)
            packed = torch.empty(span, dtype=self.dtype, pin_memory=pin)
            self._fill(unit, packed)
            self.host[unit.key] = packed

    def _stage(self, part: Part) -> Tensor:
        buffers = getattr(self._staging, "buffers", None)
        if buffers is None:
            buffers = self._staging.buffers = {}
        numel = part.nbytes // part.stored_dtype.itemsize
        buf = buffers.get(part.stored_dtype)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=part.stored_dtype, pin_memory=self.device.type == "cuda")
            self.staging_bytes += buf.nbytes - (0 if buffers.get(part.stored_dtype) is None else buffers[part.stored_dtype].nbytes)
            buffers[part.stored_dtype] = buf
        return buf[:numel]

    def _fill(self, unit: Unit, target: Tensor) -> None:
        """Read `unit` from disk into `target` (a host tensor of the run dtype), part by part."""
        for p, offset in zip(unit.parts, unit.offsets):
            numel = math.prod(p.shape)
            dest = target[offset : offset + numel]
            if p.stored_dtype == self.dtype and dest.device.type == "cpu":
                self.source.read_part(p, dest)
            else:
                staged = self._stage(p)
                self.source.read_part(p, staged)
                dest.copy_(staged, non_blocking=True)

    def _read_unit(self, unit: Unit, slot: Tensor) -> int:
        span = unit.offsets[-1] + math.prod(unit.parts[-1].shape)  # the unit's layout, padding included
        if self.plan.mode == "cpu":
            slot[:span].copy_(self.host[unit.key], non_blocking=True)
        elif slot.device.type == "cpu":
            self._fill(unit, slot)
        else:
            staging = self._stage(Part("", (span,), Path(), 0, span * self.dtype.itemsize, self.dtype, None))
            self._fill(unit, staging)
            slot[:span].copy_(staging, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # the staging buffer is reused next
        return unit.numel * self.dtype.itemsize

    # -- module swapping --
    def _swap_modules(self, model: nn.Module) -> None:
        by_key = {u.key: u for u in self.plan.units}
        if self.plan.unit_kind == "expert":
            previous: dict[str, OffloadedMoE] = {}
            for stack, i, ffn in model.ffn_modules():
                if (stack, i, 0) not in by_key:
                    continue
                units = [by_key[(stack, i, e)] for e in range(ffn.num_experts)]
                wrapped = OffloadedMoE(ffn, units, self)
                model.replace_ffn(stack, i, wrapped)
                if stack in previous:
                    previous[stack].link_next(wrapped)
                previous[stack] = wrapped
        else:
            previous_block: StreamedBlock | None = None
            first: StreamedBlock | None = None
            for stack, i in [u.key for u in self.plan.units]:
                blocks = getattr(model, stack).blocks
                wrapped = StreamedBlock(blocks[i], by_key[(stack, i)], self)
                blocks[i] = wrapped
                if previous_block is not None:
                    previous_block.link_next(wrapped)
                first = first or wrapped
                previous_block = wrapped
            if previous_block is not None and first is not previous_block:
                previous_block.link_next(first)  # the next token starts over

    def expert_views(self, views: list[Tensor]) -> tuple[Tensor, Tensor | None, Tensor]:
        if len(views) == 3:
            return views[0], views[1], views[2]
        return views[0], None, views[1]

    # -- timing model for the order --
    def _measure(self, activation: str) -> None:
        """Time one expert load and its compute on 1 and 16 rows (start-up, before generating)."""
        unit = self.plan.units[0]
        self.cache.request(unit)
        views = self.cache.acquire(unit)
        w_in, w_gate, w_out = self.expert_views(views)
        times = []
        with torch.no_grad():
            for rows in (1, 16):
                x = torch.zeros(rows, w_in.shape[1], dtype=self.dtype, device=self.device)
                expert_output(x, w_in, w_gate, w_out, None, None, activation)
                self._sync()
                start = time.perf_counter()
                for _ in range(3):
                    expert_output(x, w_in, w_gate, w_out, None, None, activation)
                self._sync()
                times.append((time.perf_counter() - start) / 3)
        self.cache.release(unit)
        slope = max(0.0, (times[1] - times[0]) / 15)
        self._compute = (max(0.0, times[0] - slope), slope)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def should_prefetch(self) -> bool:
        """Prefetch while at least 3 in 4 prefetched units are used before they are evicted (judged
        once 64 have been decided); below that, only every 16th call, to keep measuring. When
        loading is the bottleneck a wrong guess costs a load and evicts a unit that would have
        been a hit, so a guess must be right well over half the time to pay."""
        if not self.prefetch:
            return False
        self._prefetch_calls += 1
        precision = self.cache.prefetch_precision()
        decided = self.cache.prefetch_useful + self.cache.prefetch_wasted
        if decided < 64 or precision >= 0.75:
            return True
        return self._prefetch_calls % 16 == 0

    def compute_seconds(self, rows: int) -> float:
        return self._compute[0] + self._compute[1] * rows

    def load_seconds(self) -> float:
        return self.cache.mean_load_seconds() if self.cache is not None else 0.0

    # -- reporting --
    def stats(self) -> dict:
        plan, cache = self.plan, self.cache
        requests = (cache.hits + cache.misses) if cache else 0
        # Measured, not planned: the tensors assigned, the slot buffer and any staging buffer.
        weights_bytes = self.resident_tensor_bytes + (cache.store.nbytes if cache else 0)
        if self.device.type == "cpu":
            weights_bytes += self.staging_bytes
        return {
            "mode": plan.mode,
            "budget_bytes": plan.budget,
            "minimum_bytes": plan.minimum,
            "resident_bytes": plan.resident_bytes,
            "unit": plan.unit_kind,
            "units": len(plan.units),
            "slots": plan.slots,
            "slot_bytes": plan.slot_bytes,
            "weights_peak_bytes": weights_bytes,
            "bytes_moved": cache.bytes_moved if cache else 0,
            "loads": cache.loads if cache else 0,
            "prefetches": cache.prefetches if cache else 0,
            "prefetch_precision": None if not cache or cache.prefetch_precision() is None else round(cache.prefetch_precision(), 4),
            "hits": cache.hits if cache else 0,
            "misses": cache.misses if cache else 0,
            "hit_rate": round(cache.hits / requests, 4) if requests else None,
            "load_ms_per_unit": round(1e3 * self.load_seconds(), 3),
            "layers_with_hidden_loads": round(self.hidden_calls / self.layer_calls, 4) if self.layer_calls else None,
            "checksums": "crc32" if any(p.expected_crc for u in plan.units for p in u.parts) else "not recorded",
        }

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.source.close()


def _resident_copy(part: Part, source: DiskSource, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A resident weight read into memory of its own with pread (checked against its CRC-32s),
    never a view of the memory map: a file truncated under a map kills the process (SIGBUS), and
    pages read through the map would sit in the process twice. On a CPU in the stored dtype the
    copy keeps the address alignment the plain loader's zero-copy view has, so both compute bit
    for bit the same (see plan_offload)."""
    itemsize = part.stored_dtype.itemsize
    numel = part.nbytes // itemsize
    shift = (part.byte_offset % _ALIGN_BYTES) // itemsize if part.byte_offset % itemsize == 0 else 0
    storage = torch.empty(numel + shift, dtype=part.stored_dtype)
    raw = storage[shift:]
    source.read_part(part, raw)
    if device.type == "cpu" and part.stored_dtype == dtype:
        return raw.view(part.shape)
    return raw.view(part.shape).to(device=device, dtype=dtype)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def load_offloaded(path, *, mode: str, budget: str, device: torch.device, dtype: torch.dtype | None,
                   prefetch: bool = True) -> tuple[nn.Module, object, OffloadEngine]:
    """The checkpoint's model with resident weights assigned and the rest behind an engine."""
    from cpmctl.checkpoint import check_state_dict_matches, open_checkpoint
    from cpmctl.model import build_model

    check_offload_device(mode, device)
    ckpt = open_checkpoint(path)
    source = DiskSource()
    try:
        model = build_model(ckpt.config, device="meta")
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        check_state_dict_matches(expected, ckpt.shapes())
        stored = {ckpt.tensor_info(n).dtype for n in expected}
        run_dtype = offload_run_dtype(stored, dtype)
        weight_bytes = sum(math.prod(s) for s in expected.values()) * run_dtype.itemsize
        plan = plan_offload(model, ckpt, mode=mode, budget=parse_size(budget, total=weight_bytes), dtype=run_dtype,
                            device=device)
        state = {name: _resident_copy(make_part(ckpt, name, None), source, device, run_dtype) for name in plan.resident_names}
        streamed = {p.name for u in plan.units for p in u.parts}
        if set(expected) - set(state) != streamed:
            raise RuntimeError("offload plan does not cover the model's weights")  # a bug, not the user's
        model.load_state_dict(state, assign=True, strict=False)
        engine = OffloadEngine(model, ckpt, plan, device, run_dtype, source, prefetch=prefetch)
        engine.resident_tensor_bytes = sum(t.nbytes for t in state.values())
    except BaseException:
        source.close()
        ckpt.close()
        raise
    return model.eval(), ckpt, engine
