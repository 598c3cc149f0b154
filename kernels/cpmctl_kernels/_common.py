"""Shared pieces of the kernels: interpreter detection, input checks, the fused activations.

Triton decides at decoration time whether `@triton.jit` gives a GPU kernel or an interpreted one
(TRITON_INTERPRET=1), so `INTERPRETER` is read once, when this package is imported. Under the
interpreter the kernels run on CPU tensors; on a GPU they need CUDA tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreter_on() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4 has no knobs; it reads the variable directly
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETER = _interpreter_on()

# Codes the kernels branch on at compile time (tl.constexpr); names as in cpmctl.model.ACTIVATIONS.
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(ValueError):
    """A launcher was given tensors of the wrong shape, dtype or device (a `ValueError`: what
    Python code expects from a bad argument). The package stands alone and imports nothing of
    cpmctl; cpmctl.moe turns this error into its own `UserError` where the CLI runs a kernel."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(message)


def check_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device that the kernels can run on; returns that device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {name: t.device for name, t in present.items()}
    first_name, device = next(iter(devices.items()))
    for name, dev in devices.items():
        check(dev == device, f"{op}: {name} is on {dev} but {first_name} is on {device}; put all inputs on one device")
    if device.type == "cpu":
        check(
            INTERPRETER,
            f"{op}: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing "
            "cpmctl_kernels, or move the inputs to a CUDA device (or use the torch path)",
        )
    else:
        check(device.type == "cuda", f"{op}: Triton kernels run on CUDA tensors, got {device}")
        check(not INTERPRETER, f"{op}: TRITON_INTERPRET=1 is set, so the kernels only accept CPU tensors, got {device}")
    return device


def check_float(op: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    check(t.dtype in FLOAT_DTYPES, f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None:
        check(t.dtype == dtype, f"{op}: {name} is {t.dtype} but x is {dtype}; cast the weights to the activations' dtype")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    check(tuple(t.shape) == tuple(shape), f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")


def check_activation(op: str, activation: str) -> int:
    check(activation in ACTIVATION_CODES, f"{op}: unknown activation {activation!r}; choose one of {sorted(ACTIVATION_CODES)}")
    return ACTIVATION_CODES[activation]


def upcast_loads(dtype: torch.dtype) -> bool:
    """Whether kernels cast loaded tiles to fp32 before arithmetic: fp32 inputs (exact dots), and
    bf16 under the interpreter, whose bf16 arithmetic is wrong. On a GPU bf16 tiles go to the
    tensor cores as they are."""
    return dtype == torch.float32 or (INTERPRETER and dtype == torch.bfloat16)


@triton.jit
def _tanh(u):
    # tanh through exp of a non-positive argument: no overflow, and no libdevice (not in the
    # interpreter).
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """The FFN activation on an fp32 tile (codes: ACTIVATION_CODES)."""
    if ACTIVATION == 0:
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def combine_rows_kernel(partial_ptr, b_out_ptr, out_ptr, num_tokens, d, top_k, stride_b,
                        HAS_B_OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = sum_j partial[n * top_k + j] + b_out, from fp32 partial rows [N * top_k, d] (contiguous)
    to out [N, d] (contiguous, any float dtype): the combine step after a split or per-entry sum."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < num_tokens)[:, None] & (cols < d)[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in range(top_k):
        acc += tl.load(partial_ptr + (rows64 * top_k + j)[:, None] * d + cols[None, :], mask=mask, other=0.0)
    if HAS_B_OUT:
        acc += tl.load(b_out_ptr + cols * stride_b, mask=cols < d, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
