"""Section `decode`: compiled greedy decode (`infer --compile`: inductor over a static KV cache,
the decode step replayed as a CUDA graph) against eager decode of the same model, batch 1, bf16,
as a fraction of the memory-bandwidth bound (issue 26: target >= 80%).

A Llama-shaped model of TinyLlama's width with 12 layers (0.8 B parameters, random weights): the
graph's compile time grows with its layers, and the bound is per byte, so half the depth measures
the same fraction in half the compile. Decode tokens/s = (N - 1) / (time for N tokens - time for
1), which takes the prompt's prefill out; the bound is copy bandwidth (bytes read + written,
measured here) / weight bytes read per token (every weight once, one row of the embedding).
Rehearsal: llama-tiny's shape in fp32 on the CPU (inductor's C++ backend, no CUDA graphs).
"""

from __future__ import annotations

import statistics
import time

import torch

from cpmctl.gpu_check.measure import alternating_seconds, copy_bandwidth_gbps
from cpmctl.gpu_check.record import Section

GPU = dict(shape=dict(vocab_size=32000, d_model=2048, n_heads=32, n_kv_heads=4, d_ff=5632, n_layers=12,
                      max_positions=2048), dtype=torch.bfloat16, prompt=32, new_tokens=128, pairs=3, copy_bytes=1 << 30,
           compile_estimate_s=45)
REHEARSAL = dict(shape=dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160, n_layers=2),
                 dtype=torch.float32, prompt=8, new_tokens=8, pairs=2, copy_bytes=32 << 20, compile_estimate_s=30)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of generated positions before the first disagreement."""
    a, b = a.flatten().tolist(), b.flatten().tolist()
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return same / max(1, len(a))


def decode_tokens_per_s(full: list[float], one: list[float], new_tokens: int) -> float:
    return (new_tokens - 1) / max(1e-9, statistics.median(full) - statistics.median(one))


def run(section: Section) -> None:
    from cpmctl.compiled import CompiledDecoder
    from cpmctl.config import ModelConfig
    from cpmctl.generate import generate
    from cpmctl.model import build_model

    device = torch.device(section.device)
    sizes = REHEARSAL if section.rehearsal else GPU
    config = ModelConfig.from_preset("llama-tiny", **sizes["shape"])
    torch.manual_seed(0)
    model = build_model(config, device=device).to(sizes["dtype"]).eval()
    params = sum(p.numel() for p in model.parameters())
    dtype_name = str(sizes["dtype"]).removeprefix("torch.")
    section.note(f"Llama-shaped model, {params / 1e9:.3f} B parameters ({config.n_layers} layers, d {config.d_model}, "
                 f"d_ff {config.d_ff}, vocabulary {config.vocab_size}), random weights, {dtype_name}")
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, config.vocab_size, (1, sizes["prompt"]), generator=gen).to(device)
    new = sizes["new_tokens"]

    if not section.fits("compiling the decode and prefill steps", sizes["compile_estimate_s"]):
        return
    compiled = CompiledDecoder(model, autotune=False)
    started = time.perf_counter()
    compiled_tokens, _ = generate(model, prompt, max_new_tokens=new, eos_token_id=None, compiled=compiled)
    section.figure("compile: seconds to build the prefill and decode graphs (first run)",
                   round(time.perf_counter() - started, 1), "s")
    eager_tokens, _ = generate(model, prompt, max_new_tokens=new, eos_token_id=None)
    section.figure(f"greedy: share of {new} tokens before compiled and eager first differ", agreement(compiled_tokens, eager_tokens),
                   "fraction", at_least=1.0 if sizes["dtype"] == torch.float32 else None,
                   note=None if sizes["dtype"] == torch.float32 else "bf16 rounding differs between fused and eager kernels")

    def run_compiled(n: int):
        return generate(model, prompt, max_new_tokens=n, eos_token_id=None, compiled=compiled)

    def run_eager(n: int):
        return generate(model, prompt, max_new_tokens=n, eos_token_id=None)

    pairs = sizes["pairs"]
    full_c, full_e = alternating_seconds(lambda: run_compiled(new), lambda: run_eager(new), device, pairs=pairs)
    if not section.fits("the one-token runs (prefill cost)", 2 * pairs * statistics.median(full_c + full_e) / new + 1):
        return
    one_c, one_e = alternating_seconds(lambda: run_compiled(1), lambda: run_eager(1), device, pairs=pairs)
    tps_compiled = decode_tokens_per_s(full_c, one_c, new)
    tps_eager = decode_tokens_per_s(full_e, one_e, new)
    bandwidth = copy_bandwidth_gbps(device, sizes["copy_bytes"])
    itemsize = torch.finfo(sizes["dtype"]).bits // 8
    weight_bytes = (params - config.vocab_size * config.d_model + config.d_model) * itemsize
    bound = bandwidth * 1e9 / weight_bytes
    section.row(f"{dtype_name} greedy decode, batch 1", prompt=sizes["prompt"], new_tokens=new,
                compiled_tokens_per_s=tps_compiled, eager_tokens_per_s=tps_eager, cuda_graphs=compiled.cuda_graphs,
                weight_bytes_per_token=weight_bytes, copy_bandwidth_gbps=bandwidth, bound_tokens_per_s=bound)
    section.figure("compiled decode: tokens/s", round(tps_compiled, 2), "tokens/s")
    section.figure("compiled decode tokens/s / eager decode tokens/s", round(tps_compiled / tps_eager, 3), "x", at_least=1.0)
    section.figure("compiled decode: fraction of the memory-bandwidth bound", round(tps_compiled / bound, 4), "fraction",
                   at_least=0.8, note=f"bound {bound:.1f} tokens/s = {bandwidth:.0f} GB/s / {weight_bytes / 1e9:.3f} GB per "
                   f"token; CUDA graphs {'on' if compiled.cuda_graphs else 'off'}")
    section.figure("eager decode: fraction of the memory-bandwidth bound", round(tps_eager / bound, 4), "fraction")
