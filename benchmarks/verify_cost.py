"""What checking the recorded CRC-32s costs on a 1 GB load (issue 23).

    python benchmarks/verify_cost.py [--dir /tmp/verify-1g] [--repeats 3]

Builds (once) a float32 decoder checkpoint of about 1 GB, then times, alternating, in this one
process and with the files in the page cache:

  mmap only     load_model with verification off (tensors stay lazy views of the map)
  load+read     load_model with verification off, then every weight read once (a sum): what a
                load costs once the bytes are used, as the first forward pass uses them
  verified      load_model with verification on (CRC-32 of every tensor, NaN/infinity check),
                then the same read

and prints the medians and the ratios as JSON. The issue's rule: offer --no-verify when the
check costs more than 5% of a 1 GB load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cpmctl.checkpoint import load_model, save_model, verification
from cpmctl.config import ModelConfig
from cpmctl.model import build_model


def build(path: Path) -> None:
    if (path / "cpmctl.json").is_file():
        return
    config = ModelConfig.from_preset("llama-tiny", vocab_size=32000, d_model=1024, n_layers=12, d_ff=4096,
                                     n_heads=16, n_kv_heads=16, max_positions=512)
    torch.manual_seed(0)
    save_model(build_model(config), path, stage="benchmark")


def read_all(model) -> float:
    total = 0.0
    for p in model.parameters():
        total += float(p.detach().sum())
    return total


def timed(path: Path, verify: bool, read: bool) -> float:
    start = time.perf_counter()
    with verification(verify):
        model, ckpt = load_model(path)
    if read:
        read_all(model)
    elapsed = time.perf_counter() - start
    ckpt.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cpmctl-verify-1g"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    build(args.dir)
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    timed(args.dir, False, True)  # page cache warm-up
    runs = {"mmap_only": [], "load_and_read": [], "verified_and_read": []}
    for _ in range(args.repeats):
        runs["mmap_only"].append(timed(args.dir, False, False))
        runs["load_and_read"].append(timed(args.dir, False, True))
        runs["verified_and_read"].append(timed(args.dir, True, True))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "weights_bytes": size,
        "torch_threads": torch.get_num_threads(), "median_seconds": med,
        "verify_extra_seconds": med["verified_and_read"] - med["load_and_read"],
        "verify_cost_vs_load_and_read": (med["verified_and_read"] - med["load_and_read"]) / med["load_and_read"],
        "runs": runs,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
