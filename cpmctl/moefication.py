"""MoEfication's algorithms (Zhang et al. 2022): split an FFN's neurons into equal experts, collect
activation statistics in bounded memory, build and train routers, measure router recall.

- `balanced_kmeans`: spherical k-means on L2-normalised neuron vectors where every cluster holds
  exactly `size` neurons. Between centroid updates a greedy capacity-limited assignment (each
  neuron proposes to its best non-full cluster, each cluster keeps its best proposers) replaces
  the exact constrained solver, so d_ff = 10240 takes seconds.
- `coactivation_partition`: groups neurons that are active on the same tokens: the same balanced
  k-means on each neuron's activity profile over sampled tokens (the co-activation graph's edge
  weights are the profiles' inner products), with no external graph partitioner.
- `Reservoir`: a fixed-size uniform sample of FFN inputs per layer (Vitter's algorithm R in
  chunks); every statistic (activation masses, co-activations, router targets) is recomputed from
  the sampled inputs, so memory is bounded by the reservoir, not by the data.
- `train_mlp_router(s)`: BCE of the router's logits against each expert's activation mass scaled
  by the token's largest mass (Adam, batch 512 as in the paper); all layers' routers train
  together as one stacked model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmctl.moe import MLPRouter, MoEFeedForward


# -- splits -----------------------------------------------------------------------------------------
def balanced_assign(scores: Tensor, capacity: int) -> Tensor:
    """Labels [n] maximising scores greedily with at most `capacity` points per cluster.

    Rounds: every unassigned point proposes to its best cluster that still has room; each cluster
    accepts its highest-scoring proposers up to its room. A round fills a cluster or assigns
    everyone, so there are at most k + 1 rounds, each a few vectorised passes.
    """
    n, k = scores.shape
    if n > k * capacity:
        raise ValueError(f"{n} points do not fit in {k} clusters of {capacity}")
    scores = scores.clone().float()
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    pending = torch.arange(n)
    while pending.numel():
        best_score, best = scores[pending].max(1)
        # Sort proposals by cluster, best score first within a cluster, to rank them.
        order = torch.argsort(best_score, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        cluster = best[order]
        first = torch.searchsorted(cluster, cluster, right=False)
        rank = torch.arange(order.numel()) - first
        accepted = rank < room[cluster]
        chosen = order[accepted]
        labels[pending[chosen]] = best[chosen]
        room -= torch.bincount(best[chosen], minlength=k)
        scores[:, room == 0] = -math.inf
        keep = torch.ones(pending.numel(), dtype=torch.bool)
        keep[chosen] = False
        pending = pending[keep]
    return labels


def balanced_kmeans(points: Tensor, clusters: int, size: int, *, iterations: int = 15, seed: int = 0) -> Tensor:
    """Labels [n] of spherical k-means with `size` points per cluster at most (exactly `size`
    when n == clusters * size). Points are L2-normalised here."""
    # Contiguous rows: co-activation profiles arrive transposed, and the centroid sums below
    # gather whole rows (strided rows made them ten times slower).
    x = F.normalize(points.float(), dim=-1).contiguous()
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n, generator=g)[:clusters]].clone()
    if centres.shape[0] < clusters:  # fewer points than clusters (padding experts)
        centres = torch.cat([centres, F.normalize(torch.randn(clusters - n, x.shape[1], generator=g), dim=-1)])
    labels = None
    for _ in range(iterations):
        new = balanced_assign(x @ centres.T, size)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        empty = torch.bincount(labels, minlength=clusters) == 0
        centres = torch.where(empty[:, None], centres, F.normalize(sums, dim=-1))
    return labels


def random_partition(n: int, clusters: int, size: int, *, seed: int = 0) -> Tensor:
    """Labels [n] of a random split into clusters of `size` (the baseline)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.arange(clusters).repeat_interleave(size)[:n]
    return slots[torch.randperm(n, generator=g)]


def activation_profiles(hidden: Tensor, fill: Tensor, out_norms: Tensor) -> Tensor:
    """Each neuron's activity profile over sampled tokens [d_ff, tokens]: |activation - fill|
    times the norm of its output weights (what the neuron adds to each token's output)."""
    return ((hidden - fill).abs() * out_norms).T


def coactivation_partition(profiles: Tensor, clusters: int, size: int, *, seed: int = 0) -> Tensor:
    """Balanced partition of the co-activation graph whose edge weights are the inner products
    of the neurons' (normalised) activity profiles: spherical balanced k-means on the profiles
    maximises the within-expert edge weight, with no external graph partitioner. For binary
    profiles the edge weights are co-activation counts."""
    return balanced_kmeans(profiles, clusters, size, seed=seed)


def perm_from_labels(labels: Tensor, clusters: int, size: int) -> Tensor:
    """Expert-ordered neuron indices [clusters * size]: expert e's neurons (ascending) at
    e*size.., padded with -1 where a cluster holds fewer than `size` neurons."""
    perm = torch.full((clusters * size,), -1, dtype=torch.long)
    order = torch.argsort(labels * (labels.numel() + 1) + torch.arange(labels.numel()))
    counts = torch.bincount(labels, minlength=clusters)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(labels.numel()) - starts[labels[order]]
    perm[labels[order] * size + position] = order
    return perm


# -- activation statistics ----------------------------------------------------------------------
class Reservoir:
    """A uniform sample of at most `capacity` rows from a stream of [n, d] chunks (algorithm R)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self.rows: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, chunk: Tensor) -> None:
        chunk = chunk.detach().reshape(-1, chunk.shape[-1]).float().cpu()
        if self.rows is None:
            self.rows = torch.empty(self.capacity, chunk.shape[1])  # allocated once: bounded memory
        free = self.capacity - self.seen
        if free > 0:
            take = chunk[:free]
            self.rows[self.seen : self.seen + take.shape[0]] = take
            self.seen += take.shape[0]
            chunk = chunk[free:]
        if chunk.shape[0] == 0:
            return
        # Row number t (1-based, t > capacity) replaces a random slot with probability capacity / t.
        t = self.seen + torch.arange(1, chunk.shape[0] + 1, dtype=torch.float64)
        draw = torch.rand(chunk.shape[0], generator=self.generator, dtype=torch.float64) * t
        slot = draw.long()
        hit = slot < self.capacity
        # Later rows win when two hit the same slot, as in the sequential algorithm.
        self.rows[slot[hit]] = chunk[hit]
        self.seen += chunk.shape[0]

    def sample(self) -> Tensor:
        return self.rows[: min(self.seen, self.capacity)] if self.rows is not None else torch.empty(0)


class FFNInputRecorder:
    """Forward pre-hooks that feed each chosen FFN's inputs (real tokens only) into a Reservoir."""

    def __init__(self, ffns: dict[str, nn.Module], capacity: int, seed: int = 0) -> None:
        self.reservoirs = {name: Reservoir(capacity, seed + i) for i, name in enumerate(ffns)}
        self.keep: Tensor | None = None  # bool mask of the real (non-padding) tokens of the batch
        self.handles = [ffn.register_forward_pre_hook(self._hook(name)) for name, ffn in ffns.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            if self.keep is not None and self.keep.numel() == flat.shape[0]:
                flat = flat[self.keep.reshape(-1)]
            self.reservoirs[name].add(flat)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# -- routers ---------------------------------------------------------------------------------------
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
    """k from --top-k, or from --ratio (rounded, at least 1)."""
    if top_k is not None:
        return top_k
    return max(1, min(experts, round(ratio * experts)))
