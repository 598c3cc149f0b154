"""Knowledge-inheritance benchmark on real text (WordNet glosses): does a grown and/or
teacher-guided student reach the from-scratch run's validation loss in fewer steps and FLOPs?

    .venv/bin/python benchmarks/ki.py [--work runs/bench-ki] [--steps 200] [--teacher-steps 600] [--threads 1] [--json]

1. Trains a unigram tokenizer (vocabulary --vocab) on ../shared/data/wordnet/corpus.txt and
   tokenizes the corpus into shards (once; reused from --work).
2. Trains a small decoder-only teacher (RMS norm, rotary, SwiGLU; --teacher-layers x --teacher-d)
   for --teacher-steps steps.
3. Pre-trains a student twice as wide and twice as deep four ways, same data order, steps,
   learning-rate schedule and seed: from scratch; scratch init + KI (teacher online, linear a_t
   over the first half of the steps, T = 2); grown from the teacher with `inherit --method aki`;
   grown + KI.
4. Reports, for each run, the first evaluation step whose validation loss is <= the scratch run's
   final validation loss, with the wall-clock and FLOPs (teacher forward passes included) spent
   to get there, and the final validation loss; saves the four curves as a PNG.
Everything runs through the same code as `cpmctl pretrain` / `cpmctl inherit` (the stage
functions). Wall-clock is the machine's and includes contention from anything else running.
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
from machine import cpu_model  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet" / "corpus.txt"
RUNS = ("scratch", "ki", "aki", "aki+ki")


def model_shape(layers: int, d: int, d_head: int) -> dict:
    heads = d // d_head
    return {"d_model": d, "n_heads": heads, "n_kv_heads": heads, "d_head": d_head, "d_ff": 3 * d, "n_layers": layers}


def prepare_data(work: Path, vocab: int):
    from cpmctl.data import prepare
    from cpmctl.tokenizer import load_tokenizer, train_sentencepiece

    tok_dir, shards = work / "tokenizer", work / "shards"
    if not tok_dir.exists():
        t0 = time.monotonic()
        train_sentencepiece(CORPUS, tok_dir, vocab, sentinels=0, input_sentence_size=200_000)
        print(f"tokenizer: {time.monotonic() - t0:.1f}s", flush=True)
    tok = load_tokenizer(tok_dir)
    if not shards.exists():
        prepare(CORPUS, tok, shards, progress=False)
    return tok_dir, shards


def add_run_arguments(parser, work: Path) -> None:
    """The options every pre-training benchmark here shares: WORK, the data and the threads."""
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine OpenMP spinning makes 2 threads several times slower)")


def finish_plot(fig, ax, path: Path, title: str, legend_size: float | None = None) -> None:
    """Title, legend and grid, then the figure written to `path`."""
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def start_run(args) -> tuple[float, Path, Path] | None:
    """One torch thread count, WORK, and the tokenizer and shards prepared in it: (start time,
    tokenizer, shards); None (after an error line) when the corpus is missing."""
    started = time.monotonic()
    if not CORPUS.is_file():
        print(f"error: {CORPUS} not found", file=sys.stderr)
        return None
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    return (started, *prepare_data(args.work, args.vocab))


def pretrain(out: Path, shards: Path, tok_dir: Path, args, *, steps: int, lr: float, init=None, model=None, teacher=None):
    from cpmctl.stages import pretrain as stage

    cfg = stage.PretrainConfig(
        out=out, data=shards, init=init, preset=None if init else "llama-tiny", tokenizer=tok_dir,
        model=model or {}, seq_len=args.seq_len, batch_size=args.batch, max_steps=steps, lr=lr,
        schedule="cosine", warmup_steps=max(steps // 20, 1), min_lr_ratio=0.1, weight_decay=0.01,
        eval_every=args.eval_every, eval_batches=args.eval_batches, log_every=20, seed=args.seed,
        valid_fraction=0.01, teacher=teacher, ki_steps=steps // 2 if teacher else None, ki_temperature=args.ki_temperature,
        force=True,
    )
    if model:
        cfg.model = {**model, "max_positions": args.seq_len + 1, "norm_eps": 1e-6}
    return stage.run(cfg)


def curve(out: Path) -> list[dict]:
    from cpmctl.training import read_metrics

    return [r for r in read_metrics(out) if r["kind"] == "eval"]


def steps_to_reach(evals: list[dict], target: float) -> dict | None:
    for r in evals:
        if r["loss"] <= target:
            return r
    return None


def plot(results: dict, target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in results:
        evals = results[name]["curve"]
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], marker=".", label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="scratch final")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    finish_plot(fig, ax, path, title)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, Path("runs/bench-ki"))
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-d", type=int, default=64)
    parser.add_argument("--d-head", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ki-temperature", type=float, default=2.0)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS) + " (scratch is always run)")
    parser.add_argument("--reuse-teacher", action="store_true", help="reuse WORK/teacher/checkpoint from an earlier run")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("ki_loss.png"))
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default WORK/results.json)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    prepared = start_run(args)
    if prepared is None:
        return 2
    import torch

    from cpmctl.stages import inherit

    started, tok_dir, shards = prepared
    work = args.work
    teacher_shape = model_shape(args.teacher_layers, args.teacher_d, args.d_head)
    student_shape = model_shape(2 * args.teacher_layers, 2 * args.teacher_d, args.d_head)

    t0 = time.monotonic()
    if args.reuse_teacher and (work / "teacher" / "checkpoint").is_dir():
        from cpmctl.checkpoint import read_provenance

        teacher = {**read_provenance(work / "teacher" / "checkpoint")["metrics"], "checkpoint": str(work / "teacher" / "checkpoint")}
    else:
        teacher = pretrain(work / "teacher", shards, tok_dir, args, steps=args.teacher_steps, lr=3e-3, model=teacher_shape)
    teacher_ckpt = Path(teacher["checkpoint"])
    print(f"teacher: {teacher['steps']} steps, val loss {teacher['final_eval_loss']:.4f}, {time.monotonic() - t0:.0f}s", flush=True)

    grown = work / "grown-aki"
    inherit.run(inherit.InheritConfig(src=teacher_ckpt, out=grown, method="aki", seed=args.seed, force=True,
                                      to=",".join(f"{k}={v}" for k, v in student_shape.items())))

    runs = [r for r in RUNS if r == "scratch" or r in args.runs.split(",")]
    results = {}
    for name in runs:
        t0 = time.monotonic()
        init = grown if name.startswith("aki") else None
        summary = pretrain(work / name, shards, tok_dir, args, steps=args.steps, lr=args.lr, init=init,
                           model=None if init else student_shape, teacher=teacher_ckpt if name in ("ki", "aki+ki") else None)
        results[name] = {"summary": summary, "curve": curve(work / name), "wall_s": time.monotonic() - t0}
        print(f"{name}: final val loss {summary['final_eval_loss']:.4f}, {results[name]['wall_s']:.0f}s", flush=True)

    target = results["scratch"]["curve"][-1]["loss"]
    rows = []
    base_steps = results["scratch"]["curve"][-1]["step"]
    for name in runs:
        hit = steps_to_reach(results[name]["curve"], target)
        rows.append({
            "run": name, "steps_to_target": hit["step"] if hit else None,
            "step_ratio": (base_steps / hit["step"]) if hit else None,
            "seconds_to_target": hit["train_seconds"] if hit else None,
            "flops_to_target": hit["flops"] if hit else None,
            "final_val_loss": results[name]["curve"][-1]["loss"],
            "total_flops": results[name]["summary"]["flops"],
        })
    scratch_flops = rows[0]["flops_to_target"]
    for row in rows:
        row["flops_ratio"] = scratch_flops / row["flops_to_target"] if row["flops_to_target"] else None
    title = (f"KI on WordNet glosses: teacher {args.teacher_layers}x{args.teacher_d} -> student "
             f"{2 * args.teacher_layers}x{2 * args.teacher_d}, {args.steps} steps, batch {args.batch}x{args.seq_len}")
    plot(results, target, args.plot, title)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
        "teacher": {"shape": teacher_shape, "steps": teacher["steps"], "final_val_loss": teacher["final_eval_loss"],
                    "flops": teacher["flops"], "train_seconds": teacher["train_seconds"]},
        "student_shape": student_shape, "target_val_loss": target, "rows": rows,
        "total_seconds": time.monotonic() - started, "plot": str(args.plot),
    }
    results_path = args.results or work / "results.json"
    results_path.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"\n{title}\ntarget = scratch final val loss {target:.4f} (step {base_steps}); teacher: val loss "
          f"{teacher['final_eval_loss']:.4f} after {teacher['steps']} steps, {teacher['flops']:.3g} FLOPs")
    print("| run | steps to target | step speed-up | wall-clock to target (s) | FLOPs to target (incl. teacher fwd) | FLOP speed-up | final val loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v, f: (f.format(v) if v is not None else "not reached")  # noqa: E731
        print(f"| {r['run']} | {fmt(r['steps_to_target'], '{}')} | {fmt(r['step_ratio'], '{:.2f}x')} | "
              f"{fmt(r['seconds_to_target'], '{:.0f}')} | {fmt(r['flops_to_target'], '{:.3g}')} | "
              f"{fmt(r['flops_ratio'], '{:.2f}x')} | {r['final_val_loss']:.4f} |")
    print(f"\ntotal {report['total_seconds']:.0f}s; plot {args.plot}; details {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
