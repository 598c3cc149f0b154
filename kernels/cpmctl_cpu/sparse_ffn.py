"""Sparse FFNs for CPU decoding (sparse_ffn.cpp): a few tokens, each reading only the weight rows it uses.

- `moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation)`:
  the selected experts of each token in one call, in cpmctl.moe's layout (w_in, w_gate and w_out
  [E, d_e, d], w_out the down projection stored transposed); the routing weights scale each
  expert's hidden activations (None: weight 1, MoEfied experts). A ReLU neuron that is exactly 0
  skips its down-projection row. Same arguments and result as `cpmctl.moe.moe_ffn_reference`.
- `threshold_gemv(x, rows, threshold, bias)`: x [N, K] @ rows [K, M] (+ bias) over the entries
  |x| > threshold only (TEAL); rows is a weight stored transposed, prepared once at load.
- `threshold_ffn(x, rows_in, rows_gate, rows_out, b_in, b_gate, b_out, threshold_in,
  threshold_hidden, activation)`: cpmctl's ThresholdFeedForward in one call.

fp32, CPU, contiguous operands. Each op has a torch reference below (`*_reference`) that the tests
compare against, and a fake impl so it traces under torch.compile (call `ops()` once before
compiling: the first call builds and loads the library, which a traced function cannot do). Bad operands raise
CpuKernelInputError (one line); a machine without a compiler raises CpuKernelBuildError from `ops()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpmctl_cpu.build import CpuKernelInputError, load_ops

ACTIVATIONS = {"relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "drelu": 4}
_ops = None


def ops():
    """torch.ops.cpmctl_sparse_ffn, built on first use (CpuKernelBuildError where it cannot be)."""
    global _ops
    if _ops is None:
        loaded = load_ops("sparse_ffn")
        _register_fakes()
        _ops = loaded
    return _ops


def _register_fakes() -> None:
    lib = "cpmctl_sparse_ffn"

    @torch.library.register_fake(f"{lib}::moe_ffn")
    def _(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation):
        return x.new_empty(x.shape)

    @torch.library.register_fake(f"{lib}::threshold_gemv")
    def _(x, rows, threshold, bias):
        return x.new_empty(x.shape[0], rows.shape[1])

    @torch.library.register_fake(f"{lib}::threshold_ffn")
    def _(x, rows_in, rows_gate, rows_out, b_in, b_gate, b_out, threshold_in, threshold_hidden, activation):
        return x.new_empty(x.shape)


# -- operand checks ----------------------------------------------------------------------------------
def _fail(message: str) -> None:
    raise CpuKernelInputError(message)


def _check_float(op: str, name: str, t, shape: tuple | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        _fail(f"{op}: {name} must be on the CPU, got {t.device}")
    if t.dtype != torch.float32:
        _fail(f"{op}: {name} must be float32, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        _fail(f"{op}: {name} must be contiguous")


def _activation(op: str, activation: str) -> int:
    code = ACTIVATIONS.get(activation)
    if code is None:
        _fail(f"{op}: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    return code


def _threshold(op: str, name: str, t) -> torch.Tensor:
    if isinstance(t, (int, float)):
        return torch.tensor(float(t))
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.device.type != "cpu" or not t.is_floating_point():
        _fail(f"{op}: {name} must be a number or a one-element float CPU tensor")
    return t.float()


# -- launchers -----------------------------------------------------------------------------------------
def moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation: str) -> torch.Tensor:
    """sum_j weight[n, j] * expert_{ids[n, j]}(x[n]) (+ b_out) -> [N, d] (see the module docstring)."""
    op = "moe_ffn"
    _check_float(op, "w_in", w_in)
    if w_in.dim() != 3:
        _fail(f"{op}: w_in must be [E, d_e, d], got {list(w_in.shape)}")
    e, de, d = w_in.shape
    _check_float(op, "x", x)
    if x.dim() != 2 or x.shape[1] != d:
        _fail(f"{op}: x must be [N, {d}] (d of the experts), got {list(x.shape)}")
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype != torch.int64 or expert_ids.dim() != 2 \
            or expert_ids.shape[0] != x.shape[0] or expert_ids.device.type != "cpu":
        _fail(f"{op}: expert_ids must be an int64 CPU tensor [N, k] with N = {x.shape[0]}")
    n, k = expert_ids.shape
    if expert_weights is not None:
        _check_float(op, "expert_weights", expert_weights, (n, k))
    _check_float(op, "w_out", w_out, (e, de, d))
    if w_gate is not None:
        _check_float(op, "w_gate", w_gate, (e, de, d))
    for name, b in (("b_in", b_in), ("b_gate", b_gate)):
        if b is not None:
            _check_float(op, name, b, (e, de))
    if b_gate is not None and w_gate is None:
        _fail(f"{op}: b_gate given without w_gate")
    if b_out is not None:
        _check_float(op, "b_out", b_out, (d,))
    code = _activation(op, activation)
    try:  # the kernel checks each id against E as it reads it (no extra pass here)
        return ops().moe_ffn(x, expert_ids.contiguous(), expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, code)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if first.startswith(f"{op}: "):
            raise CpuKernelInputError(first) from None
        raise


def threshold_gemv(x, rows, threshold, bias=None) -> torch.Tensor:
    """x [N, K] @ rows [K, M] (+ bias [M]) over the entries |x| > threshold only -> [N, M]."""
    op = "threshold_gemv"
    _check_float(op, "x", x)
    _check_float(op, "rows", rows)
    if x.dim() != 2 or rows.dim() != 2 or rows.shape[0] != x.shape[1]:
        _fail(f"{op}: x [N, K] and rows [K, M] must be 2-D with matching K, got {list(x.shape)} and {list(rows.shape)}")
    if bias is not None:
        _check_float(op, "bias", bias, (rows.shape[1],))
    return ops().threshold_gemv(x, rows, _threshold(op, "threshold", threshold), bias)


def threshold_ffn(x, rows_in, rows_gate, rows_out, b_in, b_gate, b_out, threshold_in, threshold_hidden,
                  activation: str) -> torch.Tensor:
    """The thresholded FFN on x [N, d]: rows_in / rows_gate [d, d_ff] and rows_out [d_ff, d] are the
    three weights transposed (one row per input entry) -> [N, d]."""
    op = "threshold_ffn"
    _check_float(op, "x", x)
    _check_float(op, "rows_in", rows_in)
    if x.dim() != 2 or rows_in.dim() != 2 or rows_in.shape[0] != x.shape[1]:
        _fail(f"{op}: x [N, d] and rows_in [d, d_ff] must match in d, got {list(x.shape)} and {list(rows_in.shape)}")
    d, d_ff = rows_in.shape
    if rows_gate is not None:
        _check_float(op, "rows_gate", rows_gate, (d, d_ff))
    _check_float(op, "rows_out", rows_out, (d_ff, d))
    for name, b, size in (("b_in", b_in, d_ff), ("b_gate", b_gate, d_ff), ("b_out", b_out, d)):
        if b is not None:
            _check_float(op, name, b, (size,))
    if b_gate is not None and rows_gate is None:
        _fail(f"{op}: b_gate given without rows_gate")
    code = _activation(op, activation)
    return ops().threshold_ffn(x, rows_in, rows_gate, rows_out, b_in, b_gate, b_out,
                               _threshold(op, "threshold_in", threshold_in),
                               _threshold(op, "threshold_hidden", threshold_hidden), code)


# -- torch references ----------------------------------------------------------------------------------
_TORCH_ACTIVATIONS = {"relu": F.relu, "drelu": F.relu, "silu": F.silu, "gelu": F.gelu,
                      "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _hidden_reference(up, gate, activation):
    act = _TORCH_ACTIVATIONS[activation]
    if gate is None:
        return act(up)
    return act(gate) * (F.relu(up) if activation == "drelu" else up)


def moe_ffn_reference(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation):
    """moe_ffn in plain torch, one (token, expert) pair at a time."""
    n, k = expert_ids.shape
    out = torch.zeros_like(x)
    for t in range(n):
        for j in range(k):
            e = int(expert_ids[t, j])
            up = w_in[e] @ x[t] + (0 if b_in is None else b_in[e])
            gate = None if w_gate is None else w_gate[e] @ x[t] + (0 if b_gate is None else b_gate[e])
            h = _hidden_reference(up, gate, activation)
            if expert_weights is not None:
                h = h * expert_weights[t, j]
            out[t] += h @ w_out[e]
    return out if b_out is None else out + b_out


def threshold_gemv_reference(x, rows, threshold, bias=None):
    kept = x.masked_fill(x.abs() <= float(threshold), 0.0)
    out = kept @ rows
    return out if bias is None else out + bias


def threshold_ffn_reference(x, rows_in, rows_gate, rows_out, b_in, b_gate, b_out, threshold_in, threshold_hidden,
                            activation):
    up = threshold_gemv_reference(x, rows_in, threshold_in, b_in)
    gate = None if rows_gate is None else threshold_gemv_reference(x, rows_gate, threshold_in, b_gate)
    hidden = _hidden_reference(up, gate, activation)
    return threshold_gemv_reference(hidden, rows_out, threshold_hidden, b_out)


__all__ = ["ACTIVATIONS", "moe_ffn", "moe_ffn_reference", "ops", "threshold_ffn", "threshold_ffn_reference",
           "threshold_gemv", "threshold_gemv_reference"]
