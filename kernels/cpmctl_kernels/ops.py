"""Public MoE FFN ops: input checks, then the decode (N <= 8) or the grouped (N > 8) kernels.

Layout (cpmctl.moe): x [N, d]; expert_ids [N, k] int64 (or int32); expert_weights [N, k] float;
w_in [E, d_e, d]; w_gate [E, d_e, d] or None (ungated); w_out [E, d_e, d] (down projection,
transposed); b_in [E, d_e], b_gate [E, d_e], b_out [d], each optional. All on one device, the
weights and biases in x's dtype (fp32, fp16 or bf16); routing weights in any float dtype.
Result [N, d] in x's dtype, b_out included:
    out[n] = sum_j w[n, j] * (act(x W_gate[e]^T + b_gate[e]) * (x W_in[e]^T + b_in[e])) W_out[e] + b_out
with e = expert_ids[n, j] (ungated: act(x W_in[e]^T + b_in[e])).

Weight-only int8/int4 experts: w_in, w_gate and w_out are all `QuantizedWeights` in
cpmctl.quant's stored layout, each in its linear form (w_out as [E, d, d_e]; see
cpmctl_kernels.quant), dequantized inside the kernels; x and the biases stay float.
"""

from __future__ import annotations

import torch

from cpmctl_kernels._common import check, check_activation, check_device, check_float, check_shape
from cpmctl_kernels.decode_ffn import decode_ffn_forward
from cpmctl_kernels.grouped_ffn import grouped_ffn_forward
from cpmctl_kernels.quant import QuantizedWeights, check_quantized

DECODE_MAX_TOKENS = 8


def _check_moe_inputs(op, x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation) -> int:
    """Raise KernelInputError naming the first problem; returns the activation's code."""
    quantized = isinstance(w_in, QuantizedWeights)
    tensors = (("x", x), ("expert_ids", expert_ids), ("expert_weights", expert_weights))
    if not quantized:
        tensors += (("w_in", w_in), ("w_out", w_out))
    for name, t in tensors:
        check(isinstance(t, torch.Tensor), f"{op}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("w_gate", w_gate), ("b_in", b_in), ("b_gate", b_gate), ("b_out", b_out)):
        if quantized and name == "w_gate":
            continue
        check(t is None or isinstance(t, torch.Tensor), f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    code = check_activation(op, activation)
    check(x.dim() == 2, f"{op}: x must be 2-D [tokens, d_model] (flatten the batch first), got shape {list(x.shape)}")
    n, d = x.shape
    if quantized:
        check_quantized(op, "w_in", w_in, None, d, None)
        num_experts, d_e = w_in.qweight.shape[0], w_in.out_features
        if w_gate is not None:
            check_quantized(op, "w_gate", w_gate, d_e, d, num_experts)
        check_quantized(op, "w_out", w_out, d, d_e, num_experts)
        for name, w in (("w_gate", w_gate), ("w_out", w_out)):
            check(w is None or (w.scheme, w.group_size) == (w_in.scheme, w_in.group_size),
                  f"{op}: {name} is {w.scheme if w is not None else ''} (group {w.group_size if w is not None else ''}) "
                  f"but w_in is {w_in.scheme} (group {w_in.group_size}); quantize all expert weights alike")
        weights = {f"{name}.{part}": getattr(w, part) for name, w in (("w_in", w_in), ("w_gate", w_gate), ("w_out", w_out))
                   if w is not None for part in ("qweight", "scales", "zeros") if getattr(w, part) is not None}
    else:
        check(w_in.dim() == 3, f"{op}: w_in must be 3-D [experts, expert_size, d_model], got shape {list(w_in.shape)}")
        num_experts, d_e, d_w = w_in.shape
        check(d_w == d, f"{op}: w_in has d_model {d_w} but x has {d}")
        weights = {name: t for name, t in (("w_in", w_in), ("w_gate", w_gate), ("w_out", w_out)) if t is not None}
    check_device(op, x=x, expert_ids=expert_ids, expert_weights=expert_weights, **weights, b_in=b_in, b_gate=b_gate, b_out=b_out)
    check_float(op, "x", x)
    for name, t in (("w_in", w_in), ("w_gate", w_gate), ("w_out", w_out), ("b_in", b_in), ("b_gate", b_gate), ("b_out", b_out)):
        if t is not None and not (quantized and name.startswith("w_")):
            check_float(op, name, t, x.dtype)
    check(expert_ids.dtype in (torch.int64, torch.int32), f"{op}: expert_ids must be int64 or int32, got {expert_ids.dtype}")
    check(expert_ids.dim() == 2 and expert_ids.shape[0] == n and expert_ids.shape[1] >= 1,
          f"{op}: expert_ids must have shape [{n}, k] (one row per token of x), got {list(expert_ids.shape)}")
    k = expert_ids.shape[1]
    check_shape(op, "expert_weights", expert_weights, (n, k))
    check_float(op, "expert_weights", expert_weights)
    if w_gate is not None and not quantized:
        check_shape(op, "w_gate", w_gate, (num_experts, d_e, d))
    if not quantized:
        check_shape(op, "w_out", w_out, (num_experts, d_e, d))
    if b_in is not None:
        check_shape(op, "b_in", b_in, (num_experts, d_e))
    if b_gate is not None:
        check(w_gate is not None, f"{op}: b_gate given without w_gate (an ungated FFN has no gate bias)")
        check_shape(op, "b_gate", b_gate, (num_experts, d_e))
    if b_out is not None:
        check_shape(op, "b_out", b_out, (d,))
    if torch.is_grad_enabled():
        needs_grad = [name for name, t in (("x", x), ("expert_weights", expert_weights), *weights.items(),
                                           ("b_in", b_in), ("b_gate", b_gate), ("b_out", b_out))
                      if t is not None and t.requires_grad]
        check(not needs_grad, f"{op}: the Triton kernels are forward-only but {', '.join(needs_grad)} require grad; "
              "run under torch.no_grad() / inference_mode, or use the torch path (kernels='torch') to train")
    check(n * k * max(d_e, 1) < 2**31 and n * k < 2**31 - num_experts * 64,
          f"{op}: {n} tokens x {k} experts x {d_e} neurons overflow the kernels' int32 indices; split the batch")
    if expert_ids.device.type == "cpu" and expert_ids.numel():
        # free on CPU (no device sync); on CUDA an out-of-range id would read out of bounds, so
        # callers must pass ids from the router (route() only produces valid ones)
        low, high = int(expert_ids.min()), int(expert_ids.max())
        check(0 <= low and high < num_experts, f"{op}: expert_ids must lie in 0..{num_experts - 1}, got {low}..{high}")
    return code


def grouped_moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in=None, b_gate=None, b_out=None,
                    activation="relu", alignment=None, deterministic=False) -> torch.Tensor:
    """The grouped-GEMM path (moe_align, up GEMM with fused activation, down GEMM with fused or
    reduced combine) for any N; see the module docstring for the layout. `alignment`: a
    `moe_align` result of these expert_ids to reuse (its block_size sets the row block).
    `deterministic`: with k > 1, sum the k experts in a fixed order instead of fp32 atomics."""
    code = _check_moe_inputs("grouped_moe_ffn", x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation)
    if alignment is not None:
        check(alignment.num_entries == expert_ids.numel(),
              f"grouped_moe_ffn: alignment covers {alignment.num_entries} entries but expert_ids has {expert_ids.numel()}")
    return grouped_ffn_forward(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, code, alignment,
                               deterministic)


def decode_moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in=None, b_gate=None, b_out=None,
                   activation="relu", split=None) -> torch.Tensor:
    """The gather-GEMV path, meant for 1 to 8 tokens (correct for any N, slow for many); see the
    module docstring for the layout. `split`: programs per (token, output block) in the down
    projection (None: enough to fill the GPU; > 1 adds partial sums atomically)."""
    code = _check_moe_inputs("decode_moe_ffn", x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation)
    check(split is None or (isinstance(split, int) and split >= 1), f"decode_moe_ffn: split must be None or an int >= 1, got {split!r}")
    return decode_ffn_forward(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, code, split)


def moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in=None, b_gate=None, b_out=None,
            activation="relu") -> torch.Tensor:
    """MoE FFN output [N, d] (b_out included) for given routing: the decode kernels for
    N <= 8 tokens, the grouped kernels otherwise. Layout and formula: the module docstring."""
    if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] <= DECODE_MAX_TOKENS:
        return decode_moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation)
    return grouped_moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation)
