"""Held-out perplexity of a trained dense LM with its linear layers quantized (`cpmctl quantize --linear`).

    .venv/bin/python benchmarks/quant_perplexity.py --work /tmp/quant_ppl [--steps 400] [--threads 1]
    .venv/bin/python benchmarks/quant_perplexity.py --work DIR --checkpoint CKPT --heldout FILE   (a model you have)

1. Splits ../shared/data/wordnet/corpus.txt by line (every --holdout-every'th gloss held out), trains
   a tokenizer and prepares shards from the training part, and pre-trains a decoder-only SwiGLU LM
   on them (`benchmarks/relufy_lm.py`'s steps; the defaults are that benchmark's model: 4 layers,
   d 256, d_ff 1024, vocabulary 4,000). With --checkpoint, that model instead.
2. Writes the quantized checkpoints with the stage's library call (`quantize_checkpoint(linear=...)`):
   int8 (one scale per output row) and int4 with groups of 32, 64 (the default) and 128.
3. Evaluates every variant (and the fp32 model loaded as bf16, for scale) on the same --eval-docs
   held-out glosses: token-weighted LM loss -> perplexity, and the change against fp32.
Targets (issue 26): int8 <= +0.5%, int4 <= +3%. Figures go to stdout and WORK/results.json.
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
from moefy_relu import add_lm_arguments, prepare_data, split_corpus  # noqa: E402
from relufy_lm import pretrain  # noqa: E402

TARGETS = {"int8": 0.005, "int4": 0.03}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    add_lm_arguments(parser, steps=400)
    parser.add_argument("--checkpoint", type=Path, help="a trained dense decoder (with its tokenizer/) instead of training one")
    parser.add_argument("--heldout", type=Path, help="with --checkpoint: held-out text, one document per line")
    parser.add_argument("--groups", default="32,64,128", help="int4 group sizes to evaluate")
    parser.add_argument("--eval-docs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.checkpoint is None) != (args.heldout is None):
        parser.error("--checkpoint and --heldout go together")

    import torch

    import cpmctl.moefication as mf
    from cpmctl.checkpoint import load_model
    from cpmctl.offload import checkpoint_weight_bytes
    from cpmctl.quantize import quantize_checkpoint, quantize_output
    from cpmctl.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"benchmark": "quant_perplexity", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": cpu_model(), "torch": torch.__version__, "threads": args.threads,
                     "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"# {results['machine']}, torch {torch.__version__}, {args.threads} threads, {results['date']}", flush=True)

    def save() -> None:
        (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))

    if args.checkpoint is not None:
        dense, held = args.checkpoint, args.heldout
    else:
        train, held = split_corpus(args.data, args.work, args.holdout_every)
        tok_dir, shards = prepare_data(train, args.work, args.vocab)
        dense = args.work / "swiglu-lm" / "checkpoint"
        if not dense.exists():
            t0 = time.perf_counter()
            dense, summary = pretrain(args.work, tok_dir, shards, args)
            results["pretrain"] = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
            results["pretrain_s"] = round(time.perf_counter() - t0, 1)
            print(f"pretrain: {results['pretrain_s']} s", flush=True)
            save()
    texts = [line for line in Path(held).read_text(encoding="utf-8").splitlines() if line.strip()][: args.eval_docs]

    variants: dict[str, tuple[str, int | None] | None] = {"fp32": None, "int8": ("int8", None)}
    for group in (int(g) for g in args.groups.split(",")):
        variants[f"int4 g{group}"] = ("int4", group)
    paths = {"fp32": dense}
    for name, spec in variants.items():
        if spec is None:
            continue
        out = args.work / ("q-" + name.replace(" ", "-"))
        if not out.exists():
            quantize_checkpoint(dense, out, linear=spec[0], group_size=spec[1])
        paths[name] = out

    rows = None
    results["variants"] = {}
    base = None
    # the int8 variant again with its output projection quantized too (at load), as llama.cpp's q8_0 does
    output_variants = {"int8 + int8 output projection": ("int8", None)}
    for name, path in [*paths.items(), *((name, paths["int8"]) for name in output_variants),
                       ("bf16 (fp32 weights loaded as bf16)", dense)]:
        model, ckpt = load_model(path, dtype=torch.bfloat16 if name.startswith("bf16") else None)
        ckpt.close()
        if name in output_variants and not quantize_output(model, *output_variants[name]):
            continue  # a tied (or biased) output projection stays float
        if rows is None:
            rows = mf.encode_documents(texts, load_tokenizer(Path(dense) / "tokenizer"), model.config, args.seq_len)
            results["eval_rows"], results["eval_tokens"] = len(rows), sum(len(r) - 1 for r in rows)
        t0 = time.perf_counter()
        quality = mf.evaluate(model, rows, 16)
        ppl = quality["perplexity"]
        base = ppl if base is None else base
        weight_bytes = checkpoint_weight_bytes(path)
        if name in output_variants:  # the stored fp32 projection, replaced by int8 values and bf16 row scales
            out_f, in_f = model.lm_head.proj.out_features, model.lm_head.proj.in_features
            weight_bytes += out_f * in_f + 2 * out_f - 4 * out_f * in_f
        entry = {"perplexity": round(ppl, 4), "loss": round(quality["loss"], 6), "vs_fp32": round(ppl / base - 1, 6),
                 "weight_bytes": weight_bytes, "eval_s": round(time.perf_counter() - t0, 2)}
        scheme = name.split()[0]
        if scheme in TARGETS:
            entry["target"] = f"<= +{TARGETS[scheme]:.1%}"
            entry["met"] = entry["vs_fp32"] <= TARGETS[scheme]
        results["variants"][name] = entry
        print(f"{name}: perplexity {ppl:.4f} ({entry['vs_fp32']:+.3%} vs fp32), weights {entry['weight_bytes']:,} B"
              + (f", target {entry['target']}: {'met' if entry['met'] else 'missed'}" if "met" in entry else ""), flush=True)
        save()
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
