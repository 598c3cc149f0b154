"""The device cache of offloaded units: K equal slots filled by one loader thread, evicted
least-frequently-used first."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from cpmctl.offload.reader import OffloadError, Unit


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
                 read_unit: Callable[[Unit, Tensor], int], *, raw: bool = False) -> None:
        self.device, self.raw = device, raw  # raw: a byte buffer holding each part as stored
        self.buffer = torch.empty(slots, slot_numel, dtype=dtype, device=device)
        self.nbytes = self.buffer.nbytes
        self._read_unit = read_unit

    def fill(self, unit: Unit, slot: int) -> int:
        return self._read_unit(unit, self.buffer[slot])

    def views(self, unit: Unit, slot: int) -> list[Tensor]:
        row = self.buffer[slot]
        if self.raw:
            return [row[o : o + p.nbytes].view(p.stored_dtype).view(p.shape) for p, o in zip(unit.parts, unit.offsets)]
        return [row[o : o + math.prod(p.shape)].view(p.shape) for p, o in zip(unit.parts, unit.offsets)]
