"""Which CPU matmul runs a weight-only quantized expert fastest (the choice cpmctl.quant made).

    .venv/bin/python benchmarks/quant_matmul.py [--d 1024] [--de 1024] [--threads 1] [--json]

torchao 0.18's own CPU kernels are not among the variants: its C++ extension does not load on this
machine, and its CPU int4 layout calls the same torch op (`_weight_int4pack_mm_for_cpu`).

For a [rows, d] x [d, d_e]^T product at 1 and 8 rows: the fp32 and bf16 dense matmuls, torch's fused
`_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (group 64) with fp32 and with bf16
activations, and dequantize-then-matmul. Interleaved rounds, median per variant, ratios against
the fp32 dense matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--de", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    from cpmctl.quant import QuantizedView, cpu_int4_pack, dequantize
    from cpmctl.quantize import quantize_stack

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.de, args.d) * 0.02
    q8 = quantize_stack(w, "int8", None, transposed=False)
    q4 = quantize_stack(w, "int4", 64, transposed=False)
    v8 = QuantizedView("int8", None, q8["qweight"], q8["scales"], None)
    v4 = QuantizedView("int4", 64, q4["qweight"], q4["scales"], q4["zeros"])
    packed = cpu_int4_pack(v4)
    results = {}
    for rows in (1, 8):
        x = torch.randn(rows, args.d)
        wb, xb16 = w.to(torch.bfloat16), x.to(torch.bfloat16)
        variants = {"fp32 dense": lambda: x @ w.T, "bf16 dense": lambda: xb16 @ wb.T}
        for act in (torch.float32, torch.bfloat16):
            name = "fp32" if act == torch.float32 else "bf16"
            xa = x.to(act)
            s8 = v8.scales.reshape(-1).to(act)
            sz = torch.stack((v4.scales, v4.zeros), -1).transpose(0, 1).contiguous().to(act)
            variants[f"int8pack {name} act"] = lambda xa=xa, s8=s8: torch._weight_int8pack_mm(xa, v8.qweight, s8)
            variants[f"int4pack {name} act"] = lambda xa=xa, sz=sz: torch._weight_int4pack_mm_for_cpu(xa, packed, 64, sz)
        variants["int8 dequantize+matmul"] = lambda: x @ dequantize(v8).T
        variants["int4 dequantize+matmul"] = lambda: x @ dequantize(v4).T
        times = {k: [] for k in variants}
        for f in variants.values():
            f()
        for _ in range(args.rounds):
            for k, f in variants.items():
                start = time.perf_counter()
                for _ in range(5):
                    f()
                times[k].append((time.perf_counter() - start) / 5)
        base = statistics.median(times["fp32 dense"])
        results[f"rows{rows}"] = {k: {"us": round(1e6 * statistics.median(v), 1), "vs_fp32_dense": round(base / statistics.median(v), 3)}
                                  for k, v in times.items()}
    record = {"benchmark": "quant_matmul", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_model(),
              "threads": args.threads, "shape": [args.de, args.d], "result": results}
    print(json.dumps(record, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
