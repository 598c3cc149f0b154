"""Section `model`: cpmctl's Transformer against transformers' LlamaForCausalLM on the same
device and the same random weights, a Llama-shaped model of 1.1B parameters (TinyLlama's shape:
d 2048, 22 layers, 32 heads with 4 KV heads, d_ff 5632, vocabulary 32000).

1. Outputs first, fp32 (TF32 off): the logits' largest difference relative to the largest logit,
   and greedy tokens from one prompt (both must agree before any speed is worth reading).
2. bf16: forward (prefill) time on a batch, alternating pairs, ratio transformers / cpmctl.
3. bf16 greedy decode, batch 1: decode tokens/s = (N - 1) / (time for N tokens - time for 1),
   which takes the prompt's prefill out, for both; ratio; and each one's fraction of the
   memory-bandwidth bound: a decoding step reads every weight once (the embedding table: one row),
   so the bound is copy bandwidth (measured here, bytes read + written) / weight bytes per token.
Rehearsal: llama-tiny's shape on the CPU.
"""

from __future__ import annotations

import statistics

import torch

from cpmctl.gpu_check.measure import alternating_seconds, copy_bandwidth_gbps
from cpmctl.gpu_check.record import Section

GPU = dict(shape=dict(vocab_size=32000, d_model=2048, n_heads=32, n_kv_heads=4, d_ff=5632, n_layers=22,
                      max_positions=2048), compare=(2, 64), greedy=16, forward=(8, 512), forward_pairs=10,
           prompt=32, new_tokens=128, decode_pairs=3, copy_bytes=1 << 30)
REHEARSAL = dict(shape=dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160, n_layers=2),
                 compare=(2, 12), greedy=6, forward=(2, 16), forward_pairs=3, prompt=8, new_tokens=8, decode_pairs=2,
                 copy_bytes=32 << 20)


def build_pair(config, device: torch.device):
    """(cpmctl model, transformers model) with the same random fp32 weights on `device`."""
    import transformers

    from cpmctl import hf
    from cpmctl.model import build_model

    torch.manual_seed(0)
    ours = build_model(config, device=device).eval()
    with torch.device(device):
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(hf.config_to_hf(config))).eval()
    missing, unexpected = ref.load_state_dict(hf.state_dict_to_hf(config, ours.state_dict()), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"exported weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return ours, ref


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-9))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of generated positions before the first disagreement."""
    a, b = a.flatten().tolist(), b.flatten().tolist()
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return same / max(1, len(a))


def run(section: Section) -> None:
    import transformers

    from cpmctl.config import ModelConfig
    from cpmctl.generate import generate

    transformers.logging.set_verbosity_error()
    device = torch.device(section.device)
    sizes = REHEARSAL if section.rehearsal else GPU
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    config = ModelConfig.from_preset("llama-tiny", **sizes["shape"])
    ours, ref = build_pair(config, device)
    params = sum(p.numel() for p in ours.parameters())
    section.note(f"Llama-shaped model, {params / 1e9:.3f} B parameters ({config.n_layers} layers, d {config.d_model}, "
                 f"d_ff {config.d_ff}, {config.n_heads} heads / {config.n_kv_heads} KV, vocabulary {config.vocab_size}), "
                 "random weights")
    gen = torch.Generator().manual_seed(1)
    batch, seq = sizes["compare"]
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen).to(device)

    # 1. outputs, fp32
    with torch.inference_mode():
        diff = relative_difference(ours(ids), ref(input_ids=ids).logits)
    section.figure("fp32 logits: max |cpmctl - transformers| / max |logit|", diff, "relative", at_most=1e-4)
    prompt = ids[:1]
    greedy = sizes["greedy"]
    ours_tokens, _ = generate(ours, prompt, max_new_tokens=greedy, eos_token_id=None)
    ref_tokens = hf_greedy(ref, prompt, greedy)
    section.figure(f"fp32 greedy: share of {greedy} tokens identical to transformers'", agreement(ours_tokens, ref_tokens),
                   "fraction", at_least=1.0)

    # 2. bf16 forward
    ours.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    batch, seq = sizes["forward"]
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen).to(device)
    with torch.inference_mode():
        t_ours, t_ref = alternating_seconds(lambda: ours(ids), lambda: ref(input_ids=ids).logits, device,
                                            pairs=sizes["forward_pairs"])
    forward_ratio = statistics.median(t_ref) / statistics.median(t_ours)
    section.row("bf16 forward", batch=batch, seq=seq, cpmctl_ms=1e3 * statistics.median(t_ours),
                transformers_ms=1e3 * statistics.median(t_ref),
                cpmctl_tokens_per_s=batch * seq / statistics.median(t_ours),
                transformers_tokens_per_s=batch * seq / statistics.median(t_ref))
    section.figure(f"bf16 forward {batch}x{seq}: transformers time / cpmctl time", round(forward_ratio, 3), "x", at_least=1.0)

    # 3. bf16 greedy decode, batch 1
    new = sizes["new_tokens"]
    prompt = torch.randint(3, config.vocab_size, (1, sizes["prompt"]), generator=gen).to(device)
    estimate = 4 * sizes["decode_pairs"] * 2 * (statistics.median(t_ours) + statistics.median(t_ref)) * new
    if not section.fits(f"bf16 greedy decode of {new} tokens", min(estimate, 60.0)):
        return
    pairs = sizes["decode_pairs"]
    full_ours, full_ref = alternating_seconds(lambda: generate(ours, prompt, max_new_tokens=new, eos_token_id=None),
                                              lambda: hf_greedy(ref, prompt, new), device, pairs=pairs)
    one_ours, one_ref = alternating_seconds(lambda: generate(ours, prompt, max_new_tokens=1, eos_token_id=None),
                                            lambda: hf_greedy(ref, prompt, 1), device, pairs=pairs)
    tps_ours = (new - 1) / max(1e-9, statistics.median(full_ours) - statistics.median(one_ours))
    tps_ref = (new - 1) / max(1e-9, statistics.median(full_ref) - statistics.median(one_ref))
    bf16_tokens = agreement(generate(ours, prompt, max_new_tokens=new, eos_token_id=None)[0], hf_greedy(ref, prompt, new))
    bandwidth = copy_bandwidth_gbps(device, sizes["copy_bytes"])
    weight_bytes = (params - config.vocab_size * config.d_model) * 2 + config.d_model * 2
    bound = bandwidth * 1e9 / weight_bytes
    section.row("bf16 greedy decode, batch 1", prompt=sizes["prompt"], new_tokens=new,
                cpmctl_tokens_per_s=tps_ours, transformers_tokens_per_s=tps_ref, weight_bytes_per_token=weight_bytes,
                copy_bandwidth_gbps=bandwidth, bound_tokens_per_s=bound, bf16_greedy_agreement=bf16_tokens)
    section.figure("bf16 decode: cpmctl tokens/s", round(tps_ours, 2), "tokens/s")
    section.figure("bf16 decode: transformers tokens/s", round(tps_ref, 2), "tokens/s")
    section.figure("bf16 decode: cpmctl tokens/s / transformers tokens/s", round(tps_ours / tps_ref, 3), "x", at_least=1.0)
    section.figure("bf16 decode: cpmctl's fraction of the memory-bandwidth bound", round(tps_ours / bound, 4), "fraction",
                   note=f"bound {bound:.1f} tokens/s = {bandwidth:.0f} GB/s / {weight_bytes / 1e9:.3f} GB per token")
    section.figure("bf16 decode: transformers' fraction of the memory-bandwidth bound", round(tps_ref / bound, 4), "fraction")
    section.figure(f"bf16 greedy: share of {new} tokens before the first difference from transformers'", round(bf16_tokens, 3),
                   "fraction", note="bf16 rounding differs between the two, so random weights may part early")


def hf_greedy(ref, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy generation of exactly `new_tokens` tokens (no early stop)."""
    with torch.inference_mode():
        out = ref.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:]
