"""A trained MoE to measure offloading on (benchmark only), and what its routing allows a cache.

    .venv/bin/python benchmarks/trained_moe.py train [--work runs/bench-trained-moe] [--threads 1]
    .venv/bin/python benchmarks/trained_moe.py measure [--work runs/bench-trained-moe] [--json]
    .venv/bin/python benchmarks/trained_moe.py speed [--work runs/bench-trained-moe] [--json]   (after measure)

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


def measure(args) -> dict:
    import torch

    from cpmctl.checkpoint import load_model
    from cpmctl.quantize import quantize_checkpoint
    from cpmctl.tokenizer import load_tokenizer

    ckpt_dir = args.work / "moe" / "checkpoint"
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
        qdir = args.work / f"moe-{scheme}"
        quantize_checkpoint(ckpt_dir, qdir, experts=scheme, group_size=64 if scheme == "int4" else None, overwrite=True)
        qmodel, qckpt = load_model(qdir)
        ppl[scheme] = perplexity(qmodel, args.work / "shards", args.seq_len, args.ppl_batches)
        qckpt.close()
    out["perplexity"] = {k: round(v, 4) for k, v in ppl.items()}
    out["perplexity_increase"] = {k: round(ppl[k] / ppl["fp32"] - 1, 5) for k in ("int8", "int4")}
    torch.set_num_threads(args.threads)
    return out


def speed(args) -> dict:
    """Decode tokens/s of the trained MoE, resident and offloaded to disk with slots for 25% and 50% of the experts,
    fp32 and int8/int4 experts, batch 1 and 8 (held-out prompts), with the expert bytes moved per
    generated token. One run each, in one process, so the ratios compare like with like."""
    import torch

    from cpmctl.checkpoint import load_model
    from cpmctl.generate import generate
    from cpmctl.offload import checkpoint_weight_bytes, load_offloaded
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(args.work / "tokenizer")
    out = {}
    for scheme in ("fp32", "int8", "int4"):
        path = args.work / "moe" / "checkpoint" if scheme == "fp32" else args.work / f"moe-{scheme}"
        model, ckpt, engine = load_offloaded(path, mode="disk", budget=checkpoint_weight_bytes(path), device=torch.device("cpu"), dtype=None)
        arithmetic = {k: engine.stats()[k] for k in ("resident_bytes", "slot_bytes", "units")}
        engine.close()
        ckpt.close()
        out[f"{scheme} arithmetic"] = arithmetic
        for batch in (1, 8):
            prompts = torch.tensor(held_out_prompts(tok, batch, 16))
            for setting in ("resident", "25%", "50%"):
                if setting == "resident":
                    model, ckpt = load_model(path)
                    engine = None
                else:  # resident weights + slots for that share of the experts (this small model is mostly embeddings)
                    budget = arithmetic["resident_bytes"] + round(int(setting[:-1]) / 100 * arithmetic["units"]) * arithmetic["slot_bytes"]
                    model, ckpt, engine = load_offloaded(path, mode="disk", budget=budget, device=torch.device("cpu"), dtype=None)
                try:
                    with torch.no_grad():
                        generate(model, prompts, max_new_tokens=2)  # warm-up
                        moved = engine.cache.bytes_moved if engine else 0
                        start = time.perf_counter()
                        tokens, _ = generate(model, prompts, max_new_tokens=args.new_tokens)
                        seconds = time.perf_counter() - start
                    row = {"tokens_per_s": round(batch * args.new_tokens / seconds, 2)}
                    if engine is not None:
                        stats = engine.stats()
                        row.update(slots=stats["slots"], units=stats["units"], hit_rate=stats["hit_rate"],
                                   expert_bytes_per_token=round((engine.cache.bytes_moved - moved) / (batch * args.new_tokens)))
                    out[f"{scheme} batch{batch} {setting}"] = row
                finally:
                    if engine is not None:
                        engine.close()
                    ckpt.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("train", "measure", "speed"))
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not CORPUS.is_file():
        print(f"error: {CORPUS} not found", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = {"train": train, "measure": measure, "speed": speed}[args.phase](args)
    record = {"benchmark": f"trained_moe {args.phase}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": cpu_model(), "threads": args.threads, "wall_s": round(time.monotonic() - started, 1), "result": result}
    (args.work / f"{args.phase}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2 if not args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
