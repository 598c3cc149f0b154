"""Knowledge-inheritance benchmark on real text: does a grown and/or teacher-guided student reach
the from-scratch run's validation losses in fewer steps and FLOPs, over several seeds?

    .venv/bin/python benchmarks/ki.py [--data DIR] [--seeds 3] [--steps 500] [--work runs/bench-ki]

The papers' setting (Qin et al. 2021, "Knowledge Inheritance for Pre-trained Language Models"):
the teacher is smaller and weaker than what the student becomes, and the student trains long
enough to pass it clearly. So:
1. a unigram tokenizer (--vocab) is trained on DATA/corpus.txt and the corpus tokenized (once,
   reused from --work);
2. a teacher of --teacher-layers x --teacher-d trains for --teacher-steps (short: it ends well
   above the loss the student reaches), once, shared by every seed;
3. per seed, a student twice as wide and deep trains --steps steps from scratch, with KI at each
   --temperatures value (teacher online, a_t linear from 1 to 0 over --ki-fraction of the run),
   at the first temperature with each other --decays schedule, grown from the teacher
   (`inherit --method aki`), and grown + KI (first temperature, linear decay);
   same data order, schedule and seed within a seed;
4. two targets per seed, both from that seed's scratch run: its final loss, and the loss it had
   at 50% of its run. No run starts below either (checked and printed). Validation every 2% of
   the run (--eval-every).

For each run and target: the first evaluation step at or below it, and the FLOPs spent to get
there, teacher forward passes included; the speed-up over scratch per seed, then the mean and 95%
interval over seeds, and a verdict per target (met, missed, or not resolved when the interval
straddles it). Paired per-seed differences (final loss, speed-ups) compare each other
temperature and decay with the first temperature's linear decay (what chose cpmctl's KI
defaults), and grown + KI with grown alone. Everything runs through `cpmctl pretrain` /
`cpmctl inherit` (the stage functions). The results JSON is rewritten after every seed, so
nothing is lost to a later failure; more seeds can be added later (--first-seed N
--reuse-teacher) and summarised with the earlier ones (--combine A.json B.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

TARGETS = ("final", "half")  # scratch's final loss, and its loss at 50% of the run
KI_STEP_TARGET, KI_FLOP_TARGET, AKI_KI_TARGET = 1.3, 1.2, 1.5
# cpmctl's --ki-schedule values with no further knob ("constant" also takes --ki-alpha)
DECAY_SCHEDULES = ("linear", "step")
SPEEDUPS = ("step_speedup", "flop_speedup")


@dataclass(frozen=True)
class Arm:
    """One run of a seed: grown from the teacher or not, and the KI settings (None: no teacher)."""
    grown: bool
    temperature: float | None = None
    schedule: str = "linear"      # cpmctl's --ki-schedule
    fraction: float | None = None  # --ki-steps as a share of the run


@dataclass(frozen=True)
class Decay:
    """A KI decay: the schedule (linear: a_t = 1 - t/N; step: a_t = 1 until N) and N as a share of the run."""
    schedule: str
    fraction: float

    @property
    def label(self) -> str:
        return f"{self.schedule}{round(100 * self.fraction)}"


def parse_decays(text: str) -> list[Decay]:
    """"step:0.5,linear:0.25" -> [Decay("step", 0.5), Decay("linear", 0.25)] ("" -> [])."""
    decays = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        schedule, _, fraction = item.partition(":")
        try:
            value = float(fraction)
        except ValueError:
            harness.exit_usage(f"--decays: {item!r} is not SCHEDULE:FRACTION (e.g. step:0.5)")
        if schedule not in DECAY_SCHEDULES or not 0 < value <= 1:
            harness.exit_usage(f"--decays: {item!r} needs a schedule linear or step and a fraction in (0, 1]")
        decays.append(Decay(schedule, value))
    return decays


def arms(temperatures: list[float], decays: list[Decay], fraction: float) -> dict[str, Arm]:
    """The runs of a seed, by name: scratch; KI at each temperature (linear decay over `fraction`
    of the run); KI at the first temperature with each other decay; grown; grown + KI (first
    temperature, default decay)."""
    runs = {"scratch": Arm(False)}
    runs.update({f"ki-T{t:g}": Arm(False, t, "linear", fraction) for t in temperatures})
    runs.update({f"ki-T{temperatures[0]:g}-{d.label}": Arm(False, temperatures[0], d.schedule, d.fraction) for d in decays})
    runs["aki"] = Arm(True)
    runs["aki+ki"] = Arm(True, temperatures[0], "linear", fraction)
    return runs


def pretrain(out: Path, lm, args, *, steps: int, lr: float, seed: int, eval_every: int, init=None, model=None,
             teacher=None, arm: Arm | None = None) -> dict:
    from cpmctl.stages import pretrain as stage

    ki = {}
    if teacher is not None:
        ki = {"teacher": teacher, "ki_steps": max(1, round(steps * arm.fraction)), "ki_temperature": arm.temperature,
              "ki_schedule": arm.schedule}
    cfg = stage.PretrainConfig(
        out=out, data=lm.shards, init=init, preset=None if init else "llama-tiny", tokenizer=lm.tokenizer,
        model=model or {}, seq_len=args.seq_len, batch_size=args.batch, max_steps=steps, lr=lr,
        schedule="cosine", warmup_steps=max(steps // 20, 1), min_lr_ratio=0.1, weight_decay=0.01,
        eval_every=eval_every, eval_batches=args.eval_batches, log_every=max(steps // 10, 1), seed=seed,
        valid_fraction=0.01, force=True, progress=False, **ki,
    )
    if model:
        cfg.model = {**model, "max_positions": args.seq_len + 1, "norm_eps": 1e-6}
    return stage.run(cfg)


def evaluations(out: Path) -> list[dict]:
    from cpmctl.training import read_metrics

    return [{"step": r["step"], "loss": r["loss"], "flops": r["flops"], "seconds": r["train_seconds"]}
            for r in read_metrics(out) if r["kind"] == "eval"]


def first_at_or_below(curve: list[dict], target: float) -> dict | None:
    return next((r for r in curve if r["loss"] <= target), None)


def loss_at(curve: list[dict], step: int) -> float:
    """The evaluation at `step`, else the last one before it."""
    before = [r for r in curve if r["step"] <= step]
    return (before or curve)[-1]["loss"]


def seed_figures(curves: dict[str, list[dict]], steps: int) -> dict:
    """Targets from scratch's curve, and per run the step/FLOPs to reach each and the speed-ups."""
    scratch = curves["scratch"]
    targets = {"final": scratch[-1]["loss"], "half": loss_at(scratch, steps // 2)}
    figures = {"targets": targets, "runs": {}}
    for name, curve in curves.items():
        row = {"first_eval_loss": curve[0]["loss"], "final_loss": curve[-1]["loss"]}
        for key, target in targets.items():
            hit, base = first_at_or_below(curve, target), first_at_or_below(scratch, target)
            row[key] = {"step": hit["step"] if hit else None, "flops": hit["flops"] if hit else None,
                        "step_speedup": base["step"] / hit["step"] if hit else None,
                        "flop_speedup": base["flops"] / hit["flops"] if hit else None,
                        "starts_below": curve[0]["loss"] <= target}
        figures["runs"][name] = row
    return figures


def summarise(per_seed: list[dict], names: list[str]) -> dict:
    """Mean and 95% interval over seeds of each run's speed-ups (None while a seed never reached
    the target: that run's row says how many did)."""
    out = {}
    for name in names:
        out[name] = {"final_loss": harness.mean_ci(s["runs"][name]["final_loss"] for s in per_seed)}
        for key in TARGETS:
            for kind in ("step_speedup", "flop_speedup"):
                values = [s["runs"][name][key][kind] for s in per_seed]
                reached = [v for v in values if v is not None]
                out[name][f"{key}_{kind}"] = harness.mean_ci(reached) if len(reached) == len(values) else None
                out[name][f"{key}_reached"] = len(reached)
    return out


def target_lines(summary: dict, runs: dict[str, Arm]) -> list[dict]:
    """A verdict per KI-alone run (steps and FLOPs) and for grown + KI (steps), per target."""
    lines = []
    for key, label in (("final", "scratch's final loss"), ("half", "scratch's loss at 50%")):
        checks = []
        for name, arm in runs.items():
            if arm.temperature is None:
                continue
            what = f"T={arm.temperature:g}, {arm.schedule} decay over {arm.fraction:.0%}"
            if arm.grown:
                checks.append((name, "step_speedup", AKI_KI_TARGET, f"inherit + KI ({what}), fewer steps"))
            else:
                checks += [(name, "step_speedup", KI_STEP_TARGET, f"KI alone ({what}), fewer steps"),
                           (name, "flop_speedup", KI_FLOP_TARGET, f"KI alone ({what}), fewer FLOPs incl. teacher")]
        for run, kind, goal, what in checks:
            estimate = summary[run][f"{key}_{kind}"]
            name = f"{what} to {label}"
            if estimate is None:
                lines.append({"target": name, "figure": f"reached in {summary[run][f'{key}_reached']} seeds only",
                              "goal": f">= {goal:.2f}x", "verdict": "missed"})
            else:
                lines.append(harness.target_line(name, estimate, goal, spec=".2f", suffix="x"))
    return lines


def comparison_pairs(runs: dict[str, Arm], temperatures: list[float]) -> list[tuple[str, str]]:
    """(run, reference) pairs: each other temperature against the first, and each other decay
    against the default one, both KI alone (what chooses the defaults); and grown + KI against
    grown alone (what KI adds to growth)."""
    first = f"ki-T{temperatures[0]:g}"
    pairs = [(name, first) for name, arm in runs.items()
             if arm.temperature is not None and not arm.grown and name != first and first in runs]
    if "aki" in runs and "aki+ki" in runs:
        pairs.append(("aki+ki", "aki"))
    return pairs


def paired_comparisons(per_seed: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Paired per-seed difference of the speed-ups (steps and FLOPs, teacher included) of `run`
    minus `reference` to each target; a seed where either never reached the target is left out
    (and counted)."""
    out = []
    for run, reference in pairs:
        diff = harness.paired_difference([s["runs"][run]["final_loss"] for s in per_seed],
                                         [s["runs"][reference]["final_loss"] for s in per_seed])
        verdict = ("no difference resolved" if diff.n < 2 or diff.low <= 0 <= diff.high
                   else f"{run} better" if diff.high < 0 else f"{reference} better")
        out.append({"comparison": f"{run} minus {reference}, final val loss (lower is better)", "seeds": diff.n,
                    "left_out": 0, "figure": diff.format(".4f"), "estimate": diff, "verdict": verdict})
        for key in TARGETS:
            for kind in SPEEDUPS:
                pairs_ = [(s["runs"][run][key][kind], s["runs"][reference][key][kind]) for s in per_seed]
                kept = [(a, b) for a, b in pairs_ if a is not None and b is not None]
                line = {"comparison": f"{run} minus {reference}, {kind.replace('_', ' ')} to {key}",
                        "seeds": len(kept), "left_out": len(pairs_) - len(kept)}
                if not kept:
                    out.append({**line, "figure": "no seed reached the target on both", "verdict": "not measured"})
                    continue
                diff = harness.paired_difference([a for a, _ in kept], [b for _, b in kept])
                verdict = ("no difference resolved" if diff.n < 2 or diff.low <= 0 <= diff.high
                           else f"{run} better" if diff.low > 0 else f"{reference} better")
                out.append({**line, "figure": diff.format(".2f", "x"), "estimate": diff, "verdict": verdict})
    return out


def combine_results(paths: list[Path], temperatures: list[float]) -> tuple[dict, dict[str, Arm]]:
    """One report of the seeds of several results files, which must share the settings (title),
    the teacher and the runs, and not repeat a seed; exit 2 otherwise."""
    import json

    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            harness.exit_usage(f"--combine: cannot read {path}: {e}")
    first = reports[0]
    for path, other in zip(paths[1:], reports[1:]):
        for key in ("title", "teacher", "runs"):
            if other.get(key) != first.get(key):
                harness.exit_usage(f"--combine: {path} differs from {paths[0]} in {key!r}")
    seeds = [s for r in reports for s in r["seeds"]]
    numbers = [s["seed"] for s in seeds]
    if len(set(numbers)) != len(numbers):
        harness.exit_usage(f"--combine: a seed appears twice ({', '.join(map(str, sorted(numbers)))})")
    runs = {name: Arm(**arm) for name, arm in first["runs"].items()}
    if f"ki-T{temperatures[0]:g}" not in runs:
        harness.exit_usage(f"--combine: the files have no run ki-T{temperatures[0]:g} (see --temperatures)")
    report = {**first, "machine": harness.machine(), "combined_from": [str(p) for p in paths],
              "seeds": sorted(seeds, key=lambda s: s["seed"]),
              "total_seconds": sum(r.get("total_seconds", 0.0) for r in reports)}
    return report, runs


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    seed0 = report["seeds"][0]
    for name, curve in seed0["curves"].items():
        ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], marker=".", markersize=3, label=name)
    for key, style in zip(TARGETS, ("--", ":")):
        ax.axhline(seed0["figures"]["targets"][key], color="grey", linestyle=style, linewidth=0.8, label=f"target: scratch {key}")
    ax.axhline(report["teacher"]["final_val_loss"], color="black", linewidth=0.8, label="teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"KI, seed {seed0['seed']}: {report['title']}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, work=Path("runs/bench-ki"), seeds=3)
    harness.add_lm_arguments(parser)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--teacher-d", type=int, default=32)
    parser.add_argument("--d-head", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=500, help="student steps per run")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: 2%% of --steps)")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--temperatures", default="1,2", help="KI temperatures compared (the first also drives aki+ki)")
    parser.add_argument("--ki-fraction", type=float, default=0.5, help="a_t decays linearly to 0 over this share of the run")
    parser.add_argument("--decays", default="linear:0.25",
                        help="other KI decays, SCHEDULE:FRACTION (linear or step; a_t over that share of the run), "
                             "each run at the first temperature and compared with the linear one over --ki-fraction")
    parser.add_argument("--runs", default=None, help="comma-separated subset of the runs (scratch is always run)")
    parser.add_argument("--reuse-teacher", action="store_true", help="reuse WORK/teacher/checkpoint from an earlier run")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="RESULTS",
                        help="train nothing: summarise the seeds of earlier results files together (runs of the same "
                             "settings and teacher, e.g. more seeds added with --first-seed N --reuse-teacher)")
    parser.add_argument("--plot-file", type=Path, default=Path(__file__).with_name("ki_loss.png"))
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    if not 0 < args.ki_fraction <= 1:
        harness.exit_usage(f"--ki-fraction must be in (0, 1], got {args.ki_fraction}")
    runs = arms(temperatures, parse_decays(args.decays), args.ki_fraction)
    if args.runs:
        asked = set(args.runs.split(","))
        unknown = asked - set(runs)
        if unknown:
            harness.exit_usage(f"--runs: unknown {', '.join(sorted(unknown))} (choose from {', '.join(runs)})")
        runs = {n: arm for n, arm in runs.items() if n == "scratch" or n in asked}
    names = list(runs)
    if args.combine:
        report, runs = combine_results(args.combine, temperatures)
        args.plot = args.plot and harness.plotting_available()
        return finish(report, runs, temperatures, args.results or args.work / "results.json", args)
    eval_every = args.eval_every or max(1, args.steps // 50)
    if eval_every > args.steps // 50 and args.steps >= 50:
        harness.exit_usage(f"--eval-every {eval_every} is more than 2% of --steps {args.steps}")
    data = harness.start(args, corpus=True, task=False)
    started = time.monotonic()
    import torch

    from cpmctl.checkpoint import read_provenance
    from cpmctl.stages import inherit

    torch.set_num_threads(args.threads)
    lm = harness.prepare_lm_data(args.work, data.corpus, args.vocab)
    teacher_shape = harness.model_shape(args.teacher_layers, args.teacher_d, args.d_head)
    student_shape = harness.model_shape(2 * args.teacher_layers, 2 * args.teacher_d, args.d_head)
    title = (f"teacher {args.teacher_layers}x{args.teacher_d} ({args.teacher_steps} steps) -> student "
             f"{2 * args.teacher_layers}x{2 * args.teacher_d}, {args.steps} steps, batch {args.batch}x{args.seq_len}")
    print(f"# KI: {title}; {data.describe()}", flush=True)

    teacher_dir = args.work / "teacher" / "checkpoint"
    t0 = time.monotonic()
    if args.reuse_teacher and teacher_dir.is_dir():
        teacher = {**read_provenance(teacher_dir)["metrics"], "checkpoint": str(teacher_dir)}
    else:
        teacher = pretrain(args.work / "teacher", lm, args, steps=args.teacher_steps, lr=args.teacher_lr, seed=0,
                           eval_every=max(1, args.teacher_steps // 10), model=teacher_shape)
    print(f"teacher: {teacher['steps']} steps, val loss {teacher['final_eval_loss']:.4f}, {time.monotonic() - t0:.0f}s", flush=True)
    results_path = args.results or args.work / "results.json"
    report = {"benchmark": "ki", "machine": harness.machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "data": data.describe(), "title": title, "eval_every": eval_every,
              "teacher": {"shape": teacher_shape, "steps": teacher["steps"], "final_val_loss": teacher["final_eval_loss"],
                          "flops": teacher["flops"]},
              "student_shape": student_shape, "runs": {n: vars(arm) for n, arm in runs.items()}, "seeds": []}

    for seed in harness.seeds_of(args):
        grown = args.work / f"seed{seed}" / "grown-aki"
        if any(arm.grown for arm in runs.values()):
            inherit.run(inherit.InheritConfig(src=Path(teacher["checkpoint"]), out=grown, method="aki", seed=seed, force=True,
                                              to=",".join(f"{k}={v}" for k, v in student_shape.items())))
        curves = {}
        for name, arm in runs.items():
            t0 = time.monotonic()
            out = args.work / f"seed{seed}" / name
            summary = pretrain(out, lm, args, steps=args.steps, lr=args.lr, seed=seed, eval_every=eval_every,
                               init=grown if arm.grown else None, model=None if arm.grown else student_shape,
                               teacher=Path(teacher["checkpoint"]) if arm.temperature is not None else None, arm=arm)
            curves[name] = evaluations(out)
            print(f"seed {seed} {name}: val loss {curves[name][0]['loss']:.4f} at step {curves[name][0]['step']} -> "
                  f"{summary['final_eval_loss']:.4f}, {time.monotonic() - t0:.0f}s", flush=True)
        report["seeds"].append({"seed": seed, "curves": curves, "figures": seed_figures(curves, args.steps),
                                "seconds": {n: c[-1]["seconds"] for n, c in curves.items()}})
        report["total_seconds"] = time.monotonic() - started
        harness.write_results(results_path, report)

    report["total_seconds"] = time.monotonic() - started
    return finish(report, runs, temperatures, results_path, args)


def finish(report: dict, runs: dict[str, Arm], temperatures: list[float], results_path: Path, args) -> int:
    """Summary, verdicts and paired comparisons over the report's seeds: written, then printed."""
    names = list(runs)
    summary = summarise([s["figures"] for s in report["seeds"]], names)
    report["summary"] = summary
    report["targets"] = target_lines(summary, runs)
    report["comparisons"] = paired_comparisons([s["figures"] for s in report["seeds"]], comparison_pairs(runs, temperatures))
    scratch_final = harness.mean_ci(s["figures"]["targets"]["final"] for s in report["seeds"])
    report["student_passes_teacher"] = scratch_final.high < report["teacher"]["final_val_loss"]
    harness.write_results(results_path, report)
    if args.json:
        import json

        print(json.dumps(report, indent=2, default=harness._jsonable))
    else:
        print_report(report, names, scratch_final)
        print(f"\nresults {results_path}")
    if args.plot:
        plot(report, args.plot_file)
        print(f"plot {args.plot_file}")
    return 0


def print_report(report: dict, names: list[str], scratch_final) -> None:
    seeds = report["seeds"]
    print(f"\nKI: {report['title']}; {len(seeds)} seeds; evaluation every {report['eval_every']} steps")
    print(f"teacher val loss {report['teacher']['final_val_loss']:.4f}; scratch final {scratch_final.format('.4f')} "
          f"({'the student passes the teacher' if report['student_passes_teacher'] else 'the student does NOT pass the teacher'})")
    starts = [f"{n} seed {s['seed']}" for s in seeds for n in names
              if any(s["figures"]["runs"][n][k]["starts_below"] for k in TARGETS)]
    print("runs starting at or below a target: " + (", ".join(starts) if starts else "none"))
    rows = []
    for name in names:
        s = report["summary"][name]
        cells = [name]
        for key in TARGETS:
            for kind in ("step_speedup", "flop_speedup"):
                est = s[f"{key}_{kind}"]
                cells.append(est.format(".2f", "x") if est is not None else f"reached in {s[f'{key}_reached']}/{len(seeds)}")
        cells.append(s["final_loss"].format(".4f"))
        rows.append(cells)
    harness.print_table(["run", "steps, to final", "FLOPs, to final", "steps, to 50%", "FLOPs, to 50%", "final val loss"], rows)
    print()
    harness.print_targets(report["targets"])
    print()
    for line in report["comparisons"]:
        left = f" ({line['left_out']} seeds left out: a target not reached)" if line["left_out"] else ""
        print(f"paired: {line['comparison']}: {line['figure']}{left}: {line['verdict']}")


if __name__ == "__main__":
    sys.exit(main())
