"""Forward and greedy-generation speed of imported Qwen2- and Gemma-2-shaped models (~100M
parameters, random weights) in cpmctl against transformers, on CPU in fp32.

    .venv/bin/python benchmarks/hf_families.py [--runs 5] [--batch 4] [--seq 256] [--new-tokens 32] [--out FILE]

For each family: a random transformers model is saved, imported with `cpmctl.hf.import_hf`, and
the outputs are compared first (logits max abs diff; greedy tokens identical) before anything
is timed. Timed pairs alternate which model runs first; the reported ratio is the median of the
per-pair ratios transformers / cpmctl (>= 1.0: cpmctl is not slower). Figures are written as
JSON (stdout, and --out when given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow
# the PyPI package `kernels` that transformers imports: the folder goes, the project root comes.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

SHAPES = {
    # ~100M parameters each: a small vocabulary keeps the embedding from dominating.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=8,
        num_key_value_heads=4, head_dim=96, max_position_embeddings=2048, sliding_window=128,
        query_pre_attn_scalar=96, attn_implementation="eager")),
}



def bench(name: str, args, tmp: Path) -> dict:
    import torch
    import transformers

    from cpmctl import hf
    from cpmctl.checkpoint import load_model
    from cpmctl.generate import generate
    from cpmctl.gpu_check.measure import alternating_seconds  # order flips every pair: both share the drift

    cfg_cls, model_cls, kwargs = SHAPES[name]
    kwargs = dict(kwargs)
    attn = kwargs.pop("attn_implementation", None)
    config = getattr(transformers, cfg_cls)(**kwargs, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    ref = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # every parameter random (norms too), at scales that keep activations O(1)
        for pname, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.2 if p.dim() == 1 else (0.5 if "embed" in pname else p.shape[1] ** -0.5)))
    if attn:
        ref.config._attn_implementation = attn
    ref.eval()
    ref.save_pretrained(tmp / name)
    ours, handle = load_model(hf.import_hf(tmp / name, tmp / f"{name}-ck"))
    handle.close()
    ours.eval()
    params = sum(p.numel() for p in ours.parameters())

    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    prompt = ids[:1, :32]
    with torch.inference_mode():
        diff = float((ref(input_ids=ids).logits - ours(ids)).abs().max())
        want = ref.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens)[0, 32:]
        got, _ = generate(ours, prompt, max_new_tokens=args.new_tokens)
    same_tokens = want.tolist() == got[0].tolist()

    def hf_forward():
        with torch.inference_mode():
            ref(input_ids=ids, use_cache=False)

    def our_forward():
        with torch.inference_mode():
            ours(ids)

    def hf_generate():
        with torch.inference_mode():
            ref.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def our_generate():
        generate(ours, prompt, max_new_tokens=args.new_tokens)

    out = {"parameters": params, "logits_max_abs_diff": diff, "greedy_tokens_identical": same_tokens}
    for what, (a, b) in {"forward": (hf_forward, our_forward), "generate": (hf_generate, our_generate)}.items():
        t_hf, t_ours = alternating_seconds(a, b, torch.device("cpu"), pairs=args.runs)
        out[what] = {"transformers_s": statistics.median(t_hf), "cpmctl_s": statistics.median(t_ours),
                     "ratio": statistics.median(x / y for x, y in zip(t_hf, t_ours))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed pairs per measurement")
    parser.add_argument("--batch", type=int, default=4, help="forward batch size")
    parser.add_argument("--seq", type=int, default=256, help="forward sequence length")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated after a 32-token prompt")
    parser.add_argument("--families", default="qwen2,gemma2", help="comma-separated: qwen2, gemma2")
    parser.add_argument("--out", type=Path, help="also write the figures (JSON) here")
    args = parser.parse_args()

    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_machine", HERE / "machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    cpu_model = machine.cpu_model

    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_model(),
               "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families.split(","):
            results["families"][name] = bench(name, args, Path(tmp))
            print(json.dumps({name: results["families"][name]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
