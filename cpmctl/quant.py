"""Weight-only quantized linear weights: the stored format and the dequantize-in-matmul.

Any linear weight W [*lead, out, in] (y = x W^T; `lead` stacks experts) is stored as tensors
beside each other, named after the weight:
    NAME.qweight  int8  [*lead, out, in]        (int8: one scale per output row, symmetric)
                  uint8 [*lead, out, in / 2]    (int4: two values per byte, element 2j in the low
                                                 nibble, 2j + 1 in the high one)
    NAME.scales   bf16  [*lead, out, groups]    (int8: groups = 1; int4: in / group_size)
    NAME.zeros    bf16  [*lead, out, groups]    (int4 only)
and dequantizes as
    int8: W = q * scale
    int4: W = (q - 8) * scale + zero            (asymmetric, the "tinygemm" form)
Every leading index (an expert) is a contiguous block of each tensor, so an expert is still one
row gather per tensor and streams like an unquantized one. A weight used transposed (the MoE
layout's w_out, stored [E, d_e, d] = [*lead, in, out]) is quantized as its linear form
[E, d, d_e], groups along d_e.

The matmul (`quantized_linear`): on a CPU torch's fused weight-only kernels,
`torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu`, in bf16 activations
(measured on this project's CPU, benchmarks/quant_matmul.py: with fp32 activations both
kernels ran slower than the fp32 dense matmul, in bf16 faster); int4 needs its weight repacked
into the kernel's layout (`cpu_int4_pack`, done once per resident weight). Elsewhere the weight is
dequantized and multiplied (`dequantize`), the reference every kernel is tested against; with
`--kernels triton` a CUDA MoE layer instead hands these tensors, as stored, to the int8/int4
variants of the Triton MoE kernels (cpmctl_kernels.quant), which dequantize tiles in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cpmctl.config import QUANT_GROUP_SIZES, QuantConfig
from cpmctl.errors import UserError

SCALE_DTYPE = torch.bfloat16
INT4_OFFSET = 8
# The tensors a quantized weight NAME is stored as: NAME.qweight, NAME.scales (, NAME.zeros).
QUANT_PARTS = ("qweight", "scales", "zeros")


def is_quantized_part(name: str) -> bool:
    """Whether a stored tensor is a piece of a quantized weight (kept in its stored dtype when run)."""
    return name.rpartition(".")[2] in QUANT_PARTS


@dataclass(frozen=True)
class QuantizedView:
    """One quantized linear weight [out, in] (or a stack [*lead, out, in]): views of its tensors."""

    scheme: str
    group_size: int | None
    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    cpu_packed: Tensor | None = None  # int4 in the CPU kernel's layout, when prepared

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-2]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * (2 if self.scheme == "int4" else 1)

    def __getitem__(self, index) -> "QuantizedView":
        return QuantizedView(self.scheme, self.group_size, self.qweight[index], self.scales[index],
                             None if self.zeros is None else self.zeros[index],
                             None if self.cpu_packed is None else self.cpu_packed[index])


def check_scheme(scheme: str, group_size: int | None, in_features: int | None = None) -> None:
    """UserError for a scheme, group size or width the format and its kernels do not take."""
    QuantConfig(scheme, group_size)  # validates scheme and group size
    if in_features is not None and scheme == "int4" and in_features % group_size:
        raise UserError(f"int4 with group size {group_size} needs input widths divisible by it; a weight has {in_features}",
                        option="group_size")


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [..., n / 2] -> uint8 [..., n] of values 0..15 (low nibble first)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_int4(values: Tensor) -> Tensor:
    """uint8 [..., n] of values 0..15 -> uint8 [..., n / 2] (element 2j low, 2j + 1 high)."""
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def dequantize(w: QuantizedView, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight [*lead, out, in] in `dtype`: the format's definition, computed in fp32."""
    if w.scheme == "int8":
        return (w.qweight.float() * w.scales.float()).to(dtype)
    q = unpack_int4(w.qweight).float() - INT4_OFFSET
    shape = q.shape
    grouped = q.view(*shape[:-1], -1, w.group_size)
    out = grouped * w.scales.float()[..., None] + w.zeros.float()[..., None]
    return out.view(shape).to(dtype)


def cpu_int4_pack(w: QuantizedView) -> Tensor:
    """The int4 values of one weight [out, in] in the layout `torch._weight_int4pack_mm_for_cpu` reads."""
    return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(w.qweight).to(torch.int32), 1)


def cpu_kernels_available(scheme: str) -> bool:
    name = "_weight_int8pack_mm" if scheme == "int8" else "_weight_int4pack_mm_for_cpu"
    return hasattr(torch.ops.aten, name)


def check_kernels(scheme: str, device: torch.device) -> None:
    """UserError when `device` (with this torch) has no matmul for `scheme` weights."""
    device = torch.device(device)
    if device.type == "cpu":
        if not cpu_kernels_available(scheme):
            kernel = "torch._weight_int8pack_mm" if scheme == "int8" else "torch._weight_int4pack_mm_for_cpu"
            raise UserError(f"{scheme} weights on the CPU need {kernel}, which torch {torch.__version__} lacks; "
                            "dequantize the checkpoint or upgrade torch")
    elif device.type != "cuda":
        raise UserError(f"{scheme} weights have no matmul on {device.type} devices (cpu and cuda have one)")


def quantized_linear(x: Tensor, w: QuantizedView) -> Tensor:
    """x [m, in] @ W^T -> [m, out] in x's dtype: fused weight-only kernels on a CPU (bf16
    activations in, see the module docstring), dequantize-then-matmul elsewhere."""
    if x.device.type != "cpu":
        return x @ dequantize(w, x.dtype).T
    xb = x.to(torch.bfloat16)
    if w.scheme == "int8":
        y = torch._weight_int8pack_mm(xb, w.qweight, w.scales.reshape(-1))
    else:
        packed = w.cpu_packed if w.cpu_packed is not None else cpu_int4_pack(w)
        scales_and_zeros = torch.stack((w.scales, w.zeros), dim=-1).transpose(0, 1).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(xb, packed, w.group_size, scales_and_zeros)
    return y.to(x.dtype)


class QuantizedWeight(nn.Module):
    """A module holding one quantized weight stack as buffers (qweight, scales, zeros), so that
    the state dict names them NAME.qweight, ... as stored. `transposed`: the model uses the
    weight as [*lead, in, out] (the MoE's w_out); `shape` is the shape the model sees."""

    def __init__(self, lead: tuple[int, ...], out_features: int, in_features: int, scheme: str,
                 group_size: int | None, *, transposed: bool = False) -> None:
        super().__init__()
        check_scheme(scheme, group_size, in_features)
        self.scheme, self.group_size, self.transposed = scheme, group_size, transposed
        packed_in = in_features // 2 if scheme == "int4" else in_features
        groups = in_features // group_size if scheme == "int4" else 1
        qdtype = torch.uint8 if scheme == "int4" else torch.int8
        self.register_buffer("qweight", torch.zeros(*lead, out_features, packed_in, dtype=qdtype))
        self.register_buffer("scales", torch.ones(*lead, out_features, groups, dtype=SCALE_DTYPE))
        if scheme == "int4":
            self.register_buffer("zeros", torch.zeros(*lead, out_features, groups, dtype=SCALE_DTYPE))
        else:
            self.zeros = None
        self.requires_grad = False
        self._cpu_packed: Tensor | None = None
        self._packed_from: tuple | None = None

    @property
    def shape(self) -> torch.Size:
        lead = self.qweight.shape[:-2]
        out_f, in_f = self.qweight.shape[-2], self.qweight.shape[-1] * (2 if self.scheme == "int4" else 1)
        return torch.Size((*lead, in_f, out_f) if self.transposed else (*lead, out_f, in_f))

    @property
    def dtype(self) -> torch.dtype:
        return self.qweight.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def view_all(self) -> QuantizedView:
        packed = None
        if self.scheme == "int4" and self.qweight.device.type == "cpu":
            # The CPU kernel's layout, made once per loaded weight (keyed on the storage, which
            # loading by assignment replaces).
            key = (self.qweight.data_ptr(), self.qweight._version)
            if self._packed_from != key:
                lead = self.qweight.shape[:-2]
                flat = QuantizedView(self.scheme, self.group_size, self.qweight.reshape(-1, *self.qweight.shape[-2:]),
                                     self.scales, self.zeros)
                packs = [cpu_int4_pack(flat[i]) for i in range(flat.qweight.shape[0])]
                self._cpu_packed = torch.stack(packs).view(*lead, *packs[0].shape)
                self._packed_from = key
            packed = self._cpu_packed
        return QuantizedView(self.scheme, self.group_size, self.qweight, self.scales, self.zeros, packed)

    def __getitem__(self, index) -> QuantizedView:
        return self.view_all()[index]


def quantized_matmul_out(hidden: Tensor, w: QuantizedView, out: Tensor | None) -> Tensor:
    """hidden [m, in] times a weight used transposed ([in, out] as the model sees it, stored as
    the linear form [out, in]): the MoE's down projection."""
    y = quantized_linear(hidden, w)
    if out is not None:
        out.copy_(y)
        return out
    return y
