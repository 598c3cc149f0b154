"""Pure-torch references of every kernel op, with the same signatures and semantics.

They are the ground truth of tests/test_kernels.py, and `moe_ffn_reference` computes exactly what
cpmctl.moe.MoEFeedForward computes for given routing (the tests hold the two together), in fp32
whatever the input dtype, returning the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmctl_kernels.routing import MoEAlignment, max_padded_entries

REFERENCE_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}


def route_reference(router_logits: Tensor, k: int, softmax: str = "topk") -> tuple[Tensor, Tensor]:
    """(expert_ids [N, k] int64, weights [N, k] in the logits' dtype)."""
    logits = router_logits.float()
    top, ids = logits.topk(k, dim=-1)
    if softmax == "topk":
        weights = torch.softmax(top, dim=-1)
    else:
        weights = torch.softmax(logits, dim=-1).gather(-1, ids)
    return ids, weights.to(router_logits.dtype)


def moe_align_reference(expert_ids: Tensor, num_experts: int, block_size: int) -> MoEAlignment:
    """The same alignment, built with a stable sort on the host."""
    flat = expert_ids.reshape(-1).long().cpu()
    num_entries = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    order = torch.sort(flat, stable=True).indices
    max_padded = max_padded_entries(num_entries, num_experts, block_size)
    sorted_ids = torch.full((max_padded,), num_entries, dtype=torch.int32)
    block_experts = torch.full((max_padded // block_size,), -1, dtype=torch.int32)
    pos = taken = 0
    for e in range(num_experts):
        c = int(counts[e])
        sorted_ids[pos:pos + c] = order[taken:taken + c].int()
        padded = -(-c // block_size) * block_size
        block_experts[pos // block_size:(pos + padded) // block_size] = e
        pos, taken = pos + padded, taken + c
    device = expert_ids.device
    return MoEAlignment(sorted_ids.to(device), block_experts.to(device), torch.tensor([pos], dtype=torch.int32, device=device),
                        counts.int().to(device), block_size, num_entries)


def expert_hidden_reference(x: Tensor, w_in: Tensor, w_gate: Tensor | None, b_in: Tensor | None,
                            b_gate: Tensor | None, activation: str) -> Tensor:
    """act(x W_gate^T + b_gate) * (x W_in^T + b_in) for one expert (ungated: act(x W_in^T + b_in))."""
    act = REFERENCE_ACTIVATIONS[activation]
    up = x @ w_in.T
    if b_in is not None:
        up = up + b_in
    if w_gate is None:
        return act(up)
    gate = x @ w_gate.T
    if b_gate is not None:
        gate = gate + b_gate
    return act(gate) * up


def moe_ffn_reference(x: Tensor, expert_ids: Tensor, expert_weights: Tensor, w_in: Tensor,
                      w_gate: Tensor | None, w_out: Tensor, b_in: Tensor | None = None,
                      b_gate: Tensor | None = None, b_out: Tensor | None = None,
                      activation: str = "relu") -> Tensor:
    """sum_j weight[n, j] * expert_{ids[n, j]}(x[n]) (+ b_out), in fp32, returned in x's dtype."""
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    xf, weights = x.float(), expert_weights.float()
    out = torch.zeros_like(xf)
    for e in expert_ids.unique().tolist():
        rows, slot = (expert_ids == e).nonzero(as_tuple=True)
        hidden = expert_hidden_reference(xf[rows], w_in[e].float(), None if w_gate is None else w_gate[e].float(),
                                         None if b_in is None else b_in[e].float(),
                                         None if b_gate is None else b_gate[e].float(), activation)
        out.index_add_(0, rows, (hidden @ w_out[e].float()) * weights[rows, slot, None])
    if b_out is not None:
        out = out + f32(b_out)
    return out.to(x.dtype)


def dequantize_reference(w) -> Tensor:
    """A `QuantizedWeights` stack [E, out, in] in fp32, by the format's definition
    (cpmctl_kernels.quant): int8 q * scale, int4 (q - 8) * scale + zero per group."""
    if w.scheme == "int8":
        return w.qweight.float() * w.scales.float()
    q = torch.stack((w.qweight & 0x0F, w.qweight >> 4), dim=-1).flatten(-2).float() - 8
    grouped = q.view(*q.shape[:-1], -1, w.group_size)
    return (grouped * w.scales.float()[..., None] + w.zeros.float()[..., None]).view(q.shape)


def quantized_moe_ffn_reference(x: Tensor, expert_ids: Tensor, expert_weights: Tensor, w_in, w_gate, w_out,
                                b_in: Tensor | None = None, b_gate: Tensor | None = None, b_out: Tensor | None = None,
                                activation: str = "relu") -> Tensor:
    """`moe_ffn_reference` on the dequantized weights (w_out given in its linear form [E, d, d_e])."""
    return moe_ffn_reference(x, expert_ids, expert_weights, dequantize_reference(w_in),
                             None if w_gate is None else dequantize_reference(w_gate),
                             dequantize_reference(w_out).transpose(1, 2), b_in, b_gate, b_out, activation)
