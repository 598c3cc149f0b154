"""Weight-only int8/int4 expert weights for the MoE kernels: the layout, its checks, and the
in-kernel dequantize.

The kernels read the quantized weights as cpmctl.quant stores them (no repack at load or per
call). Each weight is in its linear form [E, out, in] (y = x W^T):
    w_in, w_gate  [E, d_e, d]    (out = neurons, in = d_model)
    w_out         [E, d, d_e]    (the down projection's linear form: out = d_model, in = neurons)
with
    qweight  int8  [E, out, in]       int8: W = q * scale, one scale per output row (groups = 1)
             uint8 [E, out, in / 2]   int4: element 2j in the low nibble, 2j + 1 in the high one,
                                      W = (q - 8) * scale + zero, groups of `group_size` along in
    scales, zeros  [E, out, groups]   any float dtype (bf16 as stored); zeros for int4 only.
A tile is dequantized in fp32 right after its load; (q - 8) * scale is exact in fp32 (4-bit
times bf16), so the dequantized values are the ones cpmctl.quant.dequantize gives, and the
results differ from the dequantize-then-matmul reference only by summation order. Reading the
two nibbles of one byte loads that byte twice; the second load hits the cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cpmctl_kernels._common import check

# QUANT constexpr of the FFN kernels: 0 = float weights.
QUANT_CODES = {"int8": 1, "int4": 2}


class QuantizedWeights(NamedTuple):
    """One quantized expert stack [E, out, in] in cpmctl.quant's stored layout (module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int | None = None

    @property
    def scheme(self) -> str:
        return "int4" if self.qweight.dtype == torch.uint8 else "int8"

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * (2 if self.scheme == "int4" else 1)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-2]


class KernelWeight(NamedTuple):
    """What a kernel receives for one expert weight, float or quantized: the data tensor and its
    strides along (expert, neuron, d_model) (for int4 the packed dimension's stride is per byte),
    and the scales / zeros with their strides along (expert, output row, group). Float weights
    pass placeholders the kernel never reads."""

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    strides: tuple[int, int, int]
    scale_strides: tuple[int, int, int]


def kernel_weight(w, transposed: bool) -> KernelWeight:
    """A float [E, d_e, d] weight or a QuantizedWeights in linear form ([E, d_e, d] for w_in and
    w_gate, [E, d, d_e] for w_out: `transposed`) as kernel arguments."""
    if not isinstance(w, QuantizedWeights):
        return KernelWeight(w, w, w, (w.stride(0), w.stride(1), w.stride(2)), (0, 0, 0))
    q, s = w.qweight, w.scales
    strides = (q.stride(0), q.stride(2), q.stride(1)) if transposed else (q.stride(0), q.stride(1), q.stride(2))
    zeros = w.zeros if w.zeros is not None else s
    return KernelWeight(q, s, zeros, strides, (s.stride(0), s.stride(1), s.stride(2)))


def quant_code(w) -> tuple[int, int]:
    """(QUANT, GROUP) constexprs for a weight: (0, 1) for float weights."""
    if not isinstance(w, QuantizedWeights):
        return 0, 1
    return QUANT_CODES[w.scheme], (w.group_size if w.scheme == "int4" else 1)


def check_quantized(op: str, name: str, w, out_features: int | None, in_features: int, num_experts: int | None) -> None:
    """KernelInputError unless `w` is a well-formed QuantizedWeights of linear shape [E, out, in]
    (None: E or out as the tensor has them)."""
    check(isinstance(w, QuantizedWeights), f"{op}: {name} must be QuantizedWeights like w_in (quantize all expert weights or none)")
    for part in ("qweight", "scales"):
        check(isinstance(getattr(w, part), torch.Tensor), f"{op}: {name}.{part} must be a tensor")
    q, s = w.qweight, w.scales
    check(q.dtype in (torch.int8, torch.uint8), f"{op}: {name}.qweight must be int8 (int8 scheme) or uint8 (packed int4), got {q.dtype}")
    check(s.dtype.is_floating_point, f"{op}: {name}.scales must be a float tensor, got {s.dtype}")
    check(q.dim() == 3, f"{op}: {name}.qweight must be 3-D [experts, out, in], got shape {list(q.shape)}")
    e = num_experts if num_experts is not None else q.shape[0]
    out_features = out_features if out_features is not None else q.shape[1]
    if w.scheme == "int8":
        check(w.zeros is None, f"{op}: {name} is int8 (symmetric) but has zeros")
        check(tuple(q.shape) == (e, out_features, in_features),
              f"{op}: {name}.qweight must have shape {[e, out_features, in_features]}, got {list(q.shape)}")
        check(tuple(s.shape) == (e, out_features, 1), f"{op}: {name}.scales must have shape {[e, out_features, 1]}, got {list(s.shape)}")
        return
    g = w.group_size
    check(isinstance(g, int) and g >= 2 and g % 2 == 0 and in_features % g == 0,
          f"{op}: {name} is int4 with group size {g!r}, which must be an even int dividing its input width {in_features}")
    check(tuple(q.shape) == (e, out_features, in_features // 2),
          f"{op}: {name}.qweight (int4, two per byte) must have shape {[e, out_features, in_features // 2]}, got {list(q.shape)}")
    groups = (e, out_features, in_features // g)
    check(tuple(s.shape) == groups, f"{op}: {name}.scales must have shape {list(groups)}, got {list(s.shape)}")
    check(isinstance(w.zeros, torch.Tensor) and tuple(w.zeros.shape) == groups and w.zeros.dtype.is_floating_point,
          f"{op}: {name} is int4 and needs float zeros of shape {list(groups)}")
    check(w.zeros.stride() == s.stride(), f"{op}: {name}.zeros and .scales must have the same strides (make both contiguous)")


@triton.jit
def dequant_tile(q_ptr, s_ptr, z_ptr, q_base, s_base, out_idx, in_idx, mask,
                 stride_qo, stride_qi, stride_so, stride_sg, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """An fp32 tile of W[out_idx, in_idx] (out_idx and in_idx broadcast to the tile's shape;
    q_base / s_base: the expert's offsets into qweight / scales), 0 where masked."""
    if QUANT == 1:
        q = tl.load(q_ptr + q_base + out_idx * stride_qo + in_idx * stride_qi, mask=mask, other=0)
        s = tl.load(s_ptr + s_base + out_idx * stride_so + in_idx * 0, mask=mask, other=0.0)
        w = q.to(tl.float32) * s.to(tl.float32)
    else:
        packed = tl.load(q_ptr + q_base + out_idx * stride_qo + (in_idx // 2) * stride_qi, mask=mask, other=0)
        nibble = (packed.to(tl.int32) >> ((in_idx % 2) * 4)) & 15
        offs = s_base + out_idx * stride_so + (in_idx // GROUP) * stride_sg
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = (nibble.to(tl.float32) - 8.0) * s + z
    return w
