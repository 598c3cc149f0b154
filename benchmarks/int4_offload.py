"""int4 offload on a CPU: what a cache miss costs with the stored CPU layout against repacking on read.

    .venv/bin/python benchmarks/int4_offload.py [--work runs/bench-int4-offload] [--new-tokens 24] [--json]

A random MoE with the trained MoE's shape (benchmarks/trained_moe.py: 4 layers, d 128, 16
experts of 512 neurons, top-2, SwiGLU) is saved, quantized to int4 group 64 (`cpmctl quantize`,
which also stores the CPU kernel's layout, cpmctl.cpu_int4) and copied without that sidecar (what
every int4 checkpoint was before: each miss repacks the expert as it is read). Decode tokens/s
(greedy, random prompts of 16 tokens) at batch 1 and 8, one run each in one process, for:
  resident fp32 / resident int4, and offloaded to disk with slots for 25% of the experts:
  fp32, int4 repacking on read, int4 reading the stored layout;
and accelerate's disk offload of the fp32 model with the same bytes of memory (the competitor,
`cpmctl.gpu_check.offload_bench.accelerate_device_map`), with the engine's mean load time per miss (read + checksum on first read + repack) and the
ratios against resident fp32 of the same batch. I/O bound: every offloaded run starts with the
checkpoint's files evicted from the page cache (os.posix_fadvise POSIX_FADV_DONTNEED); the bound
is the measured cold read bandwidth of the same files (read in expert-sized preads after the same
eviction) divided by the expert bytes read per generated token, and the fraction is the run's
tokens/s over that bound. Random routers have no locality, so hit rates
are low: this measures the miss path, not the cache policy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

SHAPE = dict(arch="decoder", vocab_size=4000, d_model=128, n_heads=4, n_kv_heads=4, d_ff=512, n_layers=4,
             position="rotary", activation="silu", gated=True, eos_token_id=None, max_positions=256,
             moe=dict(experts=16, expert_size=512, top_k=2))


def make_checkpoints(work: Path) -> dict[str, Path]:
    import torch

    from cpmctl.checkpoint import save_model
    from cpmctl.config import ModelConfig
    from cpmctl.cpu_int4 import LAYOUT_FILE, MANIFEST_FILE
    from cpmctl.model import build_model
    from cpmctl.quantize import quantize_checkpoint

    paths = {"fp32": work / "fp32", "int4 stored layout": work / "int4", "int4 repack on read": work / "int4-repack"}
    if all(p.exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    save_model(build_model(ModelConfig(**SHAPE)), paths["fp32"], overwrite=True)
    quantize_checkpoint(paths["fp32"], paths["int4 stored layout"], experts="int4", group_size=64, overwrite=True)
    shutil.rmtree(paths["int4 repack on read"], ignore_errors=True)
    shutil.copytree(paths["int4 stored layout"], paths["int4 repack on read"],
                    ignore=shutil.ignore_patterns(LAYOUT_FILE, MANIFEST_FILE))
    return paths


def evict(path: Path, pattern: str = "*.safetensors") -> None:
    """Drop the checkpoint's files from the page cache (the next read comes from the disk). Pages
    still memory-mapped (a resident model not yet collected) cannot be dropped: collect first."""
    gc.collect()
    for f in path.glob(pattern):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read_bandwidth(path: Path, chunk: int) -> float:
    """Bytes/s reading every weights file of `path` once, in `chunk`-byte preads, after eviction."""
    evict(path)
    total, start = 0, time.perf_counter()
    buf = bytearray(chunk)
    for f in sorted(path.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            offset = 0
            while (got := os.preadv(fd, [buf], offset)) > 0:
                offset += got
            total += offset
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start)


def decode(model, prompts, new_tokens: int, on_start=lambda: None) -> float:
    import torch

    from cpmctl.generate import generate

    with torch.no_grad():
        generate(model, prompts, max_new_tokens=2)  # warm-up
        on_start()
        start = time.perf_counter()
        generate(model, prompts, max_new_tokens=new_tokens)
        return prompts.shape[0] * new_tokens / (time.perf_counter() - start)


def run(args) -> dict:
    import torch

    from cpmctl.checkpoint import load_model
    from cpmctl.cpu_int4 import PREPACKED_SUFFIX
    from cpmctl.offload import checkpoint_weight_bytes, load_offloaded

    paths = make_checkpoints(args.work)
    cpu = torch.device("cpu")
    rows = []
    budgets: dict[str, int] = {}
    for batch in (1, 8):
        prompts = torch.randint(3, SHAPE["vocab_size"], (batch, 16), generator=torch.Generator().manual_seed(batch))
        base = None
        for label, path in paths.items():
            for setting in ("resident", "25%"):
                if setting == "resident" and label == "int4 repack on read":
                    continue  # the same resident model as the stored-layout one
                if setting == "resident":
                    model, ckpt = load_model(path)
                    engine = None
                else:
                    model, ckpt, engine = load_offloaded(path, mode="disk", budget=checkpoint_weight_bytes(path), device=cpu, dtype=None)
                    stats = engine.stats()
                    engine.close()
                    ckpt.close()
                    budget = stats["resident_bytes"] + round(0.25 * stats["units"]) * stats["slot_bytes"]
                    budgets[label] = budget
                    evict(path)
                    model, ckpt, engine = load_offloaded(path, mode="disk", budget=budget, device=cpu, dtype=None)
                try:
                    moved = []
                    rate = decode(model, prompts, args.new_tokens,
                                  lambda: moved.append(engine.cache.bytes_moved if engine is not None else 0))
                    row = dict(batch=batch, experts=label if setting == "25%" or label == "fp32" else "int4", setting=setting,
                               tokens_per_s=round(rate, 2))
                    if engine is not None:
                        stats = engine.stats()
                        per_token = (engine.cache.bytes_moved - moved[0]) / (batch * args.new_tokens)  # prefill included
                        bandwidth = cold_read_bandwidth(path, stats["slot_bytes"])
                        bound = bandwidth / per_token if per_token else None
                        row.update(expert_bytes_per_token=round(per_token), cold_read_mb_s=round(bandwidth / 1e6, 1),
                                   io_bound_tokens_per_s=None if bound is None else round(bound, 1),
                                   io_bound_fraction=None if bound is None else round(rate / bound, 4))
                        row.update(hit_rate=stats["hit_rate"], load_ms_per_miss=stats["load_ms_per_unit"],
                                   slots=stats["slots"], units=stats["units"],
                                   read_prepacked=any(p.name.endswith(PREPACKED_SUFFIX) for u in engine.units for p in u.parts))
                    base = rate if (label, setting) == ("fp32", "resident") else base
                    row["vs_resident_fp32"] = round(rate / base, 3)
                    rows.append(row)
                    print(f"# {row}", file=sys.stderr, flush=True)
                finally:
                    if engine is not None:
                        engine.close()
                    ckpt.close()
        rows.append(accelerate_row(paths["fp32"], budgets["fp32"], prompts, args, base, rows))
    return {"rows": rows}


def accelerate_row(path: Path, budget: int, prompts, args, base: float, rows: list) -> dict:
    """accelerate's disk offload of the fp32 model (dispatch_model over infer_auto_device_map with
    `budget` bytes of CPU memory, the rest in its offload folder), the same prompts, its offload
    folder evicted from the page cache first."""
    import torch

    from cpmctl.gpu_check.offload_bench import accelerate_device_map

    folder = args.work / "accelerate-offload"
    shutil.rmtree(folder, ignore_errors=True)
    model, ckpt, placed = accelerate_device_map(path, torch.device("cpu"), budget, folder)
    try:
        evict(folder, "**/*.dat")
        rate = decode(model, prompts, args.new_tokens)
    finally:
        ckpt.close()
    ours = next(r["tokens_per_s"] for r in rows if r["batch"] == prompts.shape[0] and r["experts"] == "fp32" and r["setting"] == "25%")
    row = dict(batch=prompts.shape[0], experts="fp32, accelerate disk offload", setting=f"{budget / 1e6:.1f} MB in memory",
               tokens_per_s=round(rate, 2), vs_resident_fp32=round(rate / base, 3), placed=placed,
               cpmctl_fp32_25pct_over_accelerate=round(ours / rate, 2))
    print(f"# {row}", file=sys.stderr, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-int4-offload"))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = run(args)
    record = {"benchmark": "int4_offload", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": cpu_model(), "threads": args.threads, "torch": torch.__version__,
              "command": "python benchmarks/int4_offload.py " + " ".join(sys.argv[1:]),
              "wall_s": round(time.monotonic() - started, 1), "result": result}
    (args.work / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{record['date']} | {record['machine']} | {args.threads} thread(s) | torch {torch.__version__}")
    print("| batch | experts | setting | tokens/s | vs resident fp32 | hit rate | load ms per miss | expert bytes/token "
          "| cold read MB/s | I/O bound tokens/s | fraction of the bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        print(f"| {r['batch']} | {r['experts']} | {r['setting']} | {r['tokens_per_s']} | {r['vs_resident_fp32']} | "
              + " | ".join(str(r.get(k, "-")) for k in ("hit_rate", "load_ms_per_miss", "expert_bytes_per_token",
                                                         "cold_read_mb_s", "io_bound_tokens_per_s", "io_bound_fraction")) + " |")
    for r in result["rows"]:
        if "cpmctl_fp32_25pct_over_accelerate" in r:
            print(f"batch {r['batch']}: cpmctl fp32 at 25% / accelerate disk offload = {r['cpmctl_fp32_25pct_over_accelerate']}x "
                  f"(accelerate placed: {', '.join(r['placed'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
