"""Sparse decode FFN for a few tokens (1 to 8): gather-GEMV over the selected expert rows.

Layout as in cpmctl.moe (w_in, w_gate, w_out [E, d_e, d]; w_out is the down projection stored
transposed, so both projections read whole rows). The selected neurons form a flat list of
R = N * k * d_e rows, row r = (entry r // d_e, neuron r % d_e), entry = token * k + slot:

1. Up kernel, one program per BLOCK_R consecutive rows (they may straddle experts): each row
   gathers its expert's W_in (and W_gate) row and dots it with its token's x, fp32 accumulation;
   bias and activation are applied in the same program and hidden[r] (fp32) is written.
2. Down kernel, one program per (token, BLOCK_D outputs, row split): the weighted sum over the
   token's k * d_e rows of routing_weight * hidden[r] * w_out[expert, neuron, :]; the k experts'
   combine and b_out are part of it. With SPLIT > 1 programs add fp32 partial sums atomically
   (more programs at one token, order-dependent rounding); SPLIT = 1 is deterministic.
Only the selected rows are read: no rows are padded, unlike a grouped GEMM's 16- to 64-row
blocks, which is the point at 1 to 8 tokens. Under the interpreter bf16 loads are cast to fp32
(every load is cast to fp32 in any case: the products are FMA, not tensor-core, work).
Weight-only int8/int4 experts (QUANT = 1 / 2, see cpmctl_kernels.quant): the same programs read
the stored codes and their group scales and dequantize each loaded tile in registers; w_out is
then read in its linear form [E, d, d_e].
Limits: N * k * d_e < 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpmctl_kernels._common import INTERPRETER, activate, combine_rows_kernel, next_power_of_2
from cpmctl_kernels.quant import dequant_tile, kernel_weight, quant_code


@triton.jit
def _decode_up_kernel(
    x_ptr, w_in_ptr, w_gate_ptr, b_in_ptr, b_gate_ptr, ids_ptr, hidden_ptr, acc_ptr,
    s_in_ptr, z_in_ptr, s_gate_ptr, z_gate_ptr,
    num_rows, d, d_e, top_k, acc_numel,
    stride_xn, stride_xd, stride_idn, stride_idk,
    stride_ie, stride_if, stride_id, stride_ge, stride_gf, stride_gd,
    stride_bie, stride_bif, stride_bge, stride_bgf,
    stride_sie, stride_sif, stride_sig, stride_sge, stride_sgf, stride_sgg,
    GATED: tl.constexpr, HAS_B_IN: tl.constexpr, HAS_B_GATE: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ZERO_BLOCK: tl.constexpr,
    QUANT: tl.constexpr = 0, GROUP: tl.constexpr = 1,
):
    if ZERO_BLOCK > 0:
        # zero the down kernel's atomic accumulator here: one launch less than a memset
        offs = tl.program_id(0) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        tl.store(acc_ptr + offs, tl.zeros((ZERO_BLOCK,), dtype=tl.float32), mask=offs < acc_numel)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    entries = rows // d_e
    neurons = (rows % d_e).to(tl.int64)
    tokens = (entries // top_k).to(tl.int64)
    slots = (entries % top_k).to(tl.int64)
    experts = tl.load(ids_ptr + tokens * stride_idn + slots * stride_idk, mask=row_mask, other=0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xn + offs_k[None, :] * stride_xd
    w_ptrs = w_in_ptr + (experts * stride_ie + neurons * stride_if)[:, None] + offs_k[None, :] * stride_id
    g_ptrs = w_gate_ptr + (experts * stride_ge + neurons * stride_gf)[:, None] + offs_k[None, :] * stride_gd
    # element-wise partial products, reduced once at the end (one reduction, not one per chunk)
    up = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    gate = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        mask = row_mask[:, None] & (offs_k < d - k0)[None, :]
        xt = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if QUANT == 0:
            wt = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        else:  # int8 / int4 rows dequantized in registers (cpmctl_kernels.quant)
            wt = dequant_tile(w_in_ptr, s_in_ptr, z_in_ptr, (experts * stride_ie)[:, None], (experts * stride_sie)[:, None],
                              neurons[:, None], (k0 + offs_k)[None, :], mask, stride_if, stride_id, stride_sif, stride_sig,
                              QUANT, GROUP)
        up += wt * xt
        if GATED:
            if QUANT == 0:
                gt = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            else:
                gt = dequant_tile(w_gate_ptr, s_gate_ptr, z_gate_ptr, (experts * stride_ge)[:, None],
                                  (experts * stride_sge)[:, None], neurons[:, None], (k0 + offs_k)[None, :], mask,
                                  stride_gf, stride_gd, stride_sgf, stride_sgg, QUANT, GROUP)
            gate += gt * xt
            g_ptrs += BLOCK_K * stride_gd
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_id
    up_sum = tl.sum(up, axis=1)
    if HAS_B_IN:
        up_sum += tl.load(b_in_ptr + experts * stride_bie + neurons * stride_bif, mask=row_mask, other=0.0).to(tl.float32)
    if GATED:
        gate_sum = tl.sum(gate, axis=1)
        if HAS_B_GATE:
            gate_sum += tl.load(b_gate_ptr + experts * stride_bge + neurons * stride_bgf, mask=row_mask, other=0.0).to(tl.float32)
        hidden = activate(gate_sum, ACTIVATION) * up_sum
    else:
        hidden = activate(up_sum, ACTIVATION)
    tl.store(hidden_ptr + rows, hidden, mask=row_mask)


@triton.jit
def _decode_down_kernel(
    hidden_ptr, w_out_ptr, ids_ptr, weights_ptr, b_out_ptr, out_ptr, s_out_ptr, z_out_ptr,
    d, d_e, top_k, rows_per_split,
    stride_idn, stride_idk, stride_wn, stride_wk, stride_oe, stride_of, stride_od, stride_b, stride_yn,
    stride_soe, stride_sod, stride_sog,
    HAS_B_OUT: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr = 0, GROUP: tl.constexpr = 1,
):
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    rows_per_token = top_k * d_e
    start = tl.program_id(2) * rows_per_split
    stop = tl.minimum(start + rows_per_split, rows_per_token)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        local = r0 + offs_r
        row_mask = local < stop
        slots = (local // d_e).to(tl.int64)
        neurons = (local % d_e).to(tl.int64)
        experts = tl.load(ids_ptr + token * stride_idn + slots * stride_idk, mask=row_mask, other=0).to(tl.int64)
        route_w = tl.load(weights_ptr + token * stride_wn + slots * stride_wk, mask=row_mask, other=0.0).to(tl.float32)
        h = tl.load(hidden_ptr + token * rows_per_token + local, mask=row_mask, other=0.0) * route_w
        w_mask = row_mask[:, None] & d_mask[None, :]
        if QUANT == 0:
            w = tl.load(w_out_ptr + (experts * stride_oe + neurons * stride_of)[:, None] + offs_d[None, :] * stride_od,
                        mask=w_mask, other=0.0).to(tl.float32)
        else:  # linear form [E, d, d_e]: output column offs_d is the quantized row, neurons its inputs
            w = dequant_tile(w_out_ptr, s_out_ptr, z_out_ptr, (experts * stride_oe)[:, None], (experts * stride_soe)[:, None],
                             offs_d[None, :], neurons[:, None], w_mask, stride_od, stride_of, stride_sod, stride_sog,
                             QUANT, GROUP)
        acc += h[:, None] * w
    total = tl.sum(acc, axis=0)
    if ATOMIC:
        tl.atomic_add(out_ptr + token * stride_yn + offs_d, total, mask=d_mask)
    else:
        if HAS_B_OUT:
            total += tl.load(b_out_ptr + offs_d * stride_b, mask=d_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * stride_yn + offs_d, total.to(out_ptr.dtype.element_ty), mask=d_mask)


def choose_decode_split(n: int, d: int, rows_per_token: int, block_d: int, block_r: int) -> int:
    """Row splits of the down kernel: enough programs to fill a GPU (~4 per SM of an H100)."""
    if INTERPRETER:
        return 1
    programs = n * triton.cdiv(d, block_d)
    want = triton.cdiv(528, programs)
    return max(1, min(want, triton.cdiv(rows_per_token, 4 * block_r)))


def choose_decode_up_blocks(num_rows: int, d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K) of the up kernel: rows per program halved until there are enough
    programs to keep every SM of an H100 streaming weights (~4 each), 2 rows at the least."""
    if INTERPRETER:
        return 16, 32
    block_r = 16
    while block_r > 2 and triton.cdiv(num_rows, block_r) < 528:
        block_r //= 2
    return block_r, 256 if d >= 256 else max(16, next_power_of_2(d))


def decode_ffn_forward(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out,
                       activation_code: int, split: int | None = None) -> torch.Tensor:
    """The decode path on checked inputs (see cpmctl_kernels.ops.decode_moe_ffn)."""
    n, d = x.shape
    d_e = w_out.in_features if hasattr(w_out, "qweight") else w_in.shape[1]
    k = expert_ids.shape[1]
    num_rows = n * k * d_e
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    hidden = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    block_r_up, block_k = choose_decode_up_blocks(num_rows, d)
    up_programs = triton.cdiv(num_rows, block_r_up)
    block_r, block_d = (16, 32) if INTERPRETER else (32, 128)
    rows_per_token = k * d_e
    if split is None:
        split = choose_decode_split(n, d, rows_per_token, block_d, block_r)
    # whole BLOCK_R chunks per split, so that splits never share a row
    rows_per_split = triton.cdiv(triton.cdiv(rows_per_token, split), block_r) * block_r
    split = triton.cdiv(rows_per_token, rows_per_split)
    atomic = split > 1
    # with row splits the down kernel adds fp32 partials into `target`, zeroed by the up kernel
    target = torch.empty(n, d, dtype=torch.float32, device=x.device) if atomic else out
    zero_block = max(16, next_power_of_2(triton.cdiv(n * d, up_programs))) if atomic else 0
    gated = w_gate is not None
    quant, group = quant_code(w_in)
    wi, wo = kernel_weight(w_in, False), kernel_weight(w_out, True)
    wg = kernel_weight(w_gate, False) if gated else wi
    bi = b_in if b_in is not None else x
    bg = b_gate if (gated and b_gate is not None) else x
    _decode_up_kernel[(up_programs,)](
        x, wi.data, wg.data, bi, bg, expert_ids, hidden, target,
        wi.scales, wi.zeros, wg.scales, wg.zeros,
        num_rows, d, d_e, k, n * d,
        x.stride(0), x.stride(1), expert_ids.stride(0), expert_ids.stride(1),
        *wi.strides, *wg.strides,
        bi.stride(0), bi.stride(-1), bg.stride(0), bg.stride(-1),
        *wi.scale_strides, *wg.scale_strides,
        GATED=gated, HAS_B_IN=b_in is not None, HAS_B_GATE=gated and b_gate is not None,
        ACTIVATION=activation_code, BLOCK_R=block_r_up, BLOCK_K=block_k, ZERO_BLOCK=zero_block,
        QUANT=quant, GROUP=group, num_warps=4,
    )
    bo = b_out if b_out is not None else x
    _decode_down_kernel[(n, triton.cdiv(d, block_d), split)](
        hidden, wo.data, expert_ids, expert_weights, bo, target, wo.scales, wo.zeros,
        d, d_e, k, rows_per_split,
        expert_ids.stride(0), expert_ids.stride(1), expert_weights.stride(0), expert_weights.stride(1),
        *wo.strides, bo.stride(-1), target.stride(0), *wo.scale_strides,
        HAS_B_OUT=b_out is not None, ATOMIC=atomic, BLOCK_R=block_r, BLOCK_D=block_d,
        QUANT=quant, GROUP=group, num_warps=4,
    )
    if atomic:
        block_n, block_d = (16, 32) if INTERPRETER else (8, 128)
        combine_rows_kernel[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
            target, bo, out, n, d, 1, bo.stride(-1), HAS_B_OUT=b_out is not None, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return out
