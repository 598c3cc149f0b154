"""MoEfication's routers: initialised from the expert centres, MLP routers trained to predict each
expert's activation mass, and router recall.

`train_mlp_router(s)`: BCE of the router's logits against each expert's activation mass scaled by
the token's largest mass (Adam, batch 512 as in the paper); all layers' routers train together as
one stacked model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmctl.moe import MLPRouter, MoEFeedForward

from cpmctl.command_configs import ROUTERS


def expert_mass(moe: MoEFeedForward, x: Tensor, chunk: int = 4096) -> Tensor:
    """Activation mass of each expert [N, E] for inputs x [N, d], in chunks."""
    with torch.no_grad():
        return torch.cat([moe.expert_scores(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]) if x.numel() else x.new_zeros(0, moe.num_experts)


def expert_centres(moe: MoEFeedForward) -> Tensor:
    """Each expert's centre [E, d]: the mean of its L2-normalised neuron vectors (the rows of the
    matrix that goes through the activation: w_gate for gated FFNs, else w_in), normalised."""
    rows = moe.w_gate if moe.w_gate is not None else moe.w_in
    return F.normalize(F.normalize(rows.detach().float(), dim=-1).sum(1), dim=-1)


def router_targets(mass: Tensor) -> Tensor:
    """BCE targets in [0, 1]: each token's expert masses divided by its largest."""
    return mass / mass.max(dim=-1, keepdim=True).values.clamp(min=1e-12)


def train_mlp_router(router: MLPRouter, inputs: Tensor, targets: Tensor, *, epochs: int = 10, batch_size: int = 512,
                     lr: float = 1e-2, seed: int = 0, max_steps: int | None = None) -> list[float]:
    """Fit the router with BCE-with-logits; returns the mean loss of each epoch."""
    return train_mlp_routers([router], [inputs], [targets], epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             max_steps=max_steps)[0]


def train_mlp_routers(routers: list[MLPRouter], inputs: list[Tensor], targets: list[Tensor], *, epochs: int = 10,
                      batch_size: int = 512, lr: float = 1e-2, seed: int = 0, max_steps: int | None = None) -> list[list[float]]:
    """Fit several layers' routers at once; returns each router's mean loss per epoch.

    Routers with the same number of examples train as one stacked model (batched matmuls over
    the layers), so a step costs one optimiser update for all of them instead of one per layer.
    Each layer's loss is its own mean BCE and Adam works element by element, so this is the same
    training as fitting each router alone with the same seed (every router sees its examples in
    the same shuffled order). Inputs are L2-normalised once here, not at every step.
    """
    losses: list[list[float]] = [[] for _ in routers]
    groups: dict[tuple, list[int]] = {}
    for i, (router, x) in enumerate(zip(routers, inputs)):
        groups.setdefault((x.shape[0], router.proj.in_features, router.proj.out_features), []).append(i)
    threads = torch.get_num_threads()
    # The router's matmuls are small: one thread avoids OpenMP barrier stalls, which dominate
    # on a busy machine.
    torch.set_num_threads(1)
    try:
        for members in groups.values():
            stacked = _StackedRouters([routers[i] for i in members])
            # [N, L, d]: a batch is one gather of whole rows, viewed as [L, B, d] for the matmuls.
            x = torch.stack([F.normalize(inputs[i].float(), dim=-1) for i in members], dim=1)
            t = torch.stack([targets[i].float() for i in members], dim=1)
            for i, curve in zip(members, _fit_stacked(stacked, x, t, epochs, batch_size, lr, seed, max_steps)):
                losses[i] = curve
            stacked.write_back()
    finally:
        torch.set_num_threads(threads)
    return losses


class _StackedRouters(nn.Module):
    """L MLP routers as stacked tensors: logits = tanh(x W1 + b1) W2 + b2, batched over layers."""

    def __init__(self, routers: list[MLPRouter]) -> None:
        super().__init__()
        self.routers = routers  # a plain list: their own parameters are not trained here

        def stack(get) -> nn.Parameter:
            return nn.Parameter(torch.stack([get(r).detach().float() for r in routers]).contiguous())

        self.w1 = stack(lambda r: r.proj.weight.T)  # [L, d, E]
        self.b1 = stack(lambda r: r.proj.bias[None])  # [L, 1, E]
        self.w2 = stack(lambda r: r.mix.weight.T)  # [L, E, E]
        self.b2 = stack(lambda r: r.mix.bias[None])  # [L, 1, E]

    def forward(self, x: Tensor) -> Tensor:  # x [L, B, d] (any strides), already normalised
        return torch.baddbmm(self.b2, torch.tanh(torch.baddbmm(self.b1, x, self.w1)), self.w2)

    @torch.no_grad()
    def write_back(self) -> None:
        for i, r in enumerate(self.routers):
            r.proj.weight.copy_(self.w1[i].T)
            r.proj.bias.copy_(self.b1[i, 0])
            r.mix.weight.copy_(self.w2[i].T)
            r.mix.bias.copy_(self.b2[i, 0])


def _fit_stacked(model: _StackedRouters, x: Tensor, t: Tensor, epochs: int, batch_size: int, lr: float, seed: int,
                 max_steps: int | None) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n, layers = x.shape[:2]
    curves: list[list[float]] = [[] for _ in range(layers)]
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            total, batches = torch.zeros(layers), 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                logits = model(x.index_select(0, idx).transpose(0, 1))
                per_layer = F.binary_cross_entropy_with_logits(logits, t.index_select(0, idx).transpose(0, 1), reduction="none").mean(dim=(1, 2))
                optimizer.zero_grad(set_to_none=True)
                per_layer.sum().backward()
                optimizer.step()
                total += per_layer.detach()
                batches, step = batches + 1, step + 1
                if max_steps is not None and step >= max_steps:
                    break
            for curve, value in zip(curves, (total / max(1, batches)).tolist()):
                curve.append(value)
            if max_steps is not None and step >= max_steps:
                break
    return curves


def recall(mass: Tensor, selected: Tensor) -> Tensor:
    """Per token, the share of its activation mass [N, E] inside the selected experts [N, k]."""
    return mass.gather(1, selected).sum(1) / mass.sum(1).clamp(min=1e-12)


def top_k_for(experts: int, *, top_k: int | None, ratio: float | None) -> int:
    """k as given, or from the share of experts `ratio` (rounded, at least 1)."""
    if top_k is not None:
        return top_k
    return max(1, min(experts, round(ratio * experts)))


def init_router(moe, router: str, inputs):
    """Set the router's parameters from the expert centres; for the MLP router, returns its
    training targets (each expert's activation mass on the sampled inputs), else None."""
    if router == "oracle":
        return None
    centres = expert_centres(moe).to(moe.w_in.dtype)
    if router == "center":
        moe.router.weight.data.copy_(centres)
        return None
    moe.router.init_from_centres(centres)
    return router_targets(expert_mass(moe, inputs))


def train_routers(moes: dict[str, Any], inputs: dict[str, Any], targets: dict[str, Any], *, epochs: int, seed: int,
                  max_steps: int | None = None) -> dict[str, dict[str, Any]]:
    """Train every layer's MLP router together (see `train_mlp_routers`); per-layer statistics."""
    names = list(targets)
    if not names:
        return {}
    curves = train_mlp_routers([moes[n].router for n in names], [inputs[n] for n in names], [targets[n] for n in names],
                               epochs=epochs, seed=seed, max_steps=max_steps)
    return {n: {"router_loss_first": round(c[0], 5), "router_loss_last": round(c[-1], 5), "router_examples": int(inputs[n].shape[0])}
            for n, c in zip(names, curves)}
