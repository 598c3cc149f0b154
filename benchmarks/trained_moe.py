"""A trained MoE to measure offloading on (benchmark only), and what its routing allows a cache.

    .venv/bin/python benchmarks/trained_moe.py train [--work runs/bench-trained-moe] [--threads 1]
    .venv/bin/python benchmarks/trained_moe.py measure [--work runs/bench-trained-moe] [--json]
    .venv/bin/python benchmarks/trained_moe.py speed [--work runs/bench-trained-moe] [--json]   (after measure)
    .venv/bin/python benchmarks/trained_moe.py scale [--work runs/bench-trained-moe]   (after train: the ~2 GB model)
    .venv/bin/python benchmarks/trained_moe.py measure|speed --model scaled [...]     (the same on the scaled model)

`train` makes the MoE with cpmctl itself, on real text (../shared/data/wordnet/corpus.txt):
1. a unigram tokenizer and token shards (as benchmarks/ki.py makes them);
2. a small dense decoder (RMS norm, rotary, SwiGLU) pre-trained for --dense-steps;
3. upcycled into --experts experts per layer (`growth.upcycle_moe`, what `inherit --to-moe`
   does: every expert a copy of the FFN, orthogonal router with gain 0.01), with top-2 routing
   instead of top-1: the softmax over the two chosen logits gives the routers a gradient (top-1's
   weight is exactly 1, so its router would never learn), and two equal copies weighted by a
   softmax still compute the dense FFN, so the start is function-preserving;
4. pre-trained --moe-steps more, so that experts and routers specialise.

`measure` records decode routing traces of the trained MoE (batch 1 and 8, held-out glosses as
prompts) and reports per trace: expert-use skew, token-to-token reuse, Belady's MIN hit rate at
10%, 25% and 50% of the experts, LRU, LFU (cpmctl's policy), the InfMoE order (FIFO) against it,
and the precision/recall of pre-gated prefetching. It also reports held-out perplexity of the
fp32 model and of its int8 / int4 (group 64) expert quantizations (`cpmctl quantize`).
`speed` times decoding (see `speed`).

`scale` builds a ~2 GB checkpoint from the trained MoE by tiling its learned layers, experts and
routers (`scaled_tensors`; defaults: layers x5, each expert cut into 4 blocks of neurons, each
block tiled 8 times, noise 0.01: 20 layers of 64 experts of 1,024 neurons, top-8, 2.0 GB fp32),
written one tensor at a time, and reports the held-out perplexity of both models and greedy
continuations of held-out prompts. `--model scaled` runs measure and speed on it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet" / "corpus.txt"
SHAPE = {"d_model": 128, "n_heads": 4, "n_kv_heads": 4, "d_head": 32, "d_ff": 512, "n_layers": 4}


def prepare_data(work: Path, vocab: int):
    from cpmctl.data import prepare
    from cpmctl.tokenizer import load_tokenizer, train_sentencepiece

    tok_dir, shards = work / "tokenizer", work / "shards"
    if not tok_dir.exists():
        train_sentencepiece(CORPUS, tok_dir, vocab, sentinels=0, input_sentence_size=200_000)
    tok = load_tokenizer(tok_dir)
    if not shards.exists():
        prepare(CORPUS, tok, shards, progress=False)
    return tok_dir, shards


def pretrain(out: Path, shards: Path, tok_dir: Path, args, *, steps: int, lr: float, init=None):
    from cpmctl.stages import pretrain as stage

    cfg = stage.PretrainConfig(
        out=out, data=shards, init=init, preset=None if init else "llama-tiny", tokenizer=tok_dir,
        model={} if init else {**SHAPE, "vocab_size": args.vocab, "max_positions": args.seq_len + 1},
        seq_len=args.seq_len, batch_size=args.batch, max_steps=steps, lr=lr, schedule="cosine",
        warmup_steps=max(steps // 20, 1), min_lr_ratio=0.1, weight_decay=0.01, eval_every=steps, eval_batches=10,
        log_every=50, seed=0, valid_fraction=0.01, force=True, progress=False)
    return stage.run(cfg)


def upcycle(dense: Path, out: Path, experts: int, top_k: int) -> Path:
    import torch

    from cpmctl.checkpoint import load_model, save_checkpoint
    from cpmctl.growth import upcycle_moe

    model, ckpt = load_model(dense)
    state, config = upcycle_moe({k: v.detach().clone() for k, v in model.state_dict().items()}, model.config, experts,
                                torch.Generator().manual_seed(0))
    config = config.replace(moe={**config.moe.__dict__, "top_k": top_k})
    ckpt.close()
    save_checkpoint(out, config, state, tokenizer_dir=dense / "tokenizer" if (dense / "tokenizer").is_dir() else None,
                    stage="benchmark-upcycle", parents=[dense], options={"experts": experts, "top_k": top_k}, overwrite=True)
    return out


def train(args) -> dict:
    tok_dir, shards = prepare_data(args.work, args.vocab)
    t0 = time.monotonic()
    dense = pretrain(args.work / "dense", shards, tok_dir, args, steps=args.dense_steps, lr=3e-3)
    upcycled = upcycle(Path(dense["checkpoint"]), args.work / "upcycled", args.experts, args.top_k)
    moe = pretrain(args.work / "moe", shards, tok_dir, args, steps=args.moe_steps, lr=1e-3, init=upcycled)
    return {"dense": dense, "moe": moe, "train_s": round(time.monotonic() - t0, 1)}


def scale_plan(config, *, repeat: int, split: int, width: int):
    """The scaled model's config, and for each of its layers the small model's layer it copies."""
    moe = config.moe
    if moe is None or moe.router != "linear" or moe.scoring != "softmax" or not moe.norm_topk or moe.shared_size:
        raise ValueError("scaling needs cpmctl's own linear top-k MoE (softmax over the selected logits)")
    if min(repeat, split, width) < 1 or moe.expert_size % split:
        raise ValueError(f"repeat, split and width must be >= 1 and split must divide expert_size {moe.expert_size}")
    size = moe.expert_size // split * width
    new = config.replace(n_layers=config.n_layers * repeat, d_ff=size,
                         moe={**moe.__dict__, "experts": moe.experts * split, "expert_size": size, "top_k": moe.top_k * split})
    return new, [j // repeat for j in range(new.n_layers)]


def scaled_tensors(state, config, *, repeat: int, split: int, width: int, noise: float, seed: int = 0):
    """The scaled model's state dict, its big tensors as LazyTensors over the small model's `state`
    (written one at a time: memory holds the small model and one scaled tensor), and its config.

    - Layers: layer l becomes the `repeat` consecutive layers l*repeat .. l*repeat+repeat-1, copies
      of it whose residual branches (attention output `attn.o`, experts' `w_out`) are divided by
      `repeat`: x + f(x) becomes `repeat` steps x + f(x)/repeat of the same block (an Euler-step
      approximation, not exact: each step sees the updated x).
    - Experts: expert e's neurons are cut into `split` blocks of expert_size/split; new expert
      e*split + b is block b tiled `width` times along the neurons (its w_out divided by `width`, so
      the tiles sum to the block), expert_size/split*width neurons each.
    - Routers: row e repeated `split` times (rows e*split .. e*split+split-1), top_k times `split`.
      Copies of a row give equal logits, so the top-(k*split) are the blocks of the k experts the
      small router chose, and the softmax over the selected logits gives each block 1/split of its
      expert's weight; w_out times `split` makes the blocks sum to the expert's output. With no
      noise and repeat 1 the scaled model computes the small one's function (up to float
      rounding). The routing is the learned one at `split` times finer grain: an expert's blocks
      are chosen together.
    - Noise: every expert weight and router row gets Gaussian noise of `noise` times the standard
      deviation of the (scaled) source tensor, seeded per written tensor, so no two experts, tiles
      or layer copies are equal; norms, embeddings, attention (attn.o divided) and the head are copied.
    """
    import torch

    from cpmctl.checkpoint import LazyTensor

    new, source_layer = scale_plan(config, repeat=repeat, split=split, width=width)
    block = config.moe.expert_size // split

    def noisy(t, sigma: float, index: int):
        if noise:
            t = t + torch.randn(t.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index)).to(t.dtype) * sigma
        return t.contiguous()

    out, index = {}, 0
    for name, t in state.items():
        parts = name.split(".")
        if not (name.startswith("decoder.blocks.") and len(parts) > 3 and parts[2].isdigit()):
            out[name] = t
            continue
        layer, rest = int(parts[2]), ".".join(parts[3:])
        for j in (j for j, src in enumerate(source_layer) if src == layer):
            key, index = f"decoder.blocks.{j}.{rest}", index + 1
            if rest in ("ffn.w_in", "ffn.w_gate", "ffn.w_out"):  # [experts, expert_size, d]
                scale = split / (width * repeat) if rest == "ffn.w_out" else 1.0
                blocks = t.reshape(config.moe.experts * split, block, t.shape[-1])  # row e*split+b: expert e's block b
                sigma = noise * scale * float(t.float().std())
                out[key] = LazyTensor(t.dtype, (blocks.shape[0], block * width, t.shape[-1]),
                                      lambda b=blocks, c=scale, s=sigma, i=index: noisy(b.repeat(1, width, 1) * c, s, i))
            elif rest == "ffn.router.weight":
                sigma = noise * float(t.float().std())
                out[key] = LazyTensor(t.dtype, (t.shape[0] * split, t.shape[1]),
                                      lambda r=t, s=sigma, i=index: noisy(r.repeat_interleave(split, 0), s, i))
            elif rest == "attn.o.weight":
                out[key] = t / repeat
            elif rest.startswith("ffn."):
                raise ValueError(f"scaling does not know how to tile {name}")
            else:
                out[key] = t
    return out, new


def scale(args) -> dict:
    """Write work/scaled: the trained MoE tiled to about 2 GB (`scaled_tensors`), then compare it
    with the small model: held-out perplexity and greedy continuations of held-out glosses."""
    import torch

    from cpmctl.checkpoint import load_model, save_checkpoint
    from cpmctl.generate import generate
    from cpmctl.tokenizer import load_tokenizer

    small_dir, out_dir = args.work / "moe" / "checkpoint", args.work / "scaled"
    small, ckpt = load_model(small_dir)
    state = {k: v.detach() for k, v in small.state_dict().items()}
    tensors, config = scaled_tensors(state, small.config, repeat=args.repeat, split=args.split, width=args.width,
                                     noise=args.noise, seed=0)
    options = {"repeat": args.repeat, "split": args.split, "width": args.width, "noise": args.noise, "seed": 0}
    t0 = time.monotonic()
    provenance = save_checkpoint(out_dir, config, tensors, tokenizer_dir=small_dir / "tokenizer" if (small_dir / "tokenizer").is_dir() else None,
                                 stage="benchmark-scale", parents=[small_dir], options=options, overwrite=True)
    write_s = time.monotonic() - t0
    del tensors
    tok = load_tokenizer(args.work / "tokenizer")
    prompts = torch.tensor(held_out_prompts(tok, 3, 12))
    result = {"small": str(small_dir), "scaled": str(out_dir), "options": options, "write_s": round(write_s, 1),
              "layers": config.n_layers, "experts": config.moe.experts, "expert_size": config.moe.expert_size,
              "top_k": config.moe.top_k, "num_parameters": provenance["num_parameters"],
              "weight_bytes": sum(f.stat().st_size for f in out_dir.glob("*.safetensors")),
              "content_hash": provenance["content_hash"], "perplexity": {}, "samples": {}}
    for label in ("small", "scaled"):
        model, handle = (small, ckpt) if label == "small" else load_model(out_dir)
        result["perplexity"][label] = round(perplexity(model, args.work / "shards", args.seq_len, args.ppl_batches), 3)
        with torch.no_grad():
            tokens, _ = generate(model, prompts, max_new_tokens=16)
        result["samples"][label] = [tok.decode(p.tolist()) + " ||| " + tok.decode(row.tolist()) for p, row in zip(prompts, tokens)]
        handle.close()
        del model
    return result


def held_out_prompts(tok, count: int, length: int):
    """Glosses from the end of the corpus (the validation side of the shards' order), as token rows."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()[-4000:]
    rows = []
    for line in lines[:: max(1, len(lines) // (4 * count))]:
        ids = tok.encode(line)
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == count:
            break
    return rows


def decode_trace(model, prompts, new_tokens: int):
    import torch

    from cpmctl.generate import generate
    from cpmctl.offload.trace import record_routing

    trace, handles = record_routing(model)
    try:
        with torch.no_grad():
            generate(model, torch.tensor(prompts), max_new_tokens=new_tokens)
    finally:
        for h in handles:
            h.remove()
    return trace


def routing_report(model, trace, layers: int) -> dict:
    from cpmctl.offload.policy import compare_policies, expert_skew, prefetch_quality, token_reuse

    units = layers * model.config.moe.experts
    decode_calls = [c for c, n in zip(trace.calls, trace.tokens)]
    paired = [(g, c) for g, c in zip(trace.guesses, trace.calls) if g is not None]
    return {
        "calls": len(decode_calls),
        "skew": expert_skew(decode_calls),
        "token_reuse": round(token_reuse(trace.steps(layers)), 4),
        "policies": compare_policies(decode_calls, units),
        "prefetch": {k: (round(v, 4) if isinstance(v, float) else v)
                     for k, v in prefetch_quality([g for g, _ in paired], [c for _, c in paired]).items()},
    }


def perplexity(model, shards: Path, seq_len: int, batches: int) -> float:
    """exp of the mean next-token loss over `batches` x 8 chunks of the validation split that
    pretrain held out (the same chunks: seq_len + 1 tokens, valid fraction 0.01, seed 0)."""
    import torch
    import torch.nn.functional as F

    from cpmctl.data import TokenShards

    valid = TokenShards(shards).sequences(seq_len + 1, split="valid", valid_fraction=0.01, seed=0)
    rows = torch.stack([torch.as_tensor(valid[i]).long() for i in range(min(len(valid), batches * 8))])
    losses = []
    with torch.no_grad():
        for chunk in rows.split(8):
            logits = model(chunk[:, :-1])
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1)).item())
    return math.exp(sum(losses) / len(losses))


def model_path(args, scheme: str) -> Path:
    """The checkpoint `measure` and `speed` use: the trained MoE or the scaled one, fp32 or with
    int8 / int4 (group 64) experts (written by `measure`)."""
    if scheme == "fp32":
        return args.work / "moe" / "checkpoint" if args.model == "moe" else args.work / "scaled"
    return args.work / f"{'moe' if args.model == 'moe' else 'scaled'}-{scheme}"


def measure(args) -> dict:
    import torch

    from cpmctl.checkpoint import load_model
    from cpmctl.quantize import quantize_checkpoint
    from cpmctl.tokenizer import load_tokenizer

    ckpt_dir = model_path(args, "fp32")
    model, ckpt = load_model(ckpt_dir)
    tok = load_tokenizer(args.work / "tokenizer")
    layers = sum(1 for _, _, f in model.ffn_modules() if hasattr(f, "route"))
    out = {"checkpoint": str(ckpt_dir), "experts": model.config.moe.experts, "top_k": model.config.moe.top_k, "layers": layers}
    for batch in (1, 8):
        prompts = held_out_prompts(tok, batch, 16)
        trace = decode_trace(model, prompts, args.new_tokens)
        out[f"batch{batch}"] = routing_report(model, trace, layers)
    ppl = {"fp32": perplexity(model, args.work / "shards", args.seq_len, args.ppl_batches)}
    ckpt.close()
    for scheme in ("int8", "int4"):
        qdir = model_path(args, scheme)
        quantize_checkpoint(ckpt_dir, qdir, experts=scheme, group_size=64 if scheme == "int4" else None, overwrite=True)
        qmodel, qckpt = load_model(qdir)
        ppl[scheme] = perplexity(qmodel, args.work / "shards", args.seq_len, args.ppl_batches)
        qckpt.close()
    out["perplexity"] = {k: round(v, 4) for k, v in ppl.items()}
    out["perplexity_increase"] = {k: round(ppl[k] / ppl["fp32"] - 1, 5) for k in ("int8", "int4")}
    torch.set_num_threads(args.threads)
    return out


def read_files(path: Path) -> None:
    """Read every weights file of `path` once (into the page cache)."""
    buf = bytearray(64 << 20)
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def speed(args) -> dict:
    """Decode tokens/s of the trained (or scaled) MoE, resident and offloaded to disk with slots for
    25% and 50% of the experts, fp32 and int8/int4 experts, batch 1 and 8 (held-out prompts), with
    the expert bytes moved per generated token, against accelerate's disk offload of the fp32
    model given the memory of cpmctl's fp32 25% budget, and against the I/O bound; one run each,
    in one process, so the ratios compare like with like.

    As benchmarks/int4_offload.py (whose helpers this reuses): every offloaded run starts with the
    checkpoint's files evicted from the page cache; the I/O bound is the cold read bandwidth of the
    same files (read once per checkpoint after the same eviction, in slot-sized preads) divided by
    the expert bytes read per generated token (prefill included), and the fraction is tokens/s over
    that bound. Only a run's first read of an expert comes from the disk; a miss on an expert it
    evicted earlier reads the page cache, so the page-cache bound (the same files read again, cached)
    is given beside it."""
    import shutil

    import torch

    from int4_offload import cold_read_bandwidth, decode, evict

    from cpmctl.checkpoint import load_model
    from cpmctl.gpu_check.offload_bench import accelerate_device_map
    from cpmctl.offload import checkpoint_weight_bytes, load_offloaded
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(args.work / "tokenizer")
    cpu = torch.device("cpu")
    prompts = {batch: torch.tensor(held_out_prompts(tok, batch, 16)) for batch in args.batches}
    out: dict = {}
    base: dict[int, float] = {}
    base_only = [] if "fp32" in args.schemes else ["fp32"]  # resident fp32 still runs: the ratios' base
    for scheme in base_only + list(args.schemes):
        path = model_path(args, scheme)
        model, ckpt, engine = load_offloaded(path, mode="disk", budget=checkpoint_weight_bytes(path), device=cpu, dtype=None)
        arithmetic = {k: engine.stats()[k] for k in ("resident_bytes", "slot_bytes", "units")}
        engine.close()
        ckpt.close()
        del model
        out[f"{scheme} arithmetic"] = arithmetic
        offloaded_rows = []
        # resident runs first, with the checkpoint's files read into the page cache (a resident
        # model is in memory: its first touches must not be disk reads); each offloaded run evicts
        settings = ("resident",) if scheme in base_only else ("resident", "25%", "50%")
        for setting, batch in [(s, b) for s in settings for b in args.batches]:
            if setting == "resident":
                if batch == args.batches[0]:
                    read_files(path)
                model, ckpt = load_model(path)
                engine = None
            else:  # resident weights + slots for that share of the experts
                budget = arithmetic["resident_bytes"] + round(int(setting[:-1]) / 100 * arithmetic["units"]) * arithmetic["slot_bytes"]
                out[f"{scheme} {setting} budget_bytes"] = budget
                evict(path)
                model, ckpt, engine = load_offloaded(path, mode="disk", budget=budget, device=cpu, dtype=None)
            try:
                moved = []
                rate = decode(model, prompts[batch], args.new_tokens,
                              lambda: moved.append(engine.cache.bytes_moved if engine is not None else 0))
                row = {"tokens_per_s": round(rate, 3)}
                if scheme == "fp32" and setting == "resident":
                    base[batch] = rate
                if batch in base:
                    row["vs_resident_fp32"] = round(rate / base[batch], 3)
                if engine is not None:
                    stats = engine.stats()
                    row.update(slots=stats["slots"], units=stats["units"], hit_rate=stats["hit_rate"],
                               load_ms_per_miss=stats["load_ms_per_unit"], prefetches=stats["prefetches"],
                               prefetch_precision=stats["prefetch_precision"],
                               expert_bytes_per_token=round((engine.cache.bytes_moved - moved[0]) / (batch * args.new_tokens)))
                    offloaded_rows.append(row)
                out[f"{scheme} batch{batch} {setting}"] = row
                print(f"# {scheme} batch{batch} {setting}: {row}", file=sys.stderr, flush=True)
            finally:
                if engine is not None:
                    engine.close()
                ckpt.close()
                del model
        if not offloaded_rows:
            continue
        bandwidth = cold_read_bandwidth(path, arithmetic["slot_bytes"])
        # the same files again, now in the page cache: misses of a run re-read experts it read before
        start = time.perf_counter()
        read_files(path)
        warm = sum(f.stat().st_size for f in path.glob("*.safetensors")) / (time.perf_counter() - start)
        out[f"{scheme} cold_read_mb_s"] = round(bandwidth / 1e6, 1)
        out[f"{scheme} page_cache_read_mb_s"] = round(warm / 1e6, 1)
        for row in offloaded_rows:
            per_token = row["expert_bytes_per_token"]
            bound = bandwidth / per_token if per_token else None
            row.update(io_bound_tokens_per_s=None if bound is None else round(bound, 2),
                       io_bound_fraction=None if bound is None else round(row["tokens_per_s"] / bound, 4),
                       page_cache_bound_tokens_per_s=None if bound is None else round(warm / per_token, 2),
                       page_cache_bound_fraction=None if bound is None else round(row["tokens_per_s"] * per_token / warm, 4))
    if args.accelerate and "fp32" in args.schemes:
        path, folder = model_path(args, "fp32"), args.work / "accelerate-offload"
        shutil.rmtree(folder, ignore_errors=True)
        budget = out["fp32 25% budget_bytes"]
        model, ckpt, placed = accelerate_device_map(path, cpu, budget, folder)
        try:
            for batch in args.batches:
                evict(folder, "**/*.dat")
                rate = decode(model, prompts[batch], args.new_tokens)
                ours = out[f"fp32 batch{batch} 25%"]["tokens_per_s"]
                row = {"tokens_per_s": round(rate, 3), "memory_bytes": budget, "placed": placed,
                       "vs_resident_fp32": round(rate / base[batch], 3),
                       "cpmctl_25pct_over_accelerate": {s: round(out[f"{s} batch{batch} 25%"]["tokens_per_s"] / rate, 2)
                                                        for s in args.schemes},
                       "cpmctl_fp32_50pct_over_accelerate": round(out[f"fp32 batch{batch} 50%"]["tokens_per_s"] / rate, 2)}
                out[f"accelerate batch{batch}"] = row
                print(f"# accelerate batch{batch}: {row} (cpmctl fp32 25%: {ours})", file=sys.stderr, flush=True)
        finally:
            ckpt.close()
            del model
            shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("train", "measure", "speed", "scale"))
    parser.add_argument("--model", choices=("moe", "scaled"), default="moe", help="measure/speed: the trained MoE or `scale`'s")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-trained-moe"))
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--moe-steps", type=int, default=300)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--ppl-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5, help="scale: each layer repeated this many times")
    parser.add_argument("--split", type=int, default=4, help="scale: each expert cut into this many experts (top_k times it)")
    parser.add_argument("--width", type=int, default=8, help="scale: each expert's neurons tiled this many times")
    parser.add_argument("--noise", type=float, default=0.01, help="scale: noise on experts and routers, times their std")
    parser.add_argument("--schemes", nargs="+", default=["fp32", "int8", "int4"], choices=("fp32", "int8", "int4"))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--no-accelerate", dest="accelerate", action="store_false", help="speed: skip accelerate's disk offload")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not CORPUS.is_file():
        print(f"error: {CORPUS} not found", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = {"train": train, "measure": measure, "speed": speed, "scale": scale}[args.phase](args)
    record = {"benchmark": f"trained_moe {args.phase}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": cpu_model(), "threads": args.threads, "wall_s": round(time.monotonic() - started, 1), "result": result}
    name = args.phase if args.model == "moe" or args.phase in ("train", "scale") else f"{args.phase}-scaled"
    record["command"] = "python benchmarks/trained_moe.py " + " ".join(sys.argv[1:])
    (args.work / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2 if not args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
