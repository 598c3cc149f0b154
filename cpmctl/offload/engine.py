"""The offload engine: modules swapped into the model that compute with weights from the cache
(`OffloadedMoE`, `StreamedBlock`), the InfMoE compute order, and `load_offloaded`."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from cpmctl.checkpoint import check_state_dict_matches, open_checkpoint
from cpmctl.model import build_model
from cpmctl.moe import expert_jobs, expert_output, fill_for_skipped
from cpmctl.offload.cache import CopySlots, UnitCache
from cpmctl.offload.placement import (ComputeCosts, ExpertShape, check_expert_compute, choose_route, host_pinned,
                                      measure_host_flops)
from cpmctl.offload.plan import OffloadPlan, check_offload_device, offload_run_dtype, plan_offload, run_weight_bytes, stored_tensors
from cpmctl.cpu_int4 import prepacked_units
from cpmctl.offload.reader import DiskSource, Part, Unit, make_part, resident_copy
from cpmctl.quant import QuantizedView, cpu_int4_pack



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


class OffloadedMoE(nn.Module):
    """A routed MoE FFN whose experts live in the `UnitCache`; the router, biases and fill stay
    resident on `moe` (whose expert weights are left on the meta device)."""

    def __init__(self, moe: nn.Module, units: list[Unit], engine: "OffloadEngine") -> None:
        super().__init__()
        self.moe = moe
        self.units = units
        self.engine = engine
        self.next_layer: OffloadedMoE | None = None
        self.position = 0  # this layer's place among the offloaded MoE layers (the per-layer host pin)

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
        # Fiddler: a missing expert may compute on the host, from its host copy, instead of moving in.
        on_host = [e for e in missing if engine.route(self.position, job_of[e].end - job_of[e].start) == "host"]
        for e in on_host:
            del missing[e]
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
        for e in on_host:  # outputs land in fixed rows: computing these first changes no bit
            job = job_of[e]
            w_in, w_gate, w_out = engine.expert_views(engine.host_views(self.units[e]))
            expert_output(job.rows, w_in, w_gate, w_out, None if b_in is None else b_in[e],
                          None if b_gate is None else b_gate[e], moe.activation, job.weights, out=out[job.start : job.end])
            engine.host_computed += 1
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
        return moe.add_shared(flat, out).view(shape)

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


class OffloadEngine:
    """Owns the plan, the cache and the swapped-in modules of one offloaded model."""

    def __init__(self, model: nn.Module, plan: OffloadPlan, units: list[Unit], device: torch.device, dtype: torch.dtype,
                 source: DiskSource, *, prefetch: bool = True, expert_compute: str = "device", host_layers: int = 0,
                 costs: ComputeCosts | None = None) -> None:
        self.plan, self.units, self.device, self.dtype, self.prefetch = plan, units, device, dtype, prefetch
        check_expert_compute(expert_compute, host_copy=plan.mode == "cpu", host_layers=host_layers)
        host_pinned(0, host_layers)  # checks the count
        self.expert_compute, self.host_layers, self.costs = expert_compute, host_layers, costs
        self.host_computed = 0
        self.expert_shape: ExpertShape | None = None
        self.source = source
        self.host: dict[tuple, Tensor] = {}
        self.layer_calls = self.hidden_calls = 0
        self._prefetch_calls = 0
        self.resident_tensor_bytes = 0  # set by load_offloaded: bytes of the weights it assigned
        self.staging_bytes = 0  # host buffers that convert stored dtypes (counted on a CPU)
        self._compute = (0.0, 0.0)  # seconds = c0 + c1 * rows for one expert
        self._staging = threading.local()
        # Quantized experts stay in their stored bytes, in byte slots (plan.raw).
        self.slot_dtype = torch.uint8 if plan.raw else dtype
        self.quant = next(((m.w_in.scheme, m.w_in.group_size) for m in model.modules() if getattr(m, "quantized", False)), None)
        # On a CPU, int4 experts are repacked into the fused kernel's layout (same size) as they are
        # read, once per load, instead of on every call that uses them.
        self.cpu_int4_layout = plan.raw and self.quant is not None and self.quant[0] == "int4" and device.type == "cpu"
        if plan.mode == "cpu":
            self._pack_in_host_memory()
        self.cache = None
        if units:
            store = CopySlots(plan.slots, plan.arithmetic.slot_bytes // self.slot_dtype.itemsize, self.slot_dtype, device,
                              self._read_unit, raw=plan.raw)
            self.cache = UnitCache(plan.slots, store)
        self._swap_modules(model)
        if plan.unit_kind == "expert" and units:
            first = next(m for m in model.modules() if isinstance(m, OffloadedMoE))
            self._measure(first.moe.activation)
            self.expert_shape = ExpertShape(model.config.d_model, first.moe.expert_size, first.moe.w_gate is not None,
                                            sum(p.nbytes for p in units[0].parts), dtype.itemsize)
            if self.costs is None and expert_compute == "auto":
                self.costs = self._measured_costs()

    # -- reading --
    def _pack_in_host_memory(self) -> None:
        """--offload cpu: every unit packed once into (pinned, on CUDA) host memory."""
        pin = self.device.type == "cuda"
        for unit in self.units:
            packed = torch.empty(self._span(unit), dtype=self.slot_dtype, pin_memory=pin)
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

    def _span(self, unit: Unit) -> int:
        """Elements of the slot dtype from the start of `unit`'s layout to its end (padding included)."""
        last = unit.parts[-1]
        return unit.offsets[-1] + (last.nbytes if self.plan.raw else math.prod(last.shape))

    def _fill(self, unit: Unit, target: Tensor) -> None:
        """Read `unit` from disk into `target` (a host tensor of the slot dtype), part by part."""
        if self.plan.raw:
            for p, offset in zip(unit.parts, unit.offsets):
                piece = target[offset : offset + p.nbytes]
                self.source.read_part(p, piece)  # checked against its CRC-32 as stored
                if self.cpu_int4_layout and p.name.endswith(".qweight"):  # not when read prepacked (cpmctl.cpu_int4)
                    values = piece.view(p.shape)
                    values.copy_(cpu_int4_pack(QuantizedView("int4", self.quant[1], values, values, values)))
            return
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
        span = self._span(unit)
        if self.plan.mode == "cpu":
            slot[:span].copy_(self.host[unit.key], non_blocking=True)
        elif slot.device.type == "cpu":
            self._fill(unit, slot)
        else:
            staging = self._stage(Part("", (span,), Path(), 0, span * self.slot_dtype.itemsize, self.slot_dtype, None))
            self._fill(unit, staging)
            slot[:span].copy_(staging, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # the staging buffer is reused next
        if self.plan.raw:
            return sum(p.nbytes for p in unit.parts)
        return unit.numel * self.dtype.itemsize

    # -- module swapping --
    def _swap_modules(self, model: nn.Module) -> None:
        by_key = {u.key: u for u in self.units}
        if self.plan.unit_kind == "expert":
            previous: dict[str, OffloadedMoE] = {}
            for stack, i, ffn in model.ffn_modules():
                if (stack, i, 0) not in by_key:
                    continue
                units = [by_key[(stack, i, e)] for e in range(ffn.num_experts)]
                wrapped = OffloadedMoE(ffn, units, self)
                wrapped.position = sum(1 for m in model.modules() if isinstance(m, OffloadedMoE))
                model.replace_ffn(stack, i, wrapped)
                if stack in previous:
                    previous[stack].link_next(wrapped)
                previous[stack] = wrapped
        else:
            previous_block: StreamedBlock | None = None
            first: StreamedBlock | None = None
            for stack, i in [u.key for u in self.units]:
                blocks = getattr(model, stack).blocks
                wrapped = StreamedBlock(blocks[i], by_key[(stack, i)], self)
                blocks[i] = wrapped
                if previous_block is not None:
                    previous_block.link_next(wrapped)
                first = first or wrapped
                previous_block = wrapped
            if previous_block is not None and first is not previous_block:
                previous_block.link_next(first)  # the next token starts over

    def expert_views(self, views: list[Tensor]) -> tuple:
        if self.quant is not None:  # (qweight, scales[, zeros]) per weight, in w_in, w_gate, w_out order
            scheme, group = self.quant
            per = 3 if scheme == "int4" else 2
            # cpu_int4_layout: the slot's qweight already holds the CPU kernel's layout (see _fill)
            weights = [QuantizedView(scheme, group, v[0], v[1], v[2] if per == 3 else None,
                                     v[0] if self.cpu_int4_layout else None)
                       for v in (views[i : i + per] for i in range(0, len(views), per))]
            return (weights[0], weights[1], weights[2]) if len(weights) == 3 else (weights[0], None, weights[1])
        if len(views) == 3:
            return views[0], views[1], views[2]
        return views[0], None, views[1]

    # -- timing model for the order --
    def _measure(self, activation: str) -> None:
        """Time one expert load and its compute on 1 and 16 rows (start-up, before generating)."""
        unit = self.units[0]
        self.cache.request(unit)
        views = self.cache.acquire(unit)
        w_in, w_gate, w_out = self.expert_views(views)
        times = []
        with torch.no_grad():
            for rows in (1, 16):
                width = w_in.in_features if isinstance(w_in, QuantizedView) else w_in.shape[1]
                x = torch.zeros(rows, width, dtype=self.dtype, device=self.device)
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

    def _measured_costs(self) -> ComputeCosts:
        """Host GEMM rate, device rate (the expert compute slope measured above, on the device)
        and host-to-device bandwidth (the first load's bytes over its time)."""
        shape, rows = self.expert_shape, 16
        device_seconds = max(self.compute_seconds(rows), 1e-9)
        bandwidth = self.cache.bytes_moved / max(self.cache.load_seconds, 1e-9)
        return ComputeCosts(host_flops=measure_host_flops(shape.d_model, shape.expert_size),
                            device_flops=rows * shape.flops_per_row / device_seconds, h2d_bytes=bandwidth)

    def route(self, position: int, rows: int) -> str:
        """"device" or "host" for a missing expert of the MoE layer at `position` needed by `rows` tokens."""
        if self.expert_compute == "device" and not self.host_layers:
            return "device"
        return choose_route(self.expert_compute, rows, self.expert_shape, self.costs, cached=False,
                            pinned=host_pinned(position, self.host_layers))

    def host_views(self, unit: Unit) -> list[Tensor]:
        """Views of `unit`'s parts in its host copy (laid out as in a slot, so computing from it
        gives the same bits as computing from a slot)."""
        packed = self.host[unit.key]
        if self.plan.raw:
            return [packed[o : o + p.nbytes].view(p.stored_dtype).view(p.shape) for p, o in zip(unit.parts, unit.offsets)]
        return [packed[o : o + math.prod(p.shape)].view(p.shape) for p, o in zip(unit.parts, unit.offsets)]

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
            "minimum_bytes": plan.arithmetic.minimum,
            "resident_bytes": plan.arithmetic.resident_bytes,
            "unit": plan.unit_kind,
            "units": len(plan.units),
            "slots": plan.slots,
            "slot_bytes": plan.arithmetic.slot_bytes,
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
            "expert_compute": self.expert_compute,
            "host_layers": self.host_layers,
            "experts_computed_on_host": self.host_computed,
            "checksums": "crc32" if any(p.expected_crc for u in self.units for p in u.parts) else "not recorded",
        }

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.source.close()


def bind_units(plan: OffloadPlan, ckpt) -> list[Unit]:
    """The plan's units as pieces of the checkpoint's files, laid out in their slots."""
    return [Unit(key, [make_part(ckpt, name, block) for name, block in parts], list(offsets))
            for (key, parts), offsets in zip(plan.units, plan.arithmetic.offsets)]


def checkpoint_weight_bytes(path, dtype: torch.dtype | None = None) -> int:
    """Bytes of a checkpoint's weights in the dtype an offloaded run of it uses: what a budget
    given as a percentage is a percentage of."""
    with open_checkpoint(path) as ckpt:
        tensors = stored_tensors(ckpt, ckpt.shapes())
    return run_weight_bytes(tensors, offload_run_dtype({t.dtype for t in tensors.values()}, dtype))


def load_offloaded(path, *, mode: str, budget: int, device: torch.device, dtype: torch.dtype | None,
                   prefetch: bool = True, expert_compute: str = "device", host_layers: int = 0,
                   costs: ComputeCosts | None = None) -> tuple[nn.Module, object, OffloadEngine]:
    """The checkpoint's model with resident weights assigned and the rest behind an engine that
    keeps within `budget` bytes; `mode` is "cpu" (pinned host memory, for a GPU) or "disk".
    `expert_compute` (device, host or auto, with measured or given `costs`) and `host_layers`
    (the first N MoE layers' experts computed on the host) choose where missing experts compute;
    host compute needs the host copy that mode "cpu" keeps (on a CPU the host stands in for both
    sides: the device route copies into a slot, the host route computes from the host copy)."""
    check_expert_compute(expert_compute, host_copy=mode == "cpu", host_layers=host_layers)
    if expert_compute == "device" and not host_layers:
        check_offload_device(mode, device)
    ckpt = open_checkpoint(path)
    source = DiskSource()
    try:
        model = build_model(ckpt.config, device="meta")
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        check_state_dict_matches(expected, ckpt.shapes())
        tensors = stored_tensors(ckpt, expected)
        run_dtype = offload_run_dtype({t.dtype for t in tensors.values()}, dtype)
        plan = plan_offload(model, tensors, mode=mode, budget=budget, dtype=run_dtype, device=device)
        units = bind_units(plan, ckpt)
        state = {name: resident_copy(make_part(ckpt, name, None), source, device, run_dtype) for name in plan.resident_names}
        streamed = {p.name for u in units for p in u.parts}
        if set(expected) - set(state) != streamed:
            raise RuntimeError("offload plan does not cover the model's weights")  # a bug, not the user's
        model.load_state_dict(state, assign=True, strict=False)
        quant = ckpt.config.quantization
        if plan.raw and device.type == "cpu" and quant is not None and quant.scheme == "int4":
            units = prepacked_units(path, ckpt, units, quant.group_size, source)  # a miss reads, no repack
        engine = OffloadEngine(model, plan, units, device, run_dtype, source, prefetch=prefetch, expert_compute=expert_compute,
                               host_layers=host_layers, costs=costs)
        engine.resident_tensor_bytes = sum(t.nbytes for t in state.values())
    except BaseException:
        source.close()
        ckpt.close()
        raise
    return model.eval(), ckpt, engine
