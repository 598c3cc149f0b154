"""Grouped expert FFN for many tokens (prefill, evaluation): two GEMM kernels over expert groups.

Layout (cpmctl.moe): x [N, d]; w_in, w_gate [E, d_e, d]; w_out [E, d_e, d] (the down projection
stored transposed); b_in, b_gate [E, d_e]; b_out [d]; expert_ids / expert_weights [N, k].

1. `moe_align` sorts the N * k (token, slot) entries by expert into blocks of BLOCK_M entries that
   all use one expert (sentinel-padded; see cpmctl_kernels.routing).
2. Up kernel, one program per (entry block, BLOCK_F neurons): gathers the block's token rows of x
   by index (tokens are never copied or permuted), multiplies by the expert's W_in (and W_gate)
   rows, and applies bias and activation in the epilogue: hidden = act(x W_gate^T + b_gate) *
   (x W_in^T + b_in), or act(x W_in^T + b_in) ungated. It writes hidden[entry] ([N * k, d_e],
   no padding rows).
3. Down kernel, one program per (entry block, BLOCK_D outputs): hidden rows times the expert's
   w_out rows, scaled by the entry's routing weight. The combine of a token's k experts:
   - k = 1: the kernel writes out[token] + b_out directly;
   - k > 1 (default): fp32 atomic adds into an [N, d] accumulator (L2-resident at prefill sizes),
     then one pass adds b_out and casts; the summation order varies between runs;
   - k > 1, deterministic=True: the weighted per-entry rows go to an fp32 [N * k, d] buffer and a
     small kernel sums each token's k rows in order (more memory traffic, bit-reproducible).
Accumulation is fp32. fp16/bf16 tiles go to tl.dot as they are; fp32 tiles use IEEE dots (no
TF32), so fp32 results match torch to ~1e-6. Under the interpreter bf16 tiles are cast to fp32.
Weight-only int8/int4 experts (QUANT = 1 / 2, see cpmctl_kernels.quant): each weight tile is
loaded as codes plus group scales, dequantized in registers and cast to x's dtype for the dot
(w_out read in its linear form [E, d, d_e]).
Limits: N * k < 2**31; E <= 4096; tensors of any strides (only the last dims are read as rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpmctl_kernels._common import INTERPRETER, activate, combine_rows_kernel, upcast_loads
from cpmctl_kernels.quant import dequant_tile, kernel_weight, quant_code
from cpmctl_kernels.routing import MoEAlignment, moe_align


def _configs(names: tuple[str, str], gpu_sizes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    # The interpreter cannot autotune with more than one config (it needs a GPU driver to time).
    if INTERPRETER:
        return [triton.Config({names[0]: 32, names[1]: 32}, num_warps=4, num_stages=1)]
    return [triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s) for a, b, w, s in gpu_sizes]


_UP_CONFIGS = _configs(("BLOCK_F", "BLOCK_K"), [
    (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 4), (32, 128, 4, 4), (128, 128, 8, 3),
    (16, 128, 4, 4),  # d_e = 80-style experts: 16-wide blocks waste no columns
])
_DOWN_CONFIGS = _configs(("BLOCK_D", "BLOCK_F"), [
    (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 4),
    (128, 16, 4, 4),
])


@triton.jit
def _block_entries(block_expert_ptr, sorted_ids_ptr, pid_m, num_entries, BLOCK_M: tl.constexpr):
    """Row block `pid_m` of the expert-sorted entries: its expert (int64), its entry ids (token *
    top_k + slot; padding ids are >= num_entries) and which of them are real. Inlined by Triton."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    entries = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return expert, entries, entries < num_entries


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        # fp32 tiles: IEEE products, so fp32 runs match torch instead of TF32's ~1e-3
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.autotune(configs=_UP_CONFIGS, key=["d", "d_e", "BLOCK_M", "GATED", "QUANT"])
@triton.jit
def _grouped_up_kernel(
    x_ptr, w_in_ptr, w_gate_ptr, b_in_ptr, b_gate_ptr, hidden_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    s_in_ptr, z_in_ptr, s_gate_ptr, z_gate_ptr,
    num_entries, d, d_e, top_k,
    stride_xn, stride_xd,
    stride_ie, stride_if, stride_id,
    stride_ge, stride_gf, stride_gd,
    stride_bie, stride_bif, stride_bge, stride_bgf,
    stride_hn,
    stride_sie, stride_sif, stride_sig, stride_sge, stride_sgf, stride_sgg,
    GATED: tl.constexpr, HAS_B_IN: tl.constexpr, HAS_B_GATE: tl.constexpr, ACTIVATION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr = 0, GROUP: tl.constexpr = 1,
):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, entries, valid = _block_entries(block_expert_ptr, sorted_ids_ptr, pid_m, num_entries, BLOCK_M)
    tokens = (entries // top_k).to(tl.int64)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = offs_f < d_e
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xn + offs_k[None, :] * stride_xd
    # W rows f are read as the [BLOCK_K, BLOCK_F] tile of W^T
    w_ptrs = w_in_ptr + expert * stride_ie + offs_f[None, :].to(tl.int64) * stride_if + offs_k[:, None] * stride_id
    g_ptrs = w_gate_ptr + expert * stride_ge + offs_f[None, :].to(tl.int64) * stride_gf + offs_k[:, None] * stride_gd
    up = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k_mask = offs_k < d - k0
        xt = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & f_mask[None, :]
        if QUANT == 0:
            wt = tl.load(w_ptrs, mask=w_mask, other=0.0)
        else:  # int8 / int4 tile of W^T dequantized in registers, then in x's dtype for the dot
            wt = dequant_tile(w_in_ptr, s_in_ptr, z_in_ptr, expert * stride_ie, expert * stride_sie, offs_f[None, :],
                              (k0 + offs_k)[:, None], w_mask, stride_if, stride_id, stride_sif, stride_sig,
                              QUANT, GROUP).to(x_ptr.dtype.element_ty)
        up = _dot(xt, wt, up, UPCAST)
        if GATED:
            if QUANT == 0:
                gt = tl.load(g_ptrs, mask=w_mask, other=0.0)
            else:
                gt = dequant_tile(w_gate_ptr, s_gate_ptr, z_gate_ptr, expert * stride_ge, expert * stride_sge,
                                  offs_f[None, :], (k0 + offs_k)[:, None], w_mask, stride_gf, stride_gd, stride_sgf,
                                  stride_sgg, QUANT, GROUP).to(x_ptr.dtype.element_ty)
            gate = _dot(xt, gt, gate, UPCAST)
            g_ptrs += BLOCK_K * stride_gd
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_id

    if HAS_B_IN:
        up += tl.load(b_in_ptr + expert * stride_bie + offs_f * stride_bif, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_B_GATE:
            gate += tl.load(b_gate_ptr + expert * stride_bge + offs_f * stride_bgf, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        hidden = activate(gate, ACTIVATION) * up
    else:
        hidden = activate(up, ACTIVATION)
    h_ptrs = hidden_ptr + entries.to(tl.int64)[:, None] * stride_hn + offs_f[None, :]
    tl.store(h_ptrs, hidden.to(hidden_ptr.dtype.element_ty), mask=valid[:, None] & f_mask[None, :])


# reset_to_zero: the atomic combine accumulates, so every timed config starts from zeros
@triton.autotune(configs=_DOWN_CONFIGS, key=["d", "d_e", "BLOCK_M", "COMBINE", "QUANT"], reset_to_zero=["out_ptr"])
@triton.jit
def _grouped_down_kernel(
    hidden_ptr, w_out_ptr, weights_ptr, b_out_ptr, out_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr, s_out_ptr, z_out_ptr,
    num_entries, d, d_e, top_k,
    stride_hn, stride_oe, stride_of, stride_od, stride_wn, stride_wk, stride_b, stride_yn,
    stride_soe, stride_sod, stride_sog,
    COMBINE: tl.constexpr, HAS_B_OUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    QUANT: tl.constexpr = 0, GROUP: tl.constexpr = 1,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, entries, valid = _block_entries(block_expert_ptr, sorted_ids_ptr, pid_m, num_entries, BLOCK_M)
    entries64 = entries.to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    offs_f = tl.arange(0, BLOCK_F)

    h_ptrs = hidden_ptr + entries64[:, None] * stride_hn + offs_f[None, :]
    w_ptrs = w_out_ptr + expert * stride_oe + offs_f[:, None].to(tl.int64) * stride_of + offs_d[None, :] * stride_od
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for f0 in range(0, d_e, BLOCK_F):
        f_mask = offs_f < d_e - f0
        ht = tl.load(h_ptrs, mask=valid[:, None] & f_mask[None, :], other=0.0)
        w_mask = f_mask[:, None] & d_mask[None, :]
        if QUANT == 0:
            wt = tl.load(w_ptrs, mask=w_mask, other=0.0)
        else:  # linear form [E, d, d_e]: output columns offs_d are the quantized rows
            wt = dequant_tile(w_out_ptr, s_out_ptr, z_out_ptr, expert * stride_oe, expert * stride_soe, offs_d[None, :],
                              (f0 + offs_f)[:, None], w_mask, stride_od, stride_of, stride_sod, stride_sog,
                              QUANT, GROUP).to(hidden_ptr.dtype.element_ty)
        acc = _dot(ht, wt, acc, UPCAST)
        h_ptrs += BLOCK_F
        w_ptrs += BLOCK_F * stride_of

    tokens = entries64 // top_k
    slots = entries64 % top_k
    route_w = tl.load(weights_ptr + tokens * stride_wn + slots * stride_wk, mask=valid, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]
    mask = valid[:, None] & d_mask[None, :]
    if COMBINE == 0:
        # k == 1: each token has one entry, so the combine is this store
        if HAS_B_OUT:
            acc += tl.load(b_out_ptr + offs_d * stride_b, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tokens[:, None] * stride_yn + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif COMBINE == 1:
        tl.store(out_ptr + entries64[:, None] * stride_yn + offs_d[None, :], acc, mask=mask)
    else:
        tl.atomic_add(out_ptr + tokens[:, None] * stride_yn + offs_d[None, :], acc, mask=mask)


def choose_block_m(num_entries: int, num_experts: int) -> int:
    """Row block of the grouped GEMMs: about the mean entries per expert, so that small batches
    waste little padding (16 at a handful of tokens per expert, up to 64 at thousands)."""
    if INTERPRETER:
        return 16
    mean = num_entries / max(1, min(num_experts, num_entries))
    return 16 if mean <= 16 else 32 if mean <= 48 else 64


def grouped_ffn_forward(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out,
                        activation_code: int, alignment: MoEAlignment | None = None,
                        deterministic: bool = False) -> torch.Tensor:
    """The grouped path on checked inputs (see cpmctl_kernels.ops.grouped_moe_ffn)."""
    n, d = x.shape
    num_experts = w_in.qweight.shape[0] if hasattr(w_in, "qweight") else w_in.shape[0]
    d_e = w_out.in_features if hasattr(w_out, "qweight") else w_in.shape[1]
    k = expert_ids.shape[1]
    num_entries = n * k
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    if alignment is None:
        alignment = moe_align(expert_ids, num_experts, choose_block_m(num_entries, num_experts))
    block_m = alignment.block_size
    num_blocks = alignment.block_expert_ids.numel()
    upcast = upcast_loads(x.dtype)
    hidden = torch.empty(num_entries, d_e, dtype=x.dtype, device=x.device)
    gated = w_gate is not None
    quant, group = quant_code(w_in)
    wi, wo = kernel_weight(w_in, False), kernel_weight(w_out, True)
    wg = kernel_weight(w_gate, False) if gated else wi
    bi = b_in if b_in is not None else x
    bg = b_gate if (gated and b_gate is not None) else x
    _grouped_up_kernel[lambda meta: (num_blocks, triton.cdiv(d_e, meta["BLOCK_F"]))](
        x, wi.data, wg.data, bi, bg, hidden,
        alignment.sorted_ids, alignment.block_expert_ids, alignment.num_padded,
        wi.scales, wi.zeros, wg.scales, wg.zeros,
        num_entries, d, d_e, k,
        x.stride(0), x.stride(1),
        *wi.strides, *wg.strides,
        bi.stride(0), bi.stride(-1), bg.stride(0), bg.stride(-1),
        hidden.stride(0),
        *wi.scale_strides, *wg.scale_strides,
        GATED=gated, HAS_B_IN=b_in is not None, HAS_B_GATE=gated and b_gate is not None,
        ACTIVATION=activation_code, UPCAST=upcast, BLOCK_M=block_m, QUANT=quant, GROUP=group,
    )
    combine = 0 if k == 1 else 1 if deterministic else 2
    if combine == 0:
        target = out
    elif combine == 1:
        target = torch.empty(num_entries, d, dtype=torch.float32, device=x.device)
    else:
        target = torch.zeros(n, d, dtype=torch.float32, device=x.device)
    bo = b_out if b_out is not None else x
    _grouped_down_kernel[lambda meta: (num_blocks, triton.cdiv(d, meta["BLOCK_D"]))](
        hidden, wo.data, expert_weights, bo, target,
        alignment.sorted_ids, alignment.block_expert_ids, alignment.num_padded, wo.scales, wo.zeros,
        num_entries, d, d_e, k,
        hidden.stride(0), *wo.strides,
        expert_weights.stride(0), expert_weights.stride(1), bo.stride(-1), target.stride(0),
        *wo.scale_strides,
        COMBINE=combine, HAS_B_OUT=b_out is not None, UPCAST=upcast, BLOCK_M=block_m, QUANT=quant, GROUP=group,
    )
    if combine:
        # per-entry rows: sum each token's k of them; atomic accumulator: one "row" per token
        block_d = 32 if INTERPRETER else 128
        block_n = 16 if INTERPRETER else 8
        combine_rows_kernel[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
            target, bo, out, n, d, k if combine == 1 else 1, bo.stride(-1),
            HAS_B_OUT=b_out is not None, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return out
