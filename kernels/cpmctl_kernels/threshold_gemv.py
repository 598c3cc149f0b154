"""Masked decode GEMV for activation sparsity (TEAL): `x @ rows + bias` that skips the weight rows
of the input entries at or below a magnitude threshold.

x [N, K] (N a few decoding tokens), rows [K, M] (a weight stored transposed: one row per input
entry, contiguous along M), threshold a one-element tensor (read on the device: no host sync),
bias [M] or None. One program per (token, BLOCK_M outputs) walks K in BLOCK_K chunks; the row
mask |x[k]| > threshold is the load mask of the weight tile, so a skipped entry's row is never
read from memory. Accumulation in fp32 (loads are cast to fp32: GEMV work, not tensor cores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpmctl_kernels._common import INTERPRETER, check, check_device, check_float, check_shape, next_power_of_2


@triton.jit
def _threshold_gemv_kernel(
    x_ptr, rows_ptr, threshold_ptr, bias_ptr, out_ptr,
    k_dim, m_dim, stride_xn, stride_xk, stride_rk, stride_rm, stride_b, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < m_dim
    offs_k = tl.arange(0, BLOCK_K)
    threshold = tl.load(threshold_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + offs_k
        xk = tl.load(x_ptr + token * stride_xn + ks * stride_xk, mask=ks < k_dim, other=0.0).to(tl.float32)
        keep = (ks < k_dim) & (tl.abs(xk) > threshold)
        w = tl.load(rows_ptr + ks.to(tl.int64)[:, None] * stride_rk + offs_m[None, :] * stride_rm,
                    mask=keep[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.where(keep, xk, 0.0)[:, None] * w
    total = tl.sum(acc, axis=0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs_m * stride_b, mask=m_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_on + offs_m, total.to(out_ptr.dtype.element_ty), mask=m_mask)


def threshold_gemv(x: torch.Tensor, rows: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K] @ rows [K, M] (+ bias [M]) over the entries with |x| > threshold only -> [N, M] in x's dtype."""
    op = "threshold_gemv"
    for name, t in (("x", x), ("rows", rows), ("threshold", threshold)):
        check(isinstance(t, torch.Tensor), f"{op}: {name} must be a tensor, got {type(t).__name__}")
    check(x.dim() == 2 and rows.dim() == 2, f"{op}: x [N, K] and rows [K, M] must be 2-D, got {list(x.shape)} and {list(rows.shape)}")
    n, k = x.shape
    check(rows.shape[0] == k, f"{op}: rows has {rows.shape[0]} input entries but x has {k}")
    check(threshold.numel() == 1, f"{op}: threshold must hold one value, got shape {list(threshold.shape)}")
    m = rows.shape[1]
    if bias is not None:
        check_shape(op, "bias", bias, (m,))
    check_device(op, x=x, rows=rows, threshold=threshold, bias=bias)
    check_float(op, "x", x)
    check_float(op, "rows", rows, x.dtype)
    out = torch.empty(n, m, dtype=x.dtype, device=x.device)
    if n == 0 or m == 0:
        return out
    block_k, block_m = (16, 32) if INTERPRETER else (32, min(256, next_power_of_2(m)))
    b = bias if bias is not None else x
    _threshold_gemv_kernel[(n, triton.cdiv(m, block_m))](
        x, rows, threshold, b, out, k, m, x.stride(0), x.stride(1), rows.stride(0), rows.stride(1), b.stride(-1), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=4,
    )
    return out
