"""Parameter-shared models as ODE steps on real text (WordNet glosses): does step-robust
pre-training let a shared model run fewer, larger steps at inference?

    .venv/bin/python benchmarks/shared_ode.py [--work runs/bench-ode] [--steps 1000] [--threads 1] [--json]

1. Trains a unigram tokenizer (vocabulary --vocab) on ../shared/data/wordnet/corpus.txt and
   tokenizes the corpus into shards (once; reused from --work), as benchmarks/ki.py does.
2. Pre-trains a decoder-only model with one shared block applied L = --layers times (RMS norm,
   rotary, SwiGLU; d = --d) twice, same data order, steps, schedule and seed: plain
   (`--share-layers`: n = L, step 1 on every batch) and step-robust (`--share-layers
   --step-robust`: n drawn per micro-batch from the default set {L, 3L/4, L/2}, step L / n).
3. On the whole held-out split, for each model and n in --iterations: validation loss with the
   step L / n (cpmctl's Euler reading), with step 1 (naive truncation, the baseline), and with
   Heun's method at the same number of block evaluations (n / 2 steps of size 2L / n, two
   evaluations each); forward tokens/s at each n (best of --speed-repeats timed passes over the
   held-out batches, the n interleaved so the machine's load hits each alike).
4. Writes the table, a PNG of loss against iterations and WORK/results.json.
Everything runs through the same code as `cpmctl pretrain` (the stage function) and
cpmctl.model.set_iterations. Wall-clock is the machine's, including anything else running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import model_shape  # noqa: E402
from machine import cpu_model  # noqa: E402

RUNS = ("plain", "robust")


def pretrain(out: Path, shards: Path, tok_dir: Path, args, *, step_robust: bool) -> dict:
    from cpmctl.stages import pretrain as stage

    model = {**model_shape(args.layers, args.d, args.d_head), "max_positions": args.seq_len + 1, "norm_eps": 1e-6}
    cfg = stage.PretrainConfig(
        out=out, data=shards, preset="llama-tiny", tokenizer=tok_dir, model=model, seq_len=args.seq_len,
        batch_size=args.batch, max_steps=args.steps, lr=args.lr, schedule="cosine", warmup_steps=max(args.steps // 20, 1),
        min_lr_ratio=0.1, weight_decay=0.01, eval_every=args.eval_every, eval_batches=args.eval_batches, log_every=20,
        seed=args.first_seed, valid_fraction=0.01, force=True, progress=False, share_layers=True, step_robust=step_robust,
        eval_iterations=",".join(map(str, args.iterations)),
    )
    return stage.run(cfg), cfg


def heun_logits(model, batch, evaluations: int):
    """Heun's method on the shared stack with `evaluations` block evaluations: n / 2 steps of
    size beta = 2L / n; each step k1 = B(h) - h, k2 = B(h + k1) - (h + k1) with B the block at
    step beta (both residual branches scaled), h <- h + (k1 + k2) / 2. Decoder-only, unpadded
    (packed) batches."""
    import torch

    stack = model.decoder
    if evaluations % 2:
        raise ValueError("Heun's method needs an even number of evaluations")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("heun_logits takes packed (unpadded) batches")
    steps = evaluations // 2
    beta = stack.n_layers / steps
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device)
    h = model.embed(ids, positions, last_position=ids.shape[1] - 1)
    kw = dict(self_mask=None, causal=True, rotary=model._rotary(positions), cache=None, memory=None, cross_mask=None,
              step=None if beta == 1.0 else beta)
    for i in range(steps):
        block = stack.blocks[i * len(stack.blocks) // steps]
        k1 = block(h, layer=i, **kw) - h
        predictor = h + k1
        k2 = block(predictor, layer=i, **kw) - predictor
        h = h + 0.5 * (k1 + k2)
    return model.logits(stack.final_norm(h))


def held_out(cfg, model):
    from cpmctl.stages import pretrain as stage
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    return list(stage.make_data(cfg, tok, model.config, "valid", shuffle=False, drop_last=False, epochs=1))


def mean_loss(model, batches, logits_fn) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over `batches` and the number of input tokens."""
    from cpmctl.losses import lm_loss

    total, count, tokens = 0.0, 0, 0
    for batch in batches:
        n = int((batch["labels"] != -100).sum())
        total += float(lm_loss(logits_fn(batch), batch["labels"])) * n
        count += n
        tokens += batch["input_ids"].numel()
    return total / count, tokens


def evaluate(checkpoint: Path, cfg, args) -> dict:
    import torch

    from cpmctl.checkpoint import load_model
    from cpmctl.losses import lm_forward
    from cpmctl.model import iteration_info, set_iterations

    model, ckpt = load_model(checkpoint)
    ckpt.close()
    model = model.float().eval()
    batches = held_out(cfg, model)
    if args.final_batches:
        batches = batches[: args.final_batches]
    L = model.config.n_layers
    rows = {n: {"iterations": n} for n in args.iterations}
    with torch.no_grad():
        for n in args.iterations:
            set_iterations(model, n)
            rows[n]["step_size"] = iteration_info(model)["step_size"]
            rows[n]["loss"], tokens = mean_loss(model, batches, lambda b: lm_forward(model, b))
            set_iterations(model, n, step_size=1.0)
            rows[n]["naive_loss"] = mean_loss(model, batches, lambda b: lm_forward(model, b))[0]
            set_iterations(model, None)
            if n % 2 == 0:
                rows[n]["heun_loss"] = mean_loss(model, batches, lambda b, n=n: heun_logits(model, b, n))[0]
        best = {n: float("inf") for n in args.iterations}
        for _ in range(args.speed_repeats):
            for n in args.iterations:
                set_iterations(model, n)
                start = time.perf_counter()
                for batch in batches:
                    lm_forward(model, batch)
                best[n] = min(best[n], time.perf_counter() - start)
        set_iterations(model, None)
    for n in args.iterations:
        rows[n]["tokens_per_s"] = tokens / best[n]
        rows[n]["speedup"] = best[L] / best[n] if L in best else None
        rows[n]["loss_vs_full"] = rows[n]["loss"] / rows[L]["loss"] - 1.0 if L in rows else None
    return {"rows": [rows[n] for n in args.iterations], "eval_tokens": tokens, "eval_batches": len(batches)}


def plot(runs: dict, path: Path, title: str) -> None:
    """Held-out loss against block evaluations: `runs` is results.json's {name: {"eval": ...}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {"plain": "tab:blue", "robust": "tab:orange"}
    for name, result in runs.items():
        rows = result["eval"]["rows"]
        n = [r["iterations"] for r in rows]
        ax.plot(n, [r["loss"] for r in rows], marker="o", color=colours[name], label=f"{name}: step L/n")
        ax.plot(n, [r["naive_loss"] for r in rows], marker="x", linestyle="--", color=colours[name], label=f"{name}: step 1 (naive)")
        heun = [(r["iterations"], r["heun_loss"]) for r in rows if "heun_loss" in r]
        ax.plot([h[0] for h in heun], [h[1] for h in heun], marker="^", linestyle=":", color=colours[name],
                label=f"{name}: Heun, same evaluations")
    ax.set_xlabel("block evaluations n (L = trained iterations)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_xticks(sorted({r["iterations"] for result in runs.values() for r in result["eval"]["rows"]}))
    ax.invert_xaxis()
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, work=Path("runs/bench-ode"), seeds=1)
    harness.add_lm_arguments(parser)
    parser.add_argument("--layers", type=int, default=12, help="L: applications of the shared block")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--d-head", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=6, help="held-out batches of the in-training evaluations")
    parser.add_argument("--final-batches", type=int, default=0, help="held-out batches of the final evaluation (0: all)")
    parser.add_argument("--iterations", default="12,8,6,4", help="n evaluated (L first)")
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--reuse", action="store_true", help="evaluate WORK/{plain,robust}/checkpoint from an earlier run")
    parser.add_argument("--plot-file", type=Path, default=Path(__file__).with_name("shared_ode.png"))
    parser.add_argument("--replot", type=Path, default=None, help="only redraw --plot-file from this results JSON")
    args = parser.parse_args()
    args.iterations = [int(n) for n in args.iterations.split(",")]
    if args.replot is not None:
        report = json.loads(args.replot.read_text())
        plot(report["runs"], args.plot_file, report["title"])
        return 0
    data = harness.start(args, corpus=True, task=False)
    started = time.monotonic()
    torch_threads(args.threads)
    lm = harness.prepare_lm_data(args.work, data.corpus, args.vocab)
    prepared = (started, lm.tokenizer, lm.shards)
    import torch

    from cpmctl.checkpoint import read_provenance

    started, tok_dir, shards = prepared
    work = args.work

    results = {}
    for name in args.runs.split(","):
        t0 = time.monotonic()
        if args.reuse and (work / name / "checkpoint").is_dir():
            from cpmctl.stages import pretrain as stage

            options = read_provenance(work / name / "checkpoint")["options"]
            cfg = stage.PretrainConfig(**{k: v for k, v in options.items() if k in {f for f in stage.PretrainConfig.__dataclass_fields__}})
            cfg.tokenizer = tok_dir
            summary = {**read_provenance(work / name / "checkpoint")["metrics"], "checkpoint": str(work / name / "checkpoint")}
        else:
            summary, cfg = pretrain(work / name, shards, tok_dir, args, step_robust=name == "robust")
        train_s = time.monotonic() - t0
        t0 = time.monotonic()
        evaluation = evaluate(Path(summary["checkpoint"]), cfg, args)
        results[name] = {"summary": summary, "eval": evaluation, "train_wall_s": train_s, "eval_wall_s": time.monotonic() - t0}
        losses = ", ".join(f"n={r['iterations']} {r['loss']:.4f} (naive {r['naive_loss']:.4f})" for r in evaluation["rows"])
        print(f"{name}: train {train_s:.0f}s, {summary.get('train_seconds', 0):.0f}s in the loop; {losses}", flush=True)

    L = args.layers
    title = (f"Shared decoder on WordNet glosses: one block x L={L}, d {args.d}, {args.steps} steps, "
             f"batch {args.batch}x{args.seq_len}")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
        "shape": model_shape(L, args.d, args.d_head),
        "runs": {name: {"eval": r["eval"], "train_wall_s": r["train_wall_s"], "eval_wall_s": r["eval_wall_s"],
                        "steps": r["summary"].get("steps"), "tokens": r["summary"].get("tokens"),
                        "flops": r["summary"].get("flops"), "train_seconds": r["summary"].get("train_seconds"),
                        "robust_iterations": r["summary"].get("robust_iterations")}
                 for name, r in results.items()},
        "total_seconds": time.monotonic() - started, "plot": str(args.plot_file), "title": title,
    }
    results_path = harness.write_results(args.results or work / "results.json", report)
    if args.plot:
        plot(report["runs"], args.plot_file, title)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("| model | n | step | speed-up (tokens/s) | loss (step L/n) | vs n=L | naive (step 1) | Heun (same evals) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for row in r["eval"]["rows"]:
            heun = f"{row['heun_loss']:.4f}" if "heun_loss" in row else "-"
            print(f"| {name} | {row['iterations']} | {row['step_size']:.3g} | {row['speedup']:.2f}x ({row['tokens_per_s']:.0f}) | "
                  f"{row['loss']:.4f} | {100 * row['loss_vs_full']:+.2f}% | {row['naive_loss']:.4f} | {heun} |")
    print(f"total {report['total_seconds']:.0f}s; results in {results_path}, plot {args.plot_file if args.plot else 'skipped'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
