"""Peak memory and wall time of `cpmctl convert hf` against transformers' load + save, on a random
Qwen2-shaped model of about 1.5B parameters in bf16, saved by transformers in 4 shards.

    .venv/bin/python benchmarks/convert_hf.py [--workdir DIR] [--layers 28] [--out FILE]

The model (Qwen2-1.5B's shape, every weight random, built on the meta device and materialised in
bf16; nothing is downloaded) is saved with `save_pretrained(max_shard_size=...)` into 4 shards.
Then, each in a subprocess of its own, with the source files already in the page cache:
  - cpmctl:       `python -m cpmctl convert hf SRC OUT`
  - transformers: `AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)` then
                  `save_pretrained(OUT)`
Peak RSS is the child's ru_maxrss (wait4); peak anonymous and file-backed resident memory come
from sampling /proc/PID/status (RssAnon, RssFile, and VmHWM as a cross-check) every 20 ms. The
source is built in a spawned process and this one never imports torch: Linux carries a process's
peak RSS across fork + exec into the child's ru_maxrss, so a large parent would inflate both. Ratios are cpmctl / transformers
from the same run (target: peak RSS <= 0.5). Figures are written as JSON (stdout, and --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This script's folder first on sys.path would let benchmark file names shadow installed modules.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

# Qwen2-1.5B's shape (1.54B parameters with the tied head).
QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0)
SHARDS = 4
SAMPLE_S = 0.02

TRANSFORMERS_CONVERT = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
"""


def build_source(src: Path, layers: int, seed: int) -> dict:
    """A random bf16 Qwen2 model saved by transformers in SHARDS shards; returns its facts."""
    import torch
    import transformers

    config = transformers.Qwen2Config(**dict(QWEN2_1_5B, num_hidden_layers=layers))
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gave the head a storage of its own; tied, it is not saved
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.normal_(0.0, 0.02, generator=gen)
    params = sum(p.numel() for p in model.parameters())
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied: not saved
    total = sum(t.numel() * t.element_size() for t in state.values())
    model.save_pretrained(src, max_shard_size=shard_limit(state, total))
    del model
    shards = sorted(src.glob("model-*.safetensors"))
    return {"parameters": params, "weights_bytes": total, "shards": len(shards),
            "largest_shard_bytes": max(p.stat().st_size for p in shards)}


def shard_limit(state: dict, total: int) -> int:
    """The smallest max_shard_size (in 1% steps above total / SHARDS) that save_pretrained's
    splitter (huggingface_hub's, which it calls) turns into SHARDS shards."""
    from huggingface_hub import split_torch_state_dict_into_shards

    for percent in range(100, 200):
        limit = total * percent // (100 * SHARDS)
        if len(split_torch_state_dict_into_shards(state, max_shard_size=limit).filename_to_tensors) == SHARDS:
            return limit
    raise SystemExit(f"error: no max_shard_size gives {SHARDS} shards")


def warm_page_cache(src: Path) -> None:
    """Read the source once so neither contender pays the first disk read."""
    for path in sorted(src.iterdir()):
        with open(path, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def measure(machine, argv: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Run `argv`; wall time, peak RSS (ru_maxrss) and sampled peaks of RssAnon / RssFile, in MiB."""
    run = machine.run_with_memory(argv, env=env, cwd=cwd, every_s=SAMPLE_S)
    if run["rc"] != 0:
        raise SystemExit(f"error: {' '.join(argv)} exited {run['rc']}:\n{run['stdout'].decode(errors='replace')[-2000:]}")
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    return {"wall_s": round(run["wall_s"], 2), "peak_rss_mib": mib(run["peak_rss"]),
            "sampled_vmhwm_mib": mib(run["peak_VmHWM"]), "peak_rss_anon_mib": mib(run["peak_RssAnon"]),
            "peak_rss_file_mib": mib(run["peak_RssFile"])}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where the models go (default: a temporary directory; needs ~10 GB)")
    parser.add_argument("--layers", type=int, default=QWEN2_1_5B["num_hidden_layers"], help="decoder layers (28: ~1.5B parameters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON figures here")
    args = parser.parse_args(argv)

    spec = importlib.util.spec_from_file_location("bench_machine", HERE / "machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)

    with tempfile.TemporaryDirectory(prefix="cpmctl-bench-convert-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        src = tmp / "qwen2-src"
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # torch stays out of this process
            built = pool.apply(build_source, (src, args.layers, args.seed))
        if built["shards"] != SHARDS:
            raise SystemExit(f"error: transformers wrote {built['shards']} shards, expected {SHARDS}")
        warm_page_cache(src)
        env = child_env()
        ours = measure(machine, [sys.executable, "-m", "cpmctl", "convert", "hf", str(src), str(tmp / "cpmctl-out")], env, tmp)
        with open(tmp / "cpmctl-out" / "cpmctl.json", encoding="utf-8") as fh:
            provenance = json.load(fh)
        theirs = measure(machine, [sys.executable, "-c", TRANSFORMERS_CONVERT, str(src), str(tmp / "hf-out")], env, tmp)
        results = {
            "benchmark": "convert_hf",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.cpu_model(),
            "cpus": os.cpu_count(),
            "command": " ".join([Path(sys.executable).name, "benchmarks/convert_hf.py", *(argv if argv is not None else sys.argv[1:])]),
            "model": dict(built, family="qwen2", dtype="bfloat16", layers=args.layers),
            "cpmctl": dict(ours, stored_dtype=provenance["dtype"], num_parameters=provenance["num_parameters"],
                           content_hash=provenance["content_hash"]),
            "transformers": theirs,
            "ratios_cpmctl_over_transformers": {
                "peak_rss": round(ours["peak_rss_mib"] / theirs["peak_rss_mib"], 3),
                "peak_rss_anon": round(ours["peak_rss_anon_mib"] / max(theirs["peak_rss_anon_mib"], 1e-9), 3),
                "wall_time": round(ours["wall_s"] / theirs["wall_s"], 3),
            },
        }
        results["target_peak_rss_le_0.5x"] = "met" if results["ratios_cpmctl_over_transformers"]["peak_rss"] <= 0.5 else "missed"
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
