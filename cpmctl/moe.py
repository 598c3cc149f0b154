"""Mixture-of-experts FFN: the layout every MoE path in cpmctl shares.

Experts are contiguous blocks of FFN neurons:
    w_in   [E, d_e, d]   (up projection rows of each expert)
    w_gate [E, d_e, d]   (gated FFNs only)
    w_out  [E, d_e, d]   (the down projection stored transposed, so it is a row gather too)
    router.weight [E, d]
A token goes to its `top_k` experts by router logit; their outputs are combined with a softmax
over the selected logits. With top_k = 1 that weight is exactly 1, which keeps an upcycled MoE
(every expert a copy of the dense FFN) equal to the dense model, but gives the router no gradient
from the LM loss: routers are trained on their own (MoEfication) or kept frozen (CPM-2). The torch path computes only the selected experts, each on the rows
routed to it, reading views of the expert blocks (no weight copies).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cpmctl.config import ModelConfig
from cpmctl.model import ACTIVATIONS


class MoEFeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        e, de, d = moe.experts, moe.expert_size, config.d_model
        self.top_k, self.activation = moe.top_k, config.activation
        self.w_in = nn.Parameter(torch.empty(e, de, d))
        self.w_gate = nn.Parameter(torch.empty(e, de, d)) if config.gated else None
        self.w_out = nn.Parameter(torch.empty(e, de, d))
        self.b_in = nn.Parameter(torch.zeros(e, de)) if config.bias else None
        self.b_gate = nn.Parameter(torch.zeros(e, de)) if (config.bias and config.gated) else None
        self.b_out = nn.Parameter(torch.zeros(d)) if config.bias else None
        self.router = nn.Linear(d, e, bias=False)

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @torch.no_grad()
    def reset_expert_parameters(self, std: float) -> None:
        for p in (self.w_in, self.w_gate, self.w_out):
            if p is not None:
                nn.init.normal_(p, std=std)
        for p in (self.b_in, self.b_gate, self.b_out):
            if p is not None:
                nn.init.zeros_(p)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(experts [N, k], weights [N, k]) for flattened tokens x [N, d]."""
        logits, experts = self.router(x).topk(self.top_k, dim=-1)
        return experts, torch.softmax(logits.float(), dim=-1).to(x.dtype)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Output of expert e on rows x [n, d] -> [n, d]."""
        act = ACTIVATIONS[self.activation]
        up = x @ self.w_in[e].T
        if self.b_in is not None:
            up = up + self.b_in[e]
        if self.w_gate is None:
            hidden = act(up)
        else:
            gate = x @ self.w_gate[e].T
            if self.b_gate is not None:
                gate = gate + self.b_gate[e]
            hidden = act(gate) * up
        return hidden @ self.w_out[e]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights = self.route(flat)
        out = torch.zeros_like(flat)
        for e in experts.unique().tolist():
            rows, slot = (experts == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.expert_forward(e, flat[rows]) * weights[rows, slot, None])
        if self.b_out is not None:
            out = out + self.b_out
        return out.view(shape)
