"""ReLU-fication, MoEfication and TEAL-style thresholding of a small SwiGLU LM pre-trained by cpmctl.

    .venv/bin/python benchmarks/relufy_lm.py --work /tmp/relufy_lm

1. Splits ../shared/data/wordnet/corpus.txt by line (every --holdout-every'th gloss held out),
   trains a tokenizer and prepares shards from the training part (benchmarks/moefy_relu.py's steps).
2. `pretrain`: a decoder-only LM with gated SiLU FFNs (SwiGLU, as Llama), causal LM, --steps steps.
3. `relufy` (the stage function) with recovery training: --recovery-steps, KD weight --kd, peak L1
   weight --l1; the report gives the recovery FLOPs as a fraction of the pre-training's.
4. `moefy` of the relufied model: experts of --expert-size, --ratio of them per token, co-activation
   split (its measured zero pattern) and MLP router, optionally --calibrate steps.
5. `moefy --method threshold --sparsity S` of the original SwiGLU model, for each S in --sparsities.
6. CPU speed at batch 1 (1 thread): one token through every FFN (the FFN modules alone) and through
   the whole model (a 1-token forward), dense SwiGLU vs relufied-MoE vs each thresholded model (on
   the kernels `--kernels auto` picks: the C++ sparse kernels on a CPU; benchmarks/sparse_ffn_speed.py
   times them at llama-100m size against the torch path),
   measured in alternation in one process; median of --repeats rounds.
All perplexities are on --eval-docs glosses of the held-out file, each against the original SwiGLU
model's perplexity on the same rows. Figures go to stdout and WORK/results.json.
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
from moefy_relu import add_lm_arguments, prepare_data, split_corpus  # noqa: E402


def pretrain(work: Path, tok_dir: Path, shards: Path, args) -> tuple[Path, dict]:
    from cpmctl.stages import pretrain as stage

    out = work / "swiglu-lm"
    model = {"d_model": args.d, "n_heads": args.d // 64, "n_kv_heads": args.d // 64, "d_head": 64, "d_ff": args.d_ff,
             "n_layers": args.layers, "activation": "silu", "gated": True, "max_positions": args.seq_len + 1}
    cfg = stage.PretrainConfig(
        out=out, data=shards, preset="llama-tiny", tokenizer=tok_dir, model=model, seq_len=args.seq_len,
        batch_size=args.batch, max_steps=args.steps, lr=args.lr, schedule="cosine", warmup_steps=max(1, args.steps // 20),
        min_lr_ratio=0.1, weight_decay=0.01, eval_every=max(1, args.steps // 4), eval_batches=20, log_every=50,
        seed=args.seed, valid_fraction=0.01, progress=False, force=True,
    )
    return out / stage.CHECKPOINT_DIR, stage.run(cfg)


def time_models(paths: dict[str, Path], repeats: int, d: int) -> dict[str, dict[str, float]]:
    """Median seconds per call of each model's FFNs on one token, and of a 1-token forward."""
    import torch

    from cpmctl.checkpoint import load_model
    from cpmctl.moe import resolve_kernels, set_kernels

    kernels = resolve_kernels("auto", "cpu")  # as infer runs them: the C++ sparse kernels where they build
    models = {}
    for name, path in paths.items():
        model, ckpt = load_model(path, dtype=torch.float32)
        ckpt.close()
        set_kernels(model, kernels)
        models[name] = model.eval()
    x = torch.randn(1, d)
    ids = torch.tensor([[5]])
    times = {name: {"ffn": [], "model": []} for name in models}
    with torch.no_grad():
        for _ in range(repeats):
            for name, model in models.items():
                ffns = [f for _, _, f in model.ffn_modules()]
                for f in ffns:  # warm-up (and the thresholded FFNs' transposed weights)
                    f(x)
                t0 = time.perf_counter()
                for _ in range(20):
                    for f in ffns:
                        f(x)
                times[name]["ffn"].append((time.perf_counter() - t0) / 20)
                model(input_ids=ids)
                t0 = time.perf_counter()
                for _ in range(20):
                    model(input_ids=ids)
                times[name]["model"].append((time.perf_counter() - t0) / 20)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    add_lm_arguments(parser, steps=400)
    parser.add_argument("--recovery-steps", type=int, default=150)
    parser.add_argument("--recovery-lr", type=float, default=5e-4)
    parser.add_argument("--kd", type=float, default=0.5)
    parser.add_argument("--l1", type=float, default=0.0)
    parser.add_argument("--activation", default="relu", help="relu (gate branch) or drelu (both branches); "
                        "outputs go to WORK/relu-lm, WORK/relu-moe (relu) or WORK/drelu-lm, WORK/drelu-moe")
    parser.add_argument("--expert-size", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--calibrate", type=int, default=0)
    parser.add_argument("--sparsities", default="0.25,0.4,0.5", help="threshold sparsities ('' skips step 5)")
    parser.add_argument("--max-docs", type=int, default=2000)
    parser.add_argument("--eval-docs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15, help="speed rounds (0 skips step 6)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from cpmctl.stages.moefy import MoefyConfig
    from cpmctl.stages.moefy import run as moefy
    from cpmctl.stages.relufy import RelufyConfig
    from cpmctl.stages.relufy import run as relufy

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    train, held = split_corpus(args.data, args.work, args.holdout_every)
    tok_dir, shards = prepare_data(train, args.work, args.vocab)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))

    dense = args.work / "swiglu-lm" / "checkpoint"
    if not dense.exists():
        t0 = time.perf_counter()
        dense, summary = pretrain(args.work, tok_dir, shards, args)
        results["pretrain"] = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        print(f"pretrain: {time.perf_counter() - t0:.1f} s, {json.dumps(results['pretrain'])}", flush=True)
    common = dict(data=train, eval_data=held, eval_docs=args.eval_docs, max_docs=args.max_docs, seq_len=args.seq_len,
                  seed=args.seed, force=True)

    t0 = time.perf_counter()
    relu_dir = args.work / f"{args.activation}-lm"
    rep = relufy(RelufyConfig(checkpoint=dense, out=relu_dir, activation=args.activation, steps=args.recovery_steps,
                              lr=args.recovery_lr, kd=args.kd, l1=args.l1, batch_size=args.batch, **common))
    results["relufy"] = rep
    print(f"relufy ({time.perf_counter() - t0:.1f} s): swapped {rep['swapped']['quality']}, recovered {rep['recovered']['quality']}; "
          f"sparsity {rep['recovered']['sparsity']}; recovery {rep['recovery']}", flush=True)
    save()

    t0 = time.perf_counter()
    moe_dir = args.work / f"{args.activation}-moe"
    rep = moefy(MoefyConfig(checkpoint=relu_dir, out=moe_dir, expert_size=args.expert_size, ratio=args.ratio, split="coactivation",
                            router="mlp", calibrate=args.calibrate, **common))
    # perplexity of the relufied MoE against the original SwiGLU model on the same rows
    base_ppl = results["relufy"]["original"]["quality"]["perplexity"]
    moe_vs_original = rep["quality"]["moe_perplexity"] / base_ppl - 1
    results["moefy"] = {**rep, "perplexity_vs_original_swiglu": moe_vs_original}
    print(f"moefy relufied ({time.perf_counter() - t0:.1f} s): {rep['quality']}, vs original SwiGLU {moe_vs_original:+.2%}; "
          f"recall {[v['recall'] for v in rep['layers'].values()]}", flush=True)
    save()

    speed_paths = {"dense swiglu": dense, f"relu moe {args.ratio}": moe_dir}
    results["threshold"] = {}
    for s in (float(v) for v in args.sparsities.split(",") if v.strip()):
        out = args.work / f"threshold-{s}"
        rep = moefy(MoefyConfig(checkpoint=dense, out=out, method="threshold", sparsity=s, **common))
        results["threshold"][s] = rep
        speed_paths[f"threshold {s}"] = out
        print(f"threshold {s}: {rep['quality']}, skipped {[(v['input_skipped'], v['hidden_skipped']) for v in rep['layers'].values()]}",
              flush=True)
        save()

    if args.repeats == 0:
        print(f"target relu+moe at {args.ratio}: perplexity <= +3% of the SwiGLU model: "
              f"{'met' if moe_vs_original <= 0.03 else 'missed'} ({moe_vs_original:+.2%}) (speed not measured: --repeats 0)")
        return
    speed = time_models(speed_paths, args.repeats, args.d)
    base = speed["dense swiglu"]
    results["speed"] = {name: {**t, "ffn_speedup": base["ffn"] / t["ffn"], "model_speedup": base["model"] / t["model"]}
                        for name, t in speed.items()}
    save()
    print("| model | FFNs, 1 token (us) | FFN speed-up | whole model, 1 token (us) | speed-up |")
    print("|---|---|---|---|---|")
    for name, t in results["speed"].items():
        print(f"| {name} | {1e6 * t['ffn']:.0f} | {t['ffn_speedup']:.2f}x | {1e6 * t['model']:.0f} | {t['model_speedup']:.2f}x |")
    print(f"target relu+moe at {args.ratio}: perplexity <= +3% of the SwiGLU model: "
          f"{'met' if moe_vs_original <= 0.03 else 'missed'} ({moe_vs_original:+.2%})")
    t40 = results["threshold"].get(0.4)
    if t40:
        inc = t40["quality"]["perplexity_increase"]
        print(f"target threshold 0.4: perplexity <= +2%: {'met' if inc <= 0.02 else 'missed'} ({inc:+.2%})")


if __name__ == "__main__":
    main()
