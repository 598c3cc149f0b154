"""An OLMoE-shaped random model of about 2 GB (64 experts, top-8): `cpmctl infer` resident and
`--offload disk` at 25% and 50% memory budgets, against transformers with accelerate's disk
offload (from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder)) on the
same model and budget, at batch 1 and batch 8.

    .venv/bin/python benchmarks/hf_moe_offload.py --work /tmp/hf_moe_offload

1. Preparation (once, in --work, never in the repository): transformers' OlmoeForCausalLM built
   from an OlmoeConfig (d 1024, 8 layers, 16 heads, 64 experts of 256 neurons, top-8, vocabulary
   32000), every weight random (N(0, 0.02)), saved in fp32 (~2 GB) with save_pretrained, then
   imported with `cpmctl convert hf`. eos is unset, so every run generates --new-tokens tokens.
2. Each run in its own process (OMP threads = --threads): load, one warm-up generate of 2
   tokens, then greedy generation of --new-tokens tokens from the same random --prompt-tokens
   prompts; tokens/s = batch x new tokens / wall seconds of that generate (prefill included,
   identical for every system). cpmctl runs use cpmctl.generate.generate (the loop `cpmctl infer`
   runs) on `load_model` (resident) or `load_offloaded` (disk, the budget in bytes); transformers
   uses model.generate(do_sample=False, min_new_tokens = max_new_tokens).
   Cold cache: right before each timed generate (after the warm-up) the run evicts every file
   its system reads from the page cache with posix_fadvise(POSIX_FADV_DONTNEED) (cpmctl: the
   checkpoint's safetensors; accelerate: the source safetensors and its offload_folder), so
   neither side starts from weights the page cache kept; `fincore` reports what stayed cached.
   Each run records the bytes it read from storage (/proc/self/io read_bytes) per generated
   token, and the main process measures the cold and warm read bandwidth of the checkpoint file.
3. Output: a markdown table on stdout and --work/results.json, with the greedy tokens of each
   run compared with the resident cpmctl run's, and the issue's target (offload >= 5x accelerate
   at batch 1 and 8) stated as met or missed. Figures are written before anything optional.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=256, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=512,
             eos_token_id=None, bos_token_id=None, pad_token_id=0, norm_topk_prob=False)


def prepare(work: Path) -> None:
    import torch
    import transformers

    from cpmctl import hf

    src, ck = work / "olmoe-hf", work / "olmoe-ck"
    if not (src / "config.json").is_file():
        torch.manual_seed(0)
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**SHAPE, initializer_range=0.02)).eval()
        model.save_pretrained(src)
    if not (ck / "config.json").is_file():
        hf.import_hf(src, ck)


def evict(paths) -> None:
    """Drop the files' clean pages from the page cache (no root needed for clean pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(paths) -> int:
    """Bytes of the files now in the page cache (util-linux fincore; 0 if it is missing)."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(int(line) for line in out.split())


def storage_read_bytes() -> int:
    """Bytes this process has had read from storage (not from the page cache)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def read_bandwidth(path: Path) -> dict:
    """Cold (after eviction) and warm (page-cached) sequential read rate of one file, 8 MiB preads."""
    rates = {}
    for kind in ("cold", "warm"):
        if kind == "cold":
            evict([path])
        fd = os.open(path, os.O_RDONLY)
        buf, offset, start = bytearray(8 << 20), 0, time.perf_counter()
        try:
            while (got := os.preadv(fd, [buf], offset)) > 0:
                offset += got
        finally:
            os.close(fd)
        rates[f"{kind}_bytes_per_s"] = round(offset / (time.perf_counter() - start))
    return rates


def system_files(work: Path, system: str) -> list[Path]:
    if system == "accelerate":
        return sorted((work / "olmoe-hf").glob("*.safetensors")) + sorted((work / "accelerate_offload").glob("*"))
    return sorted((work / "olmoe-ck").glob("*.safetensors"))


def prompts(batch: int, length: int):
    import torch

    return torch.randint(1, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(batch))


def run_one(args) -> None:
    """One measurement in this process: prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    ids = prompts(args.batch, args.prompt_tokens)
    started = time.perf_counter()
    engine = None
    if args.system == "accelerate":
        import transformers

        offload = work / "accelerate_offload"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            work / "olmoe-hf", device_map="auto", max_memory={"cpu": args.budget}, offload_folder=str(offload)).eval()

        def gen(n):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            return out[:, ids.shape[1]:]
    else:
        from cpmctl.checkpoint import load_model
        from cpmctl.generate import generate
        from cpmctl.offload import load_offloaded

        if args.system == "resident":
            model, _ = load_model(work / "olmoe-ck")
        else:
            model, _, engine = load_offloaded(work / "olmoe-ck", mode="disk", budget=args.budget, device=torch.device("cpu"),
                                              dtype=None)
        model.eval()

        def gen(n):
            with torch.inference_mode():
                return generate(model, ids, max_new_tokens=n)[0]
    load_s = time.perf_counter() - started
    gen(2)  # warm-up
    files = system_files(work, args.system)
    evict(files)
    left_cached = cached_bytes(files)
    read_before = storage_read_bytes()
    moved_before = load_before = 0.0
    if engine is not None:
        moved_before, load_before = engine.cache.bytes_moved, engine.cache.load_seconds
    start = time.perf_counter()
    tokens = gen(args.new_tokens)
    seconds = time.perf_counter() - start
    steps = args.new_tokens  # forward passes that produce the timed tokens (the first is the prefill)
    result = {"system": args.system, "batch": args.batch, "budget": args.budget, "load_s": round(load_s, 2),
              "seconds": round(seconds, 3), "tokens_per_s": round(args.batch * args.new_tokens / seconds, 3),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "tokens": tokens.tolist(),
              "cached_after_evict_bytes": left_cached,
              "storage_read_bytes_per_step": round((storage_read_bytes() - read_before) / steps)}
    if engine is not None:
        stats = engine.stats()
        result["offload"] = {k: stats[k] for k in ("slots", "units", "hit_rate", "bytes_moved", "weights_peak_bytes")}
        result["offload"]["bytes_moved_per_step"] = round((engine.cache.bytes_moved - moved_before) / steps)
        # the loader thread's busy time (reads and CRC checks) as a share of the timed wall time
        result["offload"]["loader_busy_share"] = round((engine.cache.load_seconds - load_before) / seconds, 3)
        engine.close()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_run"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf_moe_offload"))
    # one thread: on a shared 2-core machine two OpenMP threads wait on each other at every barrier
    # (measured 10-20x slower per token than one thread, for both systems)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--system", default="resident")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "_run":
        return run_one(args)
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": f"{REPO}:{REPO / 'kernels'}"}
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                    f"from benchmarks.hf_moe_offload import prepare; from pathlib import Path; prepare(Path({str(args.work)!r}))"],
                   env=env, check=True, cwd=REPO)
    weights = sum(f.stat().st_size for f in (args.work / "olmoe-hf").glob("*.safetensors"))
    bandwidth = read_bandwidth(next((args.work / "olmoe-ck").glob("*.safetensors")))
    print(json.dumps({"checkpoint_read": bandwidth, "load_average": os.getloadavg()}), flush=True)
    runs = []
    for batch in [int(b) for b in args.batches.split(",")]:
        plan = [("resident", 0)] + [(system, int(weights * float(f))) for f in args.fractions.split(",")
                                    for system in ("offload", "accelerate")]
        for system, budget in plan:
            cmd = [sys.executable, __file__, "_run", "--work", str(args.work), "--threads", str(args.threads),
                   "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
                   "--system", system, "--batch", str(batch), "--budget", str(budget)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                raise SystemExit(f"{system} batch {batch} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)
            runs.append(result)
    resident = {r["batch"]: r["tokens"] for r in runs if r["system"] == "resident"}
    for r in runs:
        r["tokens_equal_resident"] = r["tokens"] == resident[r["batch"]]
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_model(),
               "weights_bytes": weights, "shape": SHAPE, "threads": args.threads, "new_tokens": args.new_tokens,
               "prompt_tokens": args.prompt_tokens, "checkpoint_read": bandwidth,
               "load_average_end": os.getloadavg(), "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]}
    (args.work / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nOLMoE-shaped random model, {weights / 1e9:.2f} GB fp32, {summary['machine']}, {args.threads} threads, "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens\n")
    print(f"checkpoint read: cold {bandwidth['cold_bytes_per_s'] / 1e6:.0f} MB/s, warm {bandwidth['warm_bytes_per_s'] / 1e6:.0f} MB/s\n")
    print("| batch | system | budget | tokens/s | vs accelerate (same budget) | vs resident | tokens = resident | "
          "storage MB read / step | cpmctl MB moved / step | loader busy | peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    verdicts = []
    for r in runs:
        acc = next((a for a in runs if a["system"] == "accelerate" and a["batch"] == r["batch"] and a["budget"] == r["budget"]), None)
        ratio = r["tokens_per_s"] / acc["tokens_per_s"] if acc and r["system"] == "offload" else None
        if ratio is not None:
            verdicts.append((r["batch"], r["budget"], ratio))
        budget = "all" if r["system"] == "resident" else f"{r['budget'] / weights:.0%}"
        res = next(a for a in runs if a["system"] == "resident" and a["batch"] == r["batch"])
        off = r.get("offload")
        moved = f"{off['bytes_moved_per_step'] / 1e6:.0f}" if off else ""
        busy = f"{off['loader_busy_share']:.0%}" if off else ""
        vs_acc = "" if ratio is None else f"{ratio:.1f}x"
        print(f"| {r['batch']} | {r['system']} | {budget} | {r['tokens_per_s']:.2f} | {vs_acc} | "
              f"{r['tokens_per_s'] / res['tokens_per_s']:.2f} | {r['tokens_equal_resident']} | "
              f"{r['storage_read_bytes_per_step'] / 1e6:.0f} | {moved} | {busy} | {r['peak_rss_bytes'] / 1e9:.2f} |")
    for batch, budget, ratio in verdicts:
        print(f"target >= 5x accelerate, batch {batch}, budget {budget / weights:.0%}: {ratio:.1f}x "
              f"({'met' if ratio >= 5 else 'missed'})")


if __name__ == "__main__":
    main()
