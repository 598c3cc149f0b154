"""The dense feed-forward block and its activations: what every Transformer block holds, and what
MoEfication regroups into experts (cpmctl.moe builds on it, cpmctl.model places it).

`ThresholdFeedForward` is the dense FFN with training-free activation sparsity (TEAL, Liu et al.
2024): each matrix skips the input entries whose magnitude is below the layer's calibrated
threshold. The FFN input below `threshold_in` is dropped before the up (and gate) projections,
the hidden activation below `threshold_hidden` before the down projection. A dropped input
entry is a row of the transposed weight that is never read, so a decoding token reads only the
kept rows: one gather-and-sum over rows (`torch.nn.functional.embedding_bag`, the row gather the
MoE experts' transposed down projection also uses) per matrix."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    # dReLU (Turbo Sparse, 2024): a ReLU on the gate *and* the up branch of a gated FFN
    # (`gated_hidden` applies the second one); on a single tensor it is a ReLU.
    "drelu": F.relu,
}


def gated_hidden(gate: Tensor, up: Tensor, activation: str, *, in_place: bool = False) -> Tensor:
    """act(gate) * up (dReLU: relu(gate) * relu(up)). `in_place` reuses the activation's buffer
    (inference only: one [tokens, d_ff] allocation less)."""
    act = ACTIVATIONS[activation](gate)
    if activation == "drelu":
        up = F.relu(up)
    return act.mul_(up) if in_place else act * up


class FeedForward(nn.Module):
    """Dense FFN: `w_out(act(w_in x))`, or gated `w_out(act(w_gate x) * w_in x)`.

    Rows of `w_in`/`w_gate` and columns of `w_out` are the FFN's neurons; MoEfication regroups
    them into experts.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.w_in = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.w_gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias) if config.gated else None
        self.w_out = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def hidden(self, x: Tensor) -> Tensor:
        """The FFN's neuron activations (what routers and MoEfication statistics look at)."""
        if self.w_gate is None:
            return ACTIVATIONS[self.activation](self.w_in(x))
        # Without autograd the product can reuse the activation's buffer: one large
        # [tokens, d_ff] allocation less per layer (about 2% of a CPU forward).
        return gated_hidden(self.w_gate(x), self.w_in(x), self.activation, in_place=not torch.is_grad_enabled())

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(self.hidden(x))


def below_threshold_zeroed(x: Tensor, threshold: Tensor) -> Tensor:
    """x with the entries of magnitude <= threshold set to 0 (TEAL's sparsification)."""
    return x.masked_fill(x.abs() <= threshold, 0.0)


# Tokens up to which the FFN reads only the kept weight rows; beyond, the masked dense matmuls
# are faster (every row is needed by some token anyway).
GATHER_MAX_TOKENS = 8

# -- the C++ CPU kernels (cpmctl_cpu.sparse_ffn) ---------------------------------------------------------
# `kernels = "cpu"` on a thresholded or MoE FFN: up to GATHER_MAX_TOKENS tokens of fp32 without
# autograd run as one C++ call that reads only the weight rows used. The kernel is compiled on first
# use; where that fails the layers keep the torch path and say so once.
_cpu_ops: object | None = None
_cpu_problem: str | None = None


def cpu_sparse_ops():
    """torch.ops of cpmctl_cpu.sparse_ffn, or None (with a one-time note) where it cannot be built."""
    global _cpu_ops, _cpu_problem
    if _cpu_ops is None and _cpu_problem is None:
        try:
            from cpmctl_cpu import CpuKernelBuildError  # the C++ kernels: imported (and built) on first use
            from cpmctl_cpu import sparse_ffn
        except ImportError as exc:
            _cpu_problem = f"the cpmctl_cpu package is not importable ({exc})"
        else:
            try:
                sparse_ffn.ops()
                _cpu_ops = sparse_ffn
            except CpuKernelBuildError as exc:
                _cpu_problem = str(exc)
        if _cpu_problem is not None:
            import warnings

            warnings.warn(f"note: the sparse FFNs run on the torch path: {_cpu_problem}", stacklevel=2)
    return _cpu_ops


def cpu_kernel_fits(x: Tensor, *weights: Tensor | None) -> bool:
    """Decode-sized fp32 CPU work without autograd on contiguous weights: what the C++ sparse kernels
    take (anything else keeps the torch path)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[0] > GATHER_MAX_TOKENS or x.shape[0] == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w is not None and w.requires_grad for w in weights)):
        return False
    return all(w is None or (isinstance(w, Tensor) and w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous())
               for w in weights)


class ThresholdFeedForward(FeedForward):
    """A dense FFN that skips small activations: `threshold_in` on its input, `threshold_hidden`
    on its hidden activations (buffers, calibrated by `cpmctl moefy --method threshold`).

    The weights are the dense FFN's, unchanged (restoring the dense model drops the two
    buffers). Training and many tokens run the masked dense matmuls; up to GATHER_MAX_TOKENS
    tokens without autograd, each matrix reads only the rows of its transposed weight that a
    kept entry multiplies (`embedding_bag` over the kept (token, entry) pairs). The transposed
    copies are made on the first such call and kept while the weights do not change.
    `kernels = "triton"` runs those gathers as the masked decode GEMV of `cpmctl_kernels`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.register_buffer("threshold_in", torch.zeros(()))
        self.register_buffer("threshold_hidden", torch.zeros(()))
        self.kernels = "torch"
        self._rows: dict[str, Tensor] = {}
        self._rows_key: tuple | None = None

    def hidden(self, x: Tensor) -> Tensor:
        """The hidden activations the down projection reads (both thresholds applied)."""
        return below_threshold_zeroed(super().hidden(below_threshold_zeroed(x, self.threshold_in)), self.threshold_hidden)

    def unthresholded_hidden(self, x: Tensor) -> Tensor:
        """The dense FFN's activations on x, no threshold applied (calibration measures these)."""
        return super().hidden(x)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] > GATHER_MAX_TOKENS or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return self.w_out(self.hidden(x))
        rows = self.weight_rows()
        if self.kernels == "triton":
            return triton_threshold_ffn(self, flat, rows).view(shape)
        if self.kernels == "cpu" and cpu_kernel_fits(flat, rows["w_in"]) and (kernel := cpu_sparse_ops()) is not None:
            return cpu_threshold_ffn(kernel, self, flat, rows).view(shape)
        up = gathered_matmul(flat, rows["w_in"], self.threshold_in, self.w_in.bias)
        if self.w_gate is None:
            hidden = ACTIVATIONS[self.activation](up)
        else:
            hidden = gated_hidden(gathered_matmul(flat, rows["w_gate"], self.threshold_in, self.w_gate.bias), up,
                                  self.activation, in_place=True)
        return gathered_matmul(hidden, rows["w_out"], self.threshold_hidden, self.w_out.bias).view(shape)

    def weight_rows(self) -> dict[str, Tensor]:
        """Each matrix transposed ([inputs, outputs], contiguous): a kept input entry reads one row."""
        linears = {"w_in": self.w_in, "w_gate": self.w_gate, "w_out": self.w_out}
        key = tuple((l.weight.data_ptr(), l.weight._version) for l in linears.values() if l is not None)
        if key != self._rows_key:
            with torch.no_grad():
                self._rows = {name: l.weight.detach().T.contiguous() for name, l in linears.items() if l is not None}
            self._rows_key = key
        return self._rows


def gathered_matmul(x: Tensor, rows: Tensor, threshold: Tensor, bias: Tensor | None) -> Tensor:
    """`x @ rows` (+ bias) for x [n, k], rows [k, m], reading only the rows whose x entry is
    above the threshold in magnitude: a weighted sum of gathered rows per token."""
    keep = x.abs() > threshold
    token, entry = keep.nonzero(as_tuple=True)
    offsets = torch.searchsorted(token, torch.arange(x.shape[0], device=x.device))
    out = F.embedding_bag(entry, rows, offsets, mode="sum", per_sample_weights=x[token, entry].to(rows.dtype))
    return out if bias is None else out + bias


def cpu_threshold_ffn(kernel, ffn: ThresholdFeedForward, x: Tensor, rows: dict[str, Tensor]) -> Tensor:
    """The thresholded FFN as one call of the C++ kernel (`cpmctl_cpu.sparse_ffn.threshold_ffn`)."""
    from cpmctl_cpu import CpuKernelInputError

    bias = lambda linear: None if linear is None or linear.bias is None else linear.bias.detach()  # noqa: E731
    try:
        return kernel.threshold_ffn(x.contiguous(), rows["w_in"], rows.get("w_gate"), rows["w_out"], bias(ffn.w_in),
                                    bias(ffn.w_gate), bias(ffn.w_out), ffn.threshold_in, ffn.threshold_hidden, ffn.activation)
    except CpuKernelInputError as exc:
        raise UserError(str(exc)) from None


def triton_threshold_ffn(ffn: ThresholdFeedForward, x: Tensor, rows: dict[str, Tensor]) -> Tensor:
    """The thresholded FFN through `cpmctl_kernels.threshold_gemv` (a GEMV that skips the weight
    rows of entries below the threshold), one launch per matrix."""
    from cpmctl_kernels import KernelInputError, threshold_gemv  # optional dependency (triton): imported on first use

    try:
        up = threshold_gemv(x, rows["w_in"], ffn.threshold_in, ffn.w_in.bias)
        if ffn.w_gate is None:
            hidden = ACTIVATIONS[ffn.activation](up)
        else:
            hidden = gated_hidden(threshold_gemv(x, rows["w_gate"], ffn.threshold_in, ffn.w_gate.bias), up, ffn.activation)
        return threshold_gemv(hidden, rows["w_out"], ffn.threshold_hidden, ffn.w_out.bias)
    except KernelInputError as exc:
        raise UserError(str(exc)) from None
