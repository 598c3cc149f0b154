"""Speed of one MoEfied FFN layer (torch path) against the dense FFN it came from, on this CPU.

    .venv/bin/python benchmarks/moe_ffn.py                      # d 1024, d_ff 4096, fp32, ReLU
    .venv/bin/python benchmarks/moe_ffn.py --expert-size 32 --reps 30
    .venv/bin/python benchmarks/moe_ffn.py --split-speed        # cluster split of a d_ff 10240 FFN

The MoE layer is the real `MoEFeedForward` (MLP router included in the time), built from the
dense `FeedForward` by `moe_from_dense` with a random neuron permutation; every ratio (fraction
of experts per token) and batch size (tokens) is timed against the dense layer in the same run,
alternating the two, and the ratio of the best times is printed (the machine is shared: the
fastest call is the one other jobs did not slow down). With an untrained router, tokens
spread over the experts about uniformly: the hardest case for grouping tokens by expert. At
100% of experts a MoEfied layer skips its router (every expert runs anyway): that row is the
cost of running the dense FFN from the expert-block layout. The load average before and after
the run is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

from cpmctl.config import ModelConfig
from cpmctl.model import FeedForward
from cpmctl.moe import moe_from_dense


def best_ms(fn, x, reps: int) -> float:
    """Fastest of `reps` calls: on a shared machine the minimum is the run other jobs did not slow."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def split_speed() -> None:
    """Seconds for `--split cluster` on one CPM-2-sized FFN (d_ff 10240, d 4096, experts of 32)."""
    from cpmctl.moefication import balanced_kmeans

    rows = torch.randn(10240, 4096, generator=torch.Generator().manual_seed(0))
    start, cpu = time.perf_counter(), time.process_time()
    labels = balanced_kmeans(rows, 320, 32)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    sizes = torch.bincount(labels, minlength=320)
    print(f"cluster split d_ff 10240, d 4096, 320 experts of 32: {wall:.2f} s wall, {cpu:.2f} s CPU; "
          f"expert sizes min {int(sizes.min())} max {int(sizes.max())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=4096)
    parser.add_argument("--expert-size", type=int, default=64)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--ratios", default="0.1,0.2,0.5,1.0")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--split-speed", action="store_true", help="time the cluster split of a d_ff 10240 x d 4096 FFN instead")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both layers (on a busy shared machine, 1 avoids OpenMP barrier stalls)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.split_speed:
        split_speed()
        return

    torch.manual_seed(0)
    config = ModelConfig(arch="decoder", vocab_size=8, d_model=args.d_model, n_heads=8, d_ff=args.d_ff, n_layers=1,
                         activation=args.activation, gated=False, bias=False)
    dense = FeedForward(config).eval()
    experts = args.d_ff // args.expert_size
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.2f}")
    print(f"# FFN d {args.d_model}, d_ff {args.d_ff}, {args.activation}, fp32; {experts} experts of {args.expert_size} neurons, MLP router")
    print("| experts per token | k | batch | dense ms | MoE ms | speed-up |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for ratio in [float(r) for r in args.ratios.split(",")]:
            k = max(1, round(ratio * experts))
            moe_config = config.replace(moe=dict(experts=experts, expert_size=args.expert_size, top_k=k, router="mlp", permuted=True))
            moe = moe_from_dense(dense, moe_config, torch.randperm(args.d_ff)).eval()
            torch.nn.init.normal_(moe.router.proj.weight, std=0.5)
            for batch in [int(b) for b in args.batches.split(",")]:
                x = torch.randn(batch, args.d_model)
                for _ in range(3):  # warm-up
                    dense(x), moe(x)
                dense_ms, moe_ms = [], []
                for _ in range(5):  # alternate so that load on a shared machine hits both alike
                    dense_ms.append(best_ms(dense, x, args.reps // 5 or 1))
                    moe_ms.append(best_ms(moe, x, args.reps // 5 or 1))
                d, m = min(dense_ms), min(moe_ms)
                print(f"| {ratio:.0%} | {k} | {batch} | {d:.3f} | {m:.3f} | {d / m:.2f}x |", flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
