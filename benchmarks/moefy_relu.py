"""MoEfication of a ReLU language model pre-trained by cpmctl on WordNet glosses.

    .venv/bin/python benchmarks/moefy_relu.py --work /tmp/moefy_relu
    .venv/bin/python benchmarks/moefy_relu.py --work /tmp/moefy_relu --splits cluster,coactivation --calibrate 200

1. Splits ../shared/data/wordnet/corpus.txt by line: every --holdout-every'th gloss goes to
   WORK/heldout.txt, the rest to WORK/train.txt. Only the held-out file is used for the reported
   perplexities; the tokenizer, the pre-training and the routers never see it.
2. Trains a unigram sentencepiece tokenizer (--vocab pieces) and prepares token shards from
   train.txt (what `cpmctl tokenizer train` / `cpmctl data prepare` do).
3. `cpmctl pretrain` (the stage function) of a decoder-only model with non-gated ReLU FFNs
   (--layers x --d, d_ff --d-ff, RMS norm, rotary), causal LM, for --steps steps.
4. `cpmctl moefy` (the stage function) for each split: experts of --expert-size neurons, --ratio
   of them per token, MLP router trained on --max-docs glosses of train.txt, the report on
   --eval-docs glosses of heldout.txt (dense and MoE perplexity on the same rows), without
   calibration and, when --calibrate N > 0, with N calibration steps as well. --router takes a
   comma list (e.g. mlp,oracle: the oracle router is the upper bound of any router).
Before step 4 it measures the dense model's ReLU activation sparsity on the held-out glosses
(MoEfication relies on it: a token's few active neurons must fall in few experts).
Steps 2-3 are reused from WORK when present (--retrain to redo them). The table also goes to
WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet" / "corpus.txt"


def split_corpus(corpus: Path, work: Path, every: int) -> tuple[Path, Path]:
    """train.txt / heldout.txt: every `every`-th line held out (the corpus is ordered by synset,
    so a stride spreads the held-out glosses over the whole hierarchy)."""
    train, held = work / "train.txt", work / "heldout.txt"
    if not (train.exists() and held.exists()):
        lines = corpus.read_text(encoding="utf-8").splitlines()
        train.write_text("\n".join(l for i, l in enumerate(lines) if i % every) + "\n", encoding="utf-8")
        held.write_text("\n".join(l for i, l in enumerate(lines) if i % every == 0) + "\n", encoding="utf-8")
    return train, held


def prepare_data(train: Path, work: Path, vocab: int) -> tuple[Path, Path]:
    from cpmctl.data import prepare
    from cpmctl.tokenizer import load_tokenizer, train_sentencepiece

    tok_dir, shards = work / "tokenizer", work / "shards"
    if not tok_dir.exists():
        train_sentencepiece(train, tok_dir, vocab, sentinels=0, input_sentence_size=200_000)
    if not shards.exists():
        prepare(train, load_tokenizer(tok_dir), shards, progress=False)
    return tok_dir, shards


def pretrain(work: Path, tok_dir: Path, shards: Path, args) -> tuple[Path, dict]:
    from cpmctl.stages import pretrain as stage

    out = work / "relu-lm"
    model = {"d_model": args.d, "n_heads": args.d // 64, "n_kv_heads": args.d // 64, "d_head": 64, "d_ff": args.d_ff,
             "n_layers": args.layers, "activation": "relu", "gated": False, "max_positions": args.seq_len + 1}
    cfg = stage.PretrainConfig(
        out=out, data=shards, preset="llama-tiny", tokenizer=tok_dir, model=model, seq_len=args.seq_len,
        batch_size=args.batch, max_steps=args.steps, lr=args.lr, schedule="cosine", warmup_steps=max(1, args.steps // 20),
        min_lr_ratio=0.1, weight_decay=0.01, eval_every=max(1, args.steps // 4), eval_batches=20, log_every=50,
        seed=args.seed, valid_fraction=0.01, progress=False, force=True,
    )
    return out / stage.CHECKPOINT_DIR, stage.run(cfg)


def relu_sparsity(checkpoint: Path, held: Path, docs: int, seq_len: int) -> list[float]:
    """Per FFN layer, the share of neurons at exactly zero over the real tokens of the first
    `docs` held-out glosses (one batch at a time; bounded memory)."""
    import torch

    from cpmctl.checkpoint import load_model
    from cpmctl.tokenizer import load_tokenizer

    model, ckpt = load_model(checkpoint, dtype=torch.float32)
    model.eval()
    config = model.config
    tok = load_tokenizer(checkpoint / "tokenizer")
    texts = held.read_text(encoding="utf-8").splitlines()[:docs]
    rows = [r[:seq_len] for r in tok.encode_many(texts, add_eos=True) if len(r) >= 2]
    if config.bos_token_id is not None:
        rows = [[config.bos_token_id] + r[: seq_len - 1] for r in rows]
    ffns = [ffn for _, _, ffn in model.ffn_modules()]
    zeros, counts = [0] * len(ffns), [0] * len(ffns)
    keep = {}

    def hook(i):
        def count(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[keep["mask"]]
            h = module.hidden(x)
            zeros[i] += int((h == 0).sum())
            counts[i] += h.numel()
        return count

    handles = [ffn.register_forward_pre_hook(hook(i)) for i, ffn in enumerate(ffns)]
    try:
        with torch.no_grad():
            for start in range(0, len(rows), 64):
                batch = rows[start : start + 64]
                width = max(len(r) for r in batch)
                ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for j, r in enumerate(batch):
                    ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
                keep["mask"] = mask.reshape(-1).bool()
                model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        ckpt.close()
    return [z / max(1, c) for z, c in zip(zeros, counts)]


def add_lm_arguments(parser: argparse.ArgumentParser, *, steps: int) -> None:
    """The small LM's data, shape and pre-training options, shared by the LM benchmarks."""
    parser.add_argument("--data", type=Path, default=CORPUS)
    parser.add_argument("--holdout-every", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=2e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    add_lm_arguments(parser, steps=800)
    parser.add_argument("--retrain", action="store_true", help="pre-train again even if WORK holds a model")
    parser.add_argument("--expert-size", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--router", default="mlp", help="comma list of routers (mlp, center, oracle)")
    parser.add_argument("--splits", default="cluster")
    parser.add_argument("--max-docs", type=int, default=2000)
    parser.add_argument("--eval-docs", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32768, help="reservoir of FFN inputs per layer for the router")
    parser.add_argument("--router-epochs", type=int, default=10)
    parser.add_argument("--calibrate", type=int, default=0, help="also run with N calibration steps (0: uncalibrated only)")
    parser.add_argument("--calibrate-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine OpenMP spinning makes 2 threads several times slower)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from cpmctl.stages.moefy import MoefyConfig, run

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    train, held = split_corpus(args.data, args.work, args.holdout_every)
    t0 = time.perf_counter()
    tok_dir, shards = prepare_data(train, args.work, args.vocab)
    print(f"tokenizer + shards: {time.perf_counter() - t0:.1f} s", flush=True)

    dense = args.work / "relu-lm" / "checkpoint"
    if args.retrain or not dense.exists():
        t0 = time.perf_counter()
        dense, summary = pretrain(args.work, tok_dir, shards, args)
        print(f"pretrain: {time.perf_counter() - t0:.1f} s, {json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))})}",
              flush=True)
    print(f"# dense: {args.layers} layers, d {args.d}, d_ff {args.d_ff}, ReLU (non-gated), vocab {args.vocab}, "
          f"seq {args.seq_len}, batch {args.batch}, {args.steps} steps; train {train.name}, held out {held.name} "
          f"(every {args.holdout_every}th gloss)", flush=True)
    sparsity = relu_sparsity(dense, held, args.eval_docs, args.seq_len)
    print("# dense ReLU sparsity on the held-out glosses (share of neurons at 0), per layer: "
          + " ".join(f"{z:.3f}" for z in sparsity), flush=True)
    print(f"# moefy: experts of {args.expert_size}, {args.ratio:.0%} per token, routers {args.router} trained on "
          f"{args.max_docs} glosses of {train.name} (reservoir {args.max_tokens} FFN inputs per layer, "
          f"{args.router_epochs} epochs); perplexity on {args.eval_docs} glosses of {held.name}", flush=True)
    print("| split | router | experts per token | calibration steps | dense ppl | MoE ppl | increase | "
          "recall per layer | compute fraction | moefy wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for split in args.splits.split(","):
        for router in args.router.split(","):
            for steps in [0] + ([args.calibrate] if args.calibrate else []):
                cfg = MoefyConfig(checkpoint=dense, out=args.work / f"moe-{split}-{router}-{args.ratio}-cal{steps}",
                                  expert_size=args.expert_size, ratio=args.ratio, split=split, router=router,
                                  data=train, eval_data=held, max_docs=args.max_docs, eval_docs=args.eval_docs,
                                  max_tokens=args.max_tokens, epochs=args.router_epochs, seq_len=args.seq_len,
                                  calibrate=steps, calibrate_lr=args.calibrate_lr, seed=args.seed, force=True)
                wall = time.perf_counter()
                report = run(cfg)
                wall = time.perf_counter() - wall
                q = report["quality"]
                layers = report["layers"].values()
                recalls = " ".join(f"{layer['recall']:.3f}" for layer in layers)
                compute = sum(layer["compute_fraction"] for layer in layers) / len(layers)
                print(f"| {split} | {router} | top-{report['top_k']} of {report['experts']} | {steps} | "
                      f"{q['dense_perplexity']:.3f} | {q['moe_perplexity']:.3f} | {q['perplexity_increase']:+.2%} | "
                      f"{recalls} | {compute:.4f} | {wall:.1f} |", flush=True)
                results.append({"split": split, "router": router, "calibration_steps": steps, "top_k": report["top_k"],
                                "experts": report["experts"], "quality": q, "layers": report["layers"],
                                "timings": report.get("timings"), "wall_s": round(wall, 1)})
    (args.work / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "relu_sparsity": sparsity, "runs": results}, indent=1))
    for r in results:
        increase = r["quality"]["perplexity_increase"]
        verdict = "met" if increase <= 0.05 else "missed"
        print(f"target (MoE perplexity within 5% of dense) with {r['split']}, router {r['router']}, "
              f"{r['calibration_steps']} calibration steps: {verdict} ({increase:+.2%})")


if __name__ == "__main__":
    main()
