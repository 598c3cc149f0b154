"""Section `environment`: the device, the software, and the ceilings the other sections' figures
are read against: device-memory copy bandwidth, pinned host-to-device bandwidth, bf16 matmul rate.

GPU sizes: a 2 GiB copy, 1 GiB host-to-device, an 8192^3 matmul (well under a second each).
Rehearsal: 64 MiB, 64 MiB and 256^3 on the CPU.
"""

from __future__ import annotations

import os
import platform

import torch

from cpmctl.gpu_check.measure import copy_bandwidth_gbps, host_to_device_gbps, matmul_tflops
from cpmctl.gpu_check.record import Section

GPU = dict(copy_bytes=2 << 30, h2d_bytes=1 << 30, matmul_n=8192)
REHEARSAL = dict(copy_bytes=64 << 20, h2d_bytes=64 << 20, matmul_n=256)


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1), "cuda": torch.version.cuda}
    return {"name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def run(section: Section) -> None:
    import triton

    device = torch.device(section.device)
    sizes = REHEARSAL if section.rehearsal else GPU
    info = describe_device(device)
    section.device = info["name"] if device.type == "cuda" else f"cpu ({info['name']})"
    section.row("device", **info, torch=torch.__version__, triton=triton.__version__,
                triton_interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1")
    copy = copy_bandwidth_gbps(device, sizes["copy_bytes"])
    section.figure("device-memory copy bandwidth (read + written)", round(copy, 1), "GB/s")
    h2d, what = host_to_device_gbps(device, sizes["h2d_bytes"])
    section.figure(f"host-to-device bandwidth ({what})", round(h2d, 2), "GB/s")
    n = sizes["matmul_n"]
    section.figure(f"bf16 matmul {n}x{n}x{n}", round(matmul_tflops(device, n), 3), "TFLOP/s")
