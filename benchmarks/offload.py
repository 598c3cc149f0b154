"""`cpmctl infer --offload` on CPU against accelerate's disk offload, under the same memory budget.

    .venv/bin/python benchmarks/offload.py --work /tmp/offload_bench
    .venv/bin/python benchmarks/offload.py --work /tmp/offload_bench --repeats 2
    .venv/bin/python benchmarks/offload.py --work /tmp/offload_bench --batches 1 --repeats 3 --runs accelerate,resident,offload

1. Preparation (once; reused from --work, never written into the repository):
   a unigram sentencepiece tokenizer of --vocab pieces trained on the WordNet glosses; a dense
   decoder-only cpmctl model (--layers x --d, d_ff --d-ff, non-gated ReLU, RMS norm, rotary) with
   RANDOM weights (init_std 0.02; pre-training a 0.5 B-parameter model is out of reach on a
   2-core CPU, and a small gloss LM grown to this size ends every generation within a few
   tokens, so it would not decode 64 of them); saved in shards of --dense-shard-mib (accelerate
   reads a whole shard into RAM while it writes its offload folder); then `cpmctl moefy` (the
   stage function): experts of --expert-size neurons by parameter clustering, --top-k per token,
   centre router (no data: the routing of random weights carries no text statistics anyway).
   Prompts: WordNet glosses cut to exactly --prompt-tokens tokens (kept only when the cut text
   encodes back to the same ids, so every run sees the same unpadded prompts).
2. Budget: --budget-fraction of the MoE checkpoint's weight bytes (tensor data in its safetensors).
3. Per batch size, each run in its own subprocess (peak RSS is the child's own, from wait4):
   accelerate  the dense checkpoint under load_checkpoint_and_dispatch(max_memory={"cpu": budget},
               rest on "disk" in WORK/accelerate_offload), no_split_module_classes=["Block"],
               generated with cpmctl.generate.generate (the loop `cpmctl infer` uses, greedy,
               stopping at the model's eos as `cpmctl infer` does);
   dense       `cpmctl infer DENSE --json`: the model accelerate runs, fully resident (its
               outputs must equal accelerate's: a check that the baseline computes the same thing);
   resident    `cpmctl infer MOE --json` (all weights mapped from the checkpoint);
   offload     `cpmctl infer MOE --json --offload disk --memory-budget BYTES` (when the CLI has it);
   offload-noprefetch  the same with --no-prefetch (what the next layer's prefetch buys).
   tokens/s is cpmctl's own figure: generated tokens / seconds after the first token.
   --repeats N runs the whole list N times per batch size, in alternating order; the table gives
   the median tokens/s (every repeat's figure in brackets) and the largest peak RSS.
4. A markdown table (stdout), whether the greedy outputs agree (accelerate = dense resident,
   offload = resident MoE), the issue's targets met or missed, and WORK/results.json (or --out)
   with every run's command, statistics and a fingerprint of the cpmctl sources it ran.

Every child runs with OMP_NUM_THREADS=--threads and the driver lowers its own priority (nice 5);
the driver itself never imports torch, so forking it copies nothing into the children's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, run_with_memory  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "wordnet" / "corpus.txt"
GIB = 2**30


# -- sizes, read without torch ---------------------------------------------------------------------
def safetensors_data_bytes(path: Path) -> int:
    """Bytes of tensor data in one safetensors file (the header's offsets; no tensor is read)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return sum(end - begin for name, info in header.items() if name != "__metadata__"
               for begin, end in [info["data_offsets"]])


def checkpoint_weight_bytes(checkpoint: Path) -> int:
    return sum(safetensors_data_bytes(f) for f in sorted(checkpoint.glob("*.safetensors")))


def checkpoint_disk_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())


# -- preparation (child process) ------------------------------------------------------------------
def prepare(args) -> None:
    import torch

    from cpmctl.checkpoint import save_checkpoint
    from cpmctl.config import ModelConfig
    from cpmctl.model import build_model
    from cpmctl.stages.moefy import MoefyConfig, run as moefy
    from cpmctl.tokenizer import load_tokenizer, train_sentencepiece

    torch.set_num_threads(args.threads)
    work = args.work
    tok_dir, dense, moe = work / "tokenizer", work / "dense", work / "moe"
    t0 = time.perf_counter()
    if not tok_dir.exists():
        train_sentencepiece(args.data, tok_dir, args.vocab, sentinels=0, input_sentence_size=200_000, seed=args.seed)
    tok = load_tokenizer(tok_dir)
    print(f"tokenizer: {tok.vocab_size} pieces, {time.perf_counter() - t0:.1f} s", flush=True)
    if not dense.exists():
        t0 = time.perf_counter()
        config = ModelConfig(
            arch="decoder", vocab_size=tok.vocab_size, d_model=args.d, n_heads=args.d // 64, d_head=64, d_ff=args.d_ff,
            n_layers=args.layers, norm="rms", norm_position="pre", position="rotary", max_positions=1024,
            activation="relu", gated=False, bias=False, tie_embeddings=False, pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id, bos_token_id=None, init_std=0.02,
        )
        torch.manual_seed(args.seed)
        model = build_model(config)
        save_checkpoint(dense, config, model.state_dict(), tokenizer_dir=tok_dir, stage="benchmark",
                        options={"init": "random", "seed": args.seed}, max_shard_bytes=args.dense_shard_mib * 2**20)
        del model
        print(f"dense model (random init): {time.perf_counter() - t0:.1f} s", flush=True)
    if not moe.exists():
        t0 = time.perf_counter()
        moefy(MoefyConfig(checkpoint=dense, out=moe, expert_size=args.expert_size, top_k=args.top_k, split="cluster",
                          router="center", seed=args.seed))
        print(f"moefy: {time.perf_counter() - t0:.1f} s", flush=True)
    write_prompts(work, tok, args)


def write_prompts(work: Path, tok, args) -> None:
    """WORK/prompts-b{B}.jsonl: B glosses cut to exactly --prompt-tokens tokens each."""
    wanted = max(args.batches)
    chosen: list[str] = []
    with open(args.data, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i % 997 or not line.strip():  # spread over the corpus (it is ordered by synset)
                continue
            ids = tok.encode(line.strip())
            if len(ids) < args.prompt_tokens:
                continue
            text = tok.decode(ids[: args.prompt_tokens])
            if tok.encode(text) == ids[: args.prompt_tokens]:
                chosen.append(text)
            if len(chosen) == wanted:
                break
    if len(chosen) < wanted:
        raise SystemExit(f"only {len(chosen)} prompts of {args.prompt_tokens} tokens found in {args.data}")
    for b in args.batches:
        path = work / f"prompts-b{b}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen[:b]), encoding="utf-8")


# -- accelerate run (child process) ---------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: `5` to clear_refs), so a later VmHWM is the peak of one phase."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_accelerate(args) -> None:
    import torch
    from accelerate import infer_auto_device_map, load_checkpoint_and_dispatch

    from cpmctl.checkpoint import read_config
    from cpmctl.generate import generate
    from cpmctl.model import build_model
    from cpmctl.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    dense = args.work / "dense"
    offload_dir = args.work / "accelerate_offload"
    shutil.rmtree(offload_dir, ignore_errors=True)
    started = time.perf_counter()
    config = read_config(dense)
    model = build_model(config, device="meta").eval()
    device_map = infer_auto_device_map(model, max_memory={"cpu": args.budget}, no_split_module_classes=["Block"])
    model = load_checkpoint_and_dispatch(model, str(dense), device_map=device_map, offload_folder=str(offload_dir),
                                         no_split_module_classes=["Block"])
    load_seconds = time.perf_counter() - started
    after_load = proc_status()

    # What accelerate really keeps: materialised parameters (not on meta) and the modules whose
    # weights its hooks bring in from the offload folder at every forward.
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    offloaded = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta")
    hooked = [name for name, m in model.named_modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    on_disk = sorted({d for d in device_map.values()})
    offload_files = sum(f.stat().st_size for f in offload_dir.rglob("*") if f.is_file()) if offload_dir.exists() else 0

    tok = load_tokenizer(dense / "tokenizer")
    texts = [json.loads(line)["text"] for line in (args.work / f"prompts-b{args.batch}.jsonl").read_text().splitlines()]
    rows = [tok.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as `cpmctl infer` pads decoder-only prompts
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    reset = reset_peak_rss()
    tokens, stats = generate(model, ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                             eos_token_id=config.eos_token_id)
    during = proc_status()
    eos = config.eos_token_id  # cut as `cpmctl infer` cuts (before eos), so outputs compare as text
    outputs = [tok.decode(row[: row.index(eos)] if eos in row else row) for row in tokens.tolist()]
    shutil.rmtree(offload_dir, ignore_errors=True)  # 1.6 GB of copies; rewritten by every run anyway
    print(json.dumps({
        "stats": {
            "load_seconds": round(load_seconds, 3),
            "generated_tokens": stats["generated_tokens"],
            "time_to_first_token": round(stats["time_to_first_token_s"], 4),
            "tokens_per_second": round(stats["generated_tokens"] / stats["decode_s"], 2) if stats["decode_s"] else None,
            "steps": stats["steps"],
        },
        "accelerate": {
            "devices": on_disk, "modules_on_disk": len(hooked), "resident_weight_bytes": resident,
            "offloaded_weight_bytes": offloaded, "offload_folder_bytes": offload_files,
            "rss_after_load": after_load, "decode_peak_rss": during["VmHWM"] if reset else None, "rss_end": during,
            "prompt_tokens": [len(r) for r in rows],
        },
        "outputs": outputs,
    }))


# -- driver -----------------------------------------------------------------------------------------
SOURCES = ("cpmctl/offload/reader.py", "cpmctl/offload/cache.py", "cpmctl/offload/plan.py", "cpmctl/offload/engine.py",
           "cpmctl/stages/infer.py", "cpmctl/moe.py", "cpmctl/model.py", "cpmctl/generate.py")


def source_fingerprint() -> dict[str, str]:
    """The git commit and a hash of the files the runs execute (the working tree may be ahead of the
    commit while the engine is being written): a run whose sources changed midway shows it."""
    import hashlib

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    digest = hashlib.sha256()
    for name in SOURCES:
        path = REPO / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b""))
    return {"commit": head, "sources_sha256": digest.hexdigest()[:12]}


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run `cmd` (stderr to `log`); its stdout, exit status, wall time, and peak RSS: ru_maxrss from
    wait4 and the largest RssAnon / RssFile seen every 50 ms (file-backed pages are the
    memory-mapped checkpoint's)."""
    with log.open("w") as err:
        run = run_with_memory(cmd, env=env, cwd=REPO, stderr=err, every_s=0.05)
    return {"rc": run["rc"], "stdout": run["stdout"].decode("utf-8", "replace"), "wall_s": round(run["wall_s"], 1),
            "peak_rss": run["peak_rss"], "peak_rss_anon": run["peak_RssAnon"], "peak_rss_file": run["peak_RssFile"]}


def parse_json(stdout: str) -> dict:
    """The JSON object a child printed (the last line that parses, or the whole output)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        pass
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    start = stdout.find("{")
    return json.loads(stdout[start:]) if start >= 0 else {}


def cli_has_offload(cpmctl: Path) -> bool:
    out = subprocess.run([str(cpmctl), "infer", "--help"], capture_output=True, text=True, env=child_env(1),
                         cwd=REPO).stdout
    return "--offload" in out and "--memory-budget" in out


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_prepare", "_accelerate"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/offload_bench"))
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default WORK/results.json)")
    parser.add_argument("--data", type=Path, default=CORPUS)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=8192)
    parser.add_argument("--expert-size", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=13)
    parser.add_argument("--dense-shard-mib", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", default="accelerate,dense,resident,offload,offload-noprefetch",
                        help="comma list of accelerate, dense, resident, offload, offload-noprefetch "
                             "(the offload runs only when the CLI has --offload)")
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1, help="every run this many times, alternating the order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every run (another job shares this 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.work = args.work.resolve()

    if args.mode == "_prepare":
        return prepare(args)
    if args.mode == "_accelerate":
        return run_accelerate(args)

    os.nice(5)
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    python, cpmctl = sys.executable, Path(sys.executable).parent / "cpmctl"
    env = child_env(args.threads)
    common = ["--work", str(args.work), "--threads", str(args.threads), "--batches", ",".join(map(str, args.batches)),
              "--new-tokens", str(args.new_tokens), "--seed", str(args.seed)]
    dense, moe = args.work / "dense", args.work / "moe"
    if not (dense.exists() and moe.exists() and all((args.work / f"prompts-b{b}.jsonl").exists() for b in args.batches)):
        free = shutil.disk_usage(args.work).free
        if free < 8 * GIB:
            raise SystemExit(f"{args.work} has {free / GIB:.1f} GiB free; dense + MoE + accelerate's offload need ~7 GiB")
        t0 = time.perf_counter()
        prep = [python, __file__, "_prepare", *common, "--data", str(args.data), "--vocab", str(args.vocab),
                "--layers", str(args.layers), "--d", str(args.d), "--d-ff", str(args.d_ff), "--expert-size",
                str(args.expert_size), "--top-k", str(args.top_k), "--dense-shard-mib", str(args.dense_shard_mib),
                "--prompt-tokens", str(args.prompt_tokens)]
        subprocess.run(prep, check=True, env=env, cwd=REPO)
        print(f"preparation: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.prepare_only:
        return

    moe_bytes, dense_bytes = checkpoint_weight_bytes(moe), checkpoint_weight_bytes(dense)
    budget = int(args.budget_fraction * moe_bytes)
    moe_config = json.loads((moe / "config.json").read_text())
    runs = args.runs.split(",")
    has_offload = cli_has_offload(cpmctl)
    if not has_offload and any(r.startswith("offload") for r in runs):
        print("# `cpmctl infer` has no --offload yet: the offload runs are skipped", flush=True)
        runs = [r for r in runs if not r.startswith("offload")]
    baseline = measured([python, "-c", "import torch, accelerate, cpmctl.cli, cpmctl.model"], env, logs / "baseline.log")

    stamp = datetime.now(timezone.utc)
    print(f"# {cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS={args.threads}, nice 5, "
          f"{stamp:%Y-%m-%d %H:%M} UTC", flush=True)
    print(f"# MoE checkpoint {moe}: {moe_bytes / 1e9:.3f} GB of weights ({moe_bytes / GIB:.3f} GiB), "
          f"{checkpoint_disk_bytes(moe) / 1e9:.3f} GB on disk; {moe_config['n_layers']} layers, d {moe_config['d_model']}, "
          f"d_ff {moe_config['d_ff']}, {moe_config['moe']}", flush=True)
    print(f"# dense checkpoint {dense}: {dense_bytes / 1e9:.3f} GB of weights, {len(list(dense.glob('*.safetensors')))} shards", flush=True)
    print(f"# budget {args.budget_fraction:.0%} of the MoE weights = {budget} bytes ({budget / GIB:.3f} GiB); "
          f"python+torch+cpmctl+accelerate imported alone: peak RSS {gib(baseline['peak_rss'])} GiB", flush=True)

    results = []
    # Repeats alternate the order of the runs (forward, then backward), so a change in the load
    # of this shared machine during the benchmark does not fall on one competitor only.
    plan = [(rep, batch, run) for batch in args.batches for rep in range(args.repeats)
            for run in (runs if rep % 2 == 0 else runs[::-1])]
    for rep, batch, run in plan:
            prompts = args.work / f"prompts-b{batch}.jsonl"
            if run == "accelerate":
                cmd = [python, __file__, "_accelerate", *common, "--budget", str(budget), "--batch", str(batch)]
            else:
                cmd = [str(cpmctl), "infer", str(dense if run == "dense" else moe), "--input", str(prompts), "--max-new-tokens", str(args.new_tokens),
                       "--batch-size", str(batch), "--json", "--device", "cpu"]
                if run.startswith("offload"):
                    cmd += ["--offload", "disk", "--memory-budget", str(budget)]
                if run == "offload-noprefetch":  # the same without the next layer's prefetch
                    cmd += ["--no-prefetch"]
            log = logs / f"{run}-b{batch}-r{rep}.log"
            print(f"$ {' '.join(cmd)}", flush=True)
            source = source_fingerprint()
            m = measured(cmd, env, log)
            if m["rc"] != 0:
                print(f"  FAILED (exit {m['rc']}); stderr in {log}:\n" + log.read_text()[-2000:], flush=True)
                results.append({"run": run, "batch": batch, "repeat": rep, "cmd": cmd, "rc": m["rc"], "source": source})
                continue
            result = parse_json(m["stdout"])
            stats = result.get("stats", {})
            entry = {"run": run, "batch": batch, "repeat": rep, "cmd": cmd, "rc": 0, "source": source, "wall_s": m["wall_s"], "peak_rss": m["peak_rss"],
                     "peak_rss_anon": m["peak_rss_anon"], "peak_rss_file": m["peak_rss_file"], "stats": stats,
                     "accelerate": result.get("accelerate"),
                     "outputs": [o.get("generated", o) if isinstance(o, dict) else o for o in result.get("outputs", [])]}
            results.append(entry)
            extra = {k: v for k, v in stats.items() if k != "offload"}
            print(f"  {m['wall_s']} s wall, peak RSS {gib(m['peak_rss'])} GiB; stats {json.dumps(extra)}", flush=True)
            if "offload" in stats:
                print(f"  offload {json.dumps(stats['offload'])}", flush=True)
            if entry["accelerate"]:
                a = entry["accelerate"]
                print(f"  accelerate: devices {a['devices']}, {a['modules_on_disk']} modules on disk, resident weights "
                      f"{gib(a['resident_weight_bytes'])} GiB, offloaded {gib(a['offloaded_weight_bytes'])} GiB, "
                      f"offload folder {gib(a['offload_folder_bytes'])} GiB, RSS after load {gib(a['rss_after_load']['VmRSS'])} GiB, "
                      f"decode-phase peak RSS {gib(a['decode_peak_rss'])} GiB", flush=True)

    sources = {json.dumps(r["source"]) for r in results if "source" in r}
    if len(sources) > 1:
        print(f"# WARNING: the sources changed during the benchmark: {sorted(sources)}", flush=True)
    table = render_table(results)
    print(f"# sources: {', '.join(sorted(sources))}")
    print(table)
    verdicts = same_outputs(results) + targets(results)
    for line in verdicts:
        print(line)
    out = args.out or args.work / "results.json"
    out.write_text(json.dumps({
        "date_utc": f"{stamp:%Y-%m-%d %H:%M}", "machine": cpu_model(), "threads": args.threads,
        "moe_weight_bytes": moe_bytes, "dense_weight_bytes": dense_bytes, "budget_bytes": budget,
        "moe_config": moe_config, "baseline_import_peak_rss": baseline["peak_rss"], "args": {k: str(v) for k, v in vars(args).items()},
        "runs": results, "table": table, "targets": verdicts,
    }, indent=1))
    print(f"# written {out}")


def _ok(results, run, batch) -> list[dict]:
    return [r for r in results if r["run"] == run and r["batch"] == batch and r.get("rc") == 0]


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _tps(results, run, batch):
    """Median tokens/s of a run over its repeats."""
    return _median([r["stats"].get("tokens_per_second") for r in _ok(results, run, batch)])


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render_table(results: list[dict]) -> str:
    """One row per (run, batch): median tokens/s and first-token time over the repeats (each
    repeat's tokens/s in brackets when there are several), the largest peak RSS."""
    lines = ["| run | batch | generated tokens | tokens/s | vs accelerate | vs resident | first token s | peak RSS GiB "
             "(anon / file) | weights peak GiB | bytes moved GiB | hit rate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["batch"], r["run"]) for r in results))
    order = {run: i for i, run in enumerate(dict.fromkeys(r["run"] for r in results))}
    for batch, run in sorted(keys, key=lambda k: (k[0], order[k[1]])):
        done = _ok(results, run, batch)
        failed = [r for r in results if r["run"] == run and r["batch"] == batch and r.get("rc") != 0]
        if not done:
            lines.append(f"| {run} | {batch} | failed (exit {failed[0].get('rc')}) | | | | | | | | |")
            continue
        tps = _tps(results, run, batch)
        each = [r["stats"].get("tokens_per_second") for r in done]
        shown = f"{tps:.2f}" + (f" ({' / '.join(str(v) for v in each)})" if len(each) > 1 else "")
        if failed:
            shown += f", {len(failed)} failed"
        ttft = _median([r["stats"].get("time_to_first_token") for r in done])
        peak = max(done, key=lambda r: r["peak_rss"])
        off = done[-1]["stats"].get("offload") or {}
        hit = off.get("hit_rate")
        tokens = sorted({r["stats"].get("generated_tokens") for r in done}, key=str)
        lines.append(
            f"| {run} | {batch} | {' / '.join(map(str, tokens))} | {shown} | {_ratio(tps, _tps(results, 'accelerate', batch))} | "
            f"{_ratio(tps, _tps(results, 'resident', batch))} | {'-' if ttft is None else f'{ttft:.2f}'} | "
            f"{gib(peak['peak_rss'])} ({gib(peak['peak_rss_anon'])} / {gib(peak['peak_rss_file'])}) | "
            f"{gib(off.get('weights_peak_bytes'))} | {gib(off.get('bytes_moved'))} | {'-' if hit is None else f'{hit:.3f}'} |")
    return "\n".join(lines)


def same_outputs(results: list[dict]) -> list[str]:
    """Greedy outputs that must agree (in every repeat): accelerate's with the dense checkpoint
    resident, and the offloaded MoE's with the resident MoE."""
    out = []
    for batch in sorted({r["batch"] for r in results}):
        for run, reference in (("accelerate", "dense"), ("offload", "resident"), ("offload-noprefetch", "resident")):
            got, want = _ok(results, run, batch), _ok(results, reference, batch)
            if got and want:
                same = all(r["outputs"] == want[0]["outputs"] for r in got + want)
                out.append(f"batch {batch}: {run} outputs equal `cpmctl infer` {'on the dense checkpoint' if reference == 'dense' else 'of the resident MoE'}"
                           f" in every repeat: {'yes' if same else 'NO'}")
    return out


def targets(results: list[dict]) -> list[str]:
    out = []
    for batch in sorted({r["batch"] for r in results}):
        off, acc, res = (_tps(results, k, batch) for k in ("offload", "accelerate", "resident"))
        if off is None:
            continue
        if acc:
            out.append(f"batch {batch}: offload >= 5x accelerate: {'met' if off >= 5 * acc else 'missed'} ({off / acc:.2f}x)")
        if res:
            out.append(f"batch {batch}: offload within 2x of resident: {'met' if off * 2 >= res else 'missed'} "
                       f"(resident / offload = {res / off:.2f})")
    return out


if __name__ == "__main__":
    main()
