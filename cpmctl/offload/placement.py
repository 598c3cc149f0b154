"""Where an offloaded expert computes: on the device after copying its weights in, or on the host
where its weights live (Fiddler's choice, llama.cpp's --cpu-moe / --n-cpu-moe), per expert per step.

The cost model (Fiddler, see ../shared/REFERENCES.md), for an expert needed by `rows` tokens:
    device = (0 if its weights are already in a device slot else expert_bytes / h2d_bandwidth)
             + rows * flops_per_row / device_flops
    host   = rows * flops_per_row / host_flops + 2 * rows * activation_bytes / h2d_bandwidth
(the host route sends the rows' activations over and their outputs back). The rates are measured
at start-up (`measure_host_flops`; the bandwidth is the cache's measured load time per byte) or,
in tests, injected. A per-layer pin puts every expert of the first `host_layers` MoE layers on the
host whatever the model says (llama.cpp's --n-cpu-moe N: the user's one knob for filling VRAM).

Pure functions: the engine asks `choose_route` for each missing expert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cpmctl.errors import UserError

EXPERT_COMPUTE = ("device", "host", "auto")


@dataclass(frozen=True)
class ComputeCosts:
    host_flops: float       # measured host GEMM rate, FLOP/s
    device_flops: float     # device GEMM rate, FLOP/s
    h2d_bytes: float        # host-to-device bandwidth, bytes/s

    def __post_init__(self) -> None:
        if min(self.host_flops, self.device_flops, self.h2d_bytes) <= 0:
            raise ValueError(f"costs must be positive rates, got {self}")


@dataclass(frozen=True)
class ExpertShape:
    d_model: int
    expert_size: int
    gated: bool
    weight_bytes: int       # bytes of one expert as it moves (quantized: stored bytes)
    activation_itemsize: int = 4

    @property
    def flops_per_row(self) -> int:
        return 2 * self.d_model * self.expert_size * (3 if self.gated else 2)

    @property
    def activation_bytes(self) -> int:
        return self.d_model * self.activation_itemsize


def device_seconds(rows: int, shape: ExpertShape, costs: ComputeCosts, *, cached: bool) -> float:
    copy = 0.0 if cached else shape.weight_bytes / costs.h2d_bytes
    return copy + rows * shape.flops_per_row / costs.device_flops


def host_seconds(rows: int, shape: ExpertShape, costs: ComputeCosts) -> float:
    return rows * shape.flops_per_row / costs.host_flops + 2 * rows * shape.activation_bytes / costs.h2d_bytes


def check_expert_compute(mode: str, *, host_copy: bool, host_layers: int = 0) -> None:
    """UserError for an unknown mode, or for host compute (the mode, or layers pinned to the host)
    with no host copy of the experts (offloading to disk keeps none: the weights only pass
    through a staging buffer)."""
    if mode not in EXPERT_COMPUTE:
        raise UserError(f"unknown expert compute {mode!r}; expected one of {', '.join(EXPERT_COMPUTE)}", option="expert_compute")
    if (mode in ("host", "auto") or host_layers > 0) and not host_copy:
        what = mode if mode != "device" else f"the first {host_layers} MoE layers"
        raise UserError(f"computing experts on the host ({what}) needs a host copy of them; offload to host memory (cpu) "
                        "instead of disk, or compute on the device", option="expert_compute")


def host_pinned(layer_position: int, host_layers: int) -> bool:
    """llama.cpp's --n-cpu-moe N: the experts of the first N MoE layers stay on the host."""
    if host_layers < 0:
        raise UserError(f"the number of MoE layers kept on the host must be >= 0, got {host_layers}", option="host_layers")
    return layer_position < host_layers


def choose_route(mode: str, rows: int, shape: ExpertShape, costs: ComputeCosts | None, *, cached: bool,
                 pinned: bool = False) -> str:
    """"device" or "host" for one expert needed by `rows` tokens this step. "host" computes every
    expert on the host; a pinned layer's experts compute on the host unless already in a device
    slot (nothing to move); "device" copies the rest in; "auto" takes the cheaper route by the
    cost model."""
    if mode == "host":
        return "host"
    if pinned:  # the layer's experts live on the host; one already in a slot has nothing to move
        return "device" if cached else "host"
    if mode == "device" or cached:
        return "device"
    if costs is None:
        raise ValueError("auto placement needs measured costs")
    return "host" if host_seconds(rows, shape, costs) < device_seconds(rows, shape, costs, cached=False) else "device"


def crossover_rows(shape: ExpertShape, costs: ComputeCosts) -> float:
    """Rows at which copying the expert in costs as much as computing it on the host (below: host)."""
    per_row_host = shape.flops_per_row / costs.host_flops + 2 * shape.activation_bytes / costs.h2d_bytes
    per_row_device = shape.flops_per_row / costs.device_flops
    gain = per_row_host - per_row_device
    return float("inf") if gain <= 0 else (shape.weight_bytes / costs.h2d_bytes) / gain


def measure_host_flops(d_model: int, expert_size: int, *, rows: int = 8, repeats: int = 5) -> float:
    """The host's GEMM rate (FLOP/s) on one expert-sized product of `rows` rows, best of `repeats`."""
    x = torch.randn(rows, d_model)
    w = torch.randn(expert_size, d_model)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * d_model * expert_size / max(best, 1e-9)
