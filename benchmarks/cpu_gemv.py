"""Decode-sized linear layers on the CPU: weight bytes streamed per second, cpmctl's C++ GEMV
(kernels/cpmctl_cpu/gemv.cpp) against torch's kernels and a plain memory-read bound.

    python benchmarks/cpu_gemv.py [--threads 1,2] [--rows 1] [--megabytes 256]

For each shape [out, in] it makes enough distinct weights to fill `--megabytes` of fp32 (more than
the caches hold, as a model's layers do) and multiplies one activation row by each in turn, so every
weight comes from DRAM; the figure is weight bytes read / time, beside the read bound (the sum of a
tensor of the same size). Run under the timing lock (`flock /work/notes/timing.lock ...`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cpmctl_cpu import gemv  # noqa: E402

SHAPES = ((2048, 768), (768, 2048), (8000, 768))


def timed(fn, reps: int) -> tuple[float, float]:
    """Best wall-clock and best process CPU seconds of `reps` calls (the CPU time is the figure that
    a loaded machine disturbs least: it counts only the cycles this process ran)."""
    fn()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gemv.ops()
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} torch {torch.__version__} "
          f"load {os.getloadavg()[0]:.2f} rows {args.rows}")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for out_f, in_f in SHAPES:
            count = max(2, args.megabytes * 2**20 // (4 * out_f * in_f))
            w32 = [torch.randn(out_f, in_f) for _ in range(count)]
            w16 = [w.bfloat16() for w in w32]
            q8 = [torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8) for _ in range(count)]
            s8 = [torch.rand(out_f, 1).bfloat16() for _ in range(count)]
            q4 = [torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8) for _ in range(count)]
            sz4 = [torch.rand(out_f, in_f // 64).bfloat16() for _ in range(count)]
            q4_packed = [torch._convert_weight_to_int4pack_for_cpu(torch.stack((q & 15, q >> 4), -1).flatten(-2).int(), 1)
                         for q in q4]
            sz4_torch = [torch.stack((s, s), -1).transpose(0, 1).contiguous() for s in sz4]
            x = torch.randn(args.rows, in_f)
            xb = x.bfloat16()
            big32 = torch.cat([w.view(-1) for w in w32])
            cases = {
                "read bound (fp32 sum)": (4, lambda: big32.sum()),
                "fp32 F.linear": (4, lambda: [F.linear(x, w) for w in w32]),
                "bf16 F.linear (bf16 x)": (2, lambda: [F.linear(xb, w) for w in w16]),
                "bf16 cpmctl": (2, lambda: [gemv.bf16_linear(x, w) for w in w16]),
                "int8 torch _weight_int8pack_mm (bf16 x)": (1, lambda: [torch._weight_int8pack_mm(xb, q, s.view(-1)) for q, s in zip(q8, s8)]),
                "int8 cpmctl": (1, lambda: [gemv.int8_linear(x, q, s) for q, s in zip(q8, s8)]),
                "int4 torch _weight_int4pack_mm_for_cpu (bf16 x)": (0.5, lambda: [torch._weight_int4pack_mm_for_cpu(xb, p, 64, sz) for p, sz in zip(q4_packed, sz4_torch)]),
                "int4 cpmctl (g64)": (0.5, lambda: [gemv.int4_linear(x, q, s, s, 64) for q, s in zip(q4, sz4)]),
            }
            for name, (bytes_per, fn) in cases.items():
                seconds, cpu = timed(fn, args.reps)
                nbytes = bytes_per * out_f * in_f * count
                per = seconds / count * 1e6
                print(f"threads {threads} [{out_f:5d}, {in_f:5d}] x{count:3d}  {name:48s} {nbytes / seconds / 1e9:6.1f} GB/s "
                      f"({nbytes / cpu / 1e9:6.1f} per CPU second)  {per:8.1f} us/matrix", flush=True)
            del w32, w16, q8, q4, q4_packed, big32


if __name__ == "__main__":
    main()
