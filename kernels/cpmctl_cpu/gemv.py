"""Small-M linear layers for decode (gemv.cpp): y = x W^T (+ bias) for a few activation rows, with
the weight in cpmctl's stored format (int8 + per-row bf16 scales; bf16; int4 nibbles with group
scales and zeros), read as stored: no repacking.

Each op has a launcher (checks its operands, raises CpuKernelInputError in one line, accepts any
float activations [..., in] and returns y in their dtype), a fake impl so the op can sit inside a
torch.compile graph, and a torch reference (dequantize in fp32, then matmul) it is tested against.
Activations are computed in fp32 and products accumulated in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpmctl_cpu.build import CpuKernelInputError, load_ops

NAMESPACE = "cpmctl_gemv"
INT4_OFFSET = 8
_ops = None


def ops():
    """torch.ops.cpmctl_gemv, built on first use (CpuKernelBuildError when this machine cannot)."""
    global _ops
    if _ops is None:  # a plain global read once built: torch.compile traces through it
        namespace = load_ops("gemv")
        _register_fakes()
        _ops = namespace
    return _ops


def _register_fakes() -> None:
    def fake_linear(x, weight_rows):
        return x.new_empty((x.shape[0], weight_rows))

    torch.library.register_fake(f"{NAMESPACE}::int8_linear")(lambda x, qweight, scales, bias: fake_linear(x, qweight.shape[0]))
    torch.library.register_fake(f"{NAMESPACE}::bf16_linear")(lambda x, weight, bias: fake_linear(x, weight.shape[0]))
    torch.library.register_fake(f"{NAMESPACE}::int4_linear")(
        lambda x, qweight, scales, zeros, group_size, bias: fake_linear(x, qweight.shape[0]))


# -- operand checks ---------------------------------------------------------------------------------
def _fail(message: str) -> None:
    raise CpuKernelInputError(message)


def _check_cpu(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        _fail(f"{name} is on {t.device}; the CPU GEMV takes CPU tensors")


def _check_weight(name: str, t: Tensor, dtype: torch.dtype) -> None:
    _check_cpu(name, t)
    if t.dtype != dtype:
        _fail(f"{name} must be {str(dtype).removeprefix('torch.')}, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != 2:
        _fail(f"{name} must be 2-D [out, in], got shape {tuple(t.shape)}")


def _check_x(x: Tensor, in_features: int) -> None:
    _check_cpu("x", x)
    if not x.is_floating_point():
        _fail(f"x must be a float tensor, got {str(x.dtype).removeprefix('torch.')}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        _fail(f"x must be [..., {in_features}] to match the weight, got shape {tuple(x.shape)}")


def _check_rows(name: str, t: Tensor, out_features: int, groups: int) -> None:
    _check_cpu(name, t)
    if t.dtype != torch.bfloat16:
        _fail(f"{name} must be bfloat16, got {str(t.dtype).removeprefix('torch.')}")
    if t.numel() != out_features * groups or (t.dim() >= 1 and t.shape[0] != out_features):
        _fail(f"{name} must be [{out_features}, {groups}], got shape {tuple(t.shape)}")


def _check_bias(bias: Tensor | None, out_features: int) -> None:
    if bias is None:
        return
    _check_cpu("bias", bias)
    if not bias.is_floating_point() or bias.shape != (out_features,):
        _fail(f"bias must be a float [{out_features}] tensor, got {str(bias.dtype).removeprefix('torch.')} {tuple(bias.shape)}")


def _rows(x: Tensor) -> Tensor:
    """x as fp32 [m, in] with unit stride along in (a copy only where needed)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _bias(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.float().contiguous()


# -- launchers ----------------------------------------------------------------------------------------
def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ (qweight * scales)^T (+ bias) -> [..., out] in x's dtype; qweight int8
    [out, in], scales bf16 [out] or [out, 1]."""
    _check_weight("qweight", qweight, torch.int8)
    out_f, in_f = qweight.shape
    _check_x(x, in_f)
    _check_rows("scales", scales, out_f, 1)
    _check_bias(bias, out_f)
    y = ops().int8_linear(_rows(x), qweight.contiguous(), scales.reshape(-1).contiguous(), _bias(bias))
    return y.view(*x.shape[:-1], out_f).to(x.dtype)


def bf16_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ weight^T (+ bias) -> [..., out] in x's dtype; weight bf16 [out, in]."""
    _check_weight("weight", weight, torch.bfloat16)
    out_f, in_f = weight.shape
    _check_x(x, in_f)
    _check_bias(bias, out_f)
    y = ops().bf16_linear(_rows(x), weight.contiguous(), _bias(bias))
    return y.view(*x.shape[:-1], out_f).to(x.dtype)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ W^T (+ bias), W = (q - 8) * scale + zero per group of `group_size` inputs;
    qweight uint8 [out, in / 2] (element 2j in the low nibble), scales and zeros bf16 [out, groups]."""
    _check_weight("qweight", qweight, torch.uint8)
    out_f, in_f = qweight.shape[0], qweight.shape[1] * 2
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32 or in_f % group_size:
        _fail(f"group_size must be a positive multiple of 32 dividing the input width {in_f}, got {group_size}")
    groups = in_f // group_size
    _check_x(x, in_f)
    _check_rows("scales", scales, out_f, groups)
    _check_rows("zeros", zeros, out_f, groups)
    _check_bias(bias, out_f)
    y = ops().int4_linear(_rows(x), qweight.contiguous(), scales.contiguous(), zeros.contiguous(), group_size, _bias(bias))
    return y.view(*x.shape[:-1], out_f).to(x.dtype)


# -- torch references ----------------------------------------------------------------------------------
def _finish(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y = x.float() @ weight.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    return _finish(x, qweight.float() * scales.float().reshape(-1, 1), bias)


def bf16_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return _finish(x, weight.float(), bias)


def int4_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                          bias: Tensor | None = None) -> Tensor:
    q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).flatten(-2).float() - INT4_OFFSET
    out_f, in_f = q.shape
    grouped = q.view(out_f, -1, group_size) * scales.float().view(out_f, -1, 1) + zeros.float().view(out_f, -1, 1)
    return _finish(x, grouped.view(out_f, in_f), bias)


__all__ = ["bf16_linear", "bf16_linear_reference", "int4_linear", "int4_linear_reference", "int8_linear",
           "int8_linear_reference", "ops"]
