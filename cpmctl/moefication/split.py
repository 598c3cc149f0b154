"""Splitting an FFN's neurons into equal experts (MoEfication, Zhang et al. 2022).

- `balanced_kmeans`: spherical k-means on L2-normalised neuron vectors where every cluster holds
  exactly `size` neurons. Between centroid updates a greedy capacity-limited assignment (each
  neuron proposes to its best non-full cluster, each cluster keeps its best proposers) replaces
  the exact constrained solver, so d_ff = 10240 takes seconds.
- `coactivation_partition`: groups neurons that are active on the same tokens: the same balanced
  k-means on each neuron's activity profile over sampled tokens (the co-activation graph's edge
  weights are the profiles' inner products), with no external graph partitioner.
- `split_layer`: one FFN's permutation by the chosen split (cluster / coactivation / random).
  For dReLU (a ReLU on both branches of a gated FFN) both branches' zeros count: the
  co-activation split reads the product's exact zeros, and the cluster split groups gate and up
  rows together (`cluster_points`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmctl.command_configs import SPLITS
from cpmctl.config import RELU_ACTIVATIONS
from cpmctl.errors import UserError


def expert_layout(d_ff: int, experts: int | None, expert_size: int | None, allow_uneven: bool) -> tuple[int, int]:
    """(E, d_e) with E * d_e >= d_ff; uneven splits (zero-padded experts) need allow_uneven."""
    if experts is not None:
        if experts > d_ff:
            raise UserError(f"{experts} experts are more than the FFN's {d_ff} neurons", option="experts")
        size = -(-d_ff // experts)
    else:
        if expert_size > d_ff:
            raise UserError(f"an expert size of {expert_size} is more than the FFN's {d_ff} neurons", option="expert_size")
        size = expert_size
        experts = -(-d_ff // size)
    if experts * size != d_ff:
        if not allow_uneven:
            raise UserError(
                f"d_ff {d_ff} does not split evenly into {experts} experts of {size} neurons; "
                "choose a divisor or allow uneven experts (the last experts get zero padding)", option="allow_uneven"
            )
        if experts * size - d_ff >= size:
            raise UserError(f"{experts} experts of {size} neurons leave a whole expert empty for d_ff {d_ff}; use fewer experts")
    return experts, size


def ffn_names(config) -> list[str]:
    """Every FFN of the model by stack and block: encoder.0, ..., decoder.0, ..."""
    names = []
    if config.has_encoder:
        names += [f"encoder.{i}" for i in range(config.blocks_in_stack("encoder"))]
    if config.has_decoder:
        names += [f"decoder.{i}" for i in range(config.blocks_in_stack("decoder"))]
    return names


def choose_layers(config, layers: list[str] | None) -> list[str]:
    """The FFNs named in `layers` (all when none are), in model order."""
    known = ffn_names(config)
    if not layers:
        return known
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise UserError(f"unknown layer {unknown[0]!r} among the FFNs to MoEfy; this model has {', '.join(known)}", option="layers")
    return [name for name in known if name in layers]


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


@dataclass
class NeuronSample:
    """One FFN's neuron activations on the first sampled inputs (dense neuron order), computed
    once for both the co-activation split and the fill of skipped experts."""

    hidden: Any  # [rows, d_ff]
    median: Any  # [d_ff]: each neuron's median activation, robust to the few huge ones


def neuron_sample(ffn, inputs, rows: int = 8192) -> NeuronSample:
    """The activations of `ffn`'s neurons on its first `rows` sampled inputs, with their medians."""
    with torch.no_grad():
        hidden = ffn.hidden(inputs[:rows])
        return NeuronSample(hidden, hidden.median(dim=0).values)


def cluster_points(ffn) -> Tensor:
    """What the cluster split groups [d_ff, *]: each neuron's row of the matrix that goes through
    the activation (w_gate for gated FFNs, else w_in). dReLU has a ReLU on both branches, so a
    neuron fires only where both its gate and its up row point along the input: its point is its
    gate row and its up row, each L2-normalised, side by side (the two halves weigh the same)."""
    if ffn.w_gate is None:
        return ffn.w_in.weight.detach()
    gate = ffn.w_gate.weight.detach()
    if ffn.activation != "drelu":
        return gate
    return torch.cat([F.normalize(gate.float(), dim=-1), F.normalize(ffn.w_in.weight.detach().float(), dim=-1)], dim=1)


def split_layer(ffn, sample: NeuronSample | None, experts: int, size: int, split: str, seed: int, profile_tokens: int = 4096):
    """The permutation [E * d_e] of one FFN's neurons into experts."""
    d_ff = ffn.w_in.weight.shape[0]
    if split == "random":
        labels = random_partition(d_ff, experts, size, seed=seed)
    elif split == "cluster":
        labels = balanced_kmeans(cluster_points(ffn), experts, size, seed=seed)
    else:
        with torch.no_grad():
            if ffn.activation in RELU_ACTIVATIONS:
                # Exact zeros (ReLU, ReLU-fied models): the measured zero pattern is the co-activation
                # graph of the paper; edge weights count the tokens on which two neurons both fire.
                profiles = (sample.hidden[:profile_tokens] != 0).float().T
            else:
                profiles = activation_profiles(sample.hidden[:profile_tokens], sample.median, ffn.w_out.weight.norm(dim=0))
        labels = coactivation_partition(profiles, experts, size, seed=seed)
    return perm_from_labels(labels, experts, size)


def typical_activations(sample: NeuronSample, moe):
    """Median activation of every expert neuron [E, d_e] from the dense-order sample, through
    the layer's permutation (0 for the zero padding of uneven splits: its activation is 0)."""
    perm = moe.perm
    return (sample.median.index_select(0, perm.clamp(min=0)) * (perm >= 0)).view(moe.num_experts, moe.expert_size)
