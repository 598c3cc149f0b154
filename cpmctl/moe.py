"""Mixture-of-experts FFN: the layout every MoE path in cpmctl shares.

Experts are contiguous blocks of FFN neurons:
    w_in   [E, d_e, d]   (up projection rows of each expert)
    w_gate [E, d_e, d]   (gated FFNs only)
    w_out  [E, d_e, d]   (the down projection stored transposed, so it is a row gather too)
    b_in, b_gate [E, d_e], b_out [d]   (models with biases)
    router.*             (the router's own parameters, see below)
    perm   [E * d_e]     (MoEfied models only: the dense neuron index at each expert position,
                          -1 for the zero padding of uneven splits; restores the dense FFN)
    act_fill [E, d_e], fill_out [E, d]   (MoEfied with data: each neuron's median activation and
                          each expert's output at it; a skipped expert adds its fill_out, so the
                          layer is the dense FFN with skipped neurons held at typical values)

Routers (`MoEConfig.router`):
- `linear`: logits = W x, top-k, softmax over the selected logits. With top_k = 1 that weight is
  exactly 1, which keeps an upcycled MoE (every expert a copy of the dense FFN) equal to the
  dense model, but gives the router no gradient from the LM loss: routers are trained on their own
  (MoEfication) or kept frozen (CPM-2).
- `center`, `mlp`, `oracle` (MoEfication: the experts are pieces of one dense FFN, so the
  selected experts' outputs are summed with weight 1 and all experts together give the dense FFN
  back): `center` scores the L2-normalised input against each expert's centre, `mlp` is
  Linear(d, E) -> tanh -> Linear(E, E) on the normalised input, `oracle` computes every neuron and
  picks the experts with the largest activation mass (an upper bound for evaluation; it saves
  no work).

The torch path (`moe_ffn_reference`) computes only the selected experts, reading views of the
expert blocks: the (token, expert) pairs are sorted by expert, each expert runs once on its rows
(`expert_output`; one grouped matmul per projection on a GPU) and each token's k outputs are
summed in choice order (`combine_pairs`), so the result does not depend on the order in which
experts were computed: the offload engine computes them as they arrive and matches it bit for
bit. All experts selected runs the flat [E * d_e, d] view as one dense matmul. A MoEfied layer at 100% of experts skips its router
as well and runs `all_experts_ffn` (on a CPU: groups of whole experts in batched matmuls). The
Triton kernels (`cpmctl_kernels.moe_ffn`, same signature and semantics) plug in behind
`MoEFeedForward.kernels = "triton"`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.ffn import ACTIVATIONS, FeedForward, ThresholdFeedForward, cpu_kernel_fits, cpu_sparse_ops, gated_hidden
from cpmctl.quant import QuantizedView, QuantizedWeight, quantized_linear, quantized_matmul_out

# Routers whose experts are pieces of one dense FFN (outputs summed with weight 1).
MOEFIED_ROUTERS = ("center", "mlp", "oracle")


# -- the expert computation on raw tensors ------------------------------------------------------
def _hidden(up: Tensor, gate: Tensor | None, activation: str) -> Tensor:
    return ACTIVATIONS[activation](up) if gate is None else gated_hidden(gate, up, activation)


def _all_experts(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, activation) -> Tensor:
    """Every token uses every expert: one dense matmul over the flat [E * d_e, d] views."""
    e, de, d = w_in.shape
    up = F.linear(x, w_in.reshape(e * de, d), None if b_in is None else b_in.reshape(-1))
    gate = None if w_gate is None else F.linear(x, w_gate.reshape(e * de, d), None if b_gate is None else b_gate.reshape(-1))
    hidden = _hidden(up, gate, activation).view(-1, e, de)
    if not bool((expert_weights == 1).all()):
        # Each token's weight for each expert, in expert order (a scatter of its k weights).
        per_expert = torch.zeros(x.shape[0], e, dtype=hidden.dtype, device=x.device).scatter(1, expert_ids, expert_weights.to(hidden.dtype))
        hidden = hidden * per_expert[:, :, None]
    return hidden.reshape(-1, e * de) @ w_out.reshape(e * de, d)


def expert_groups(experts: int, device: torch.device) -> int:
    """How many groups of whole experts `all_experts_ffn` splits the FFN into: on a CPU the
    smallest divisor of E that gives every torch thread at least two groups, elsewhere 1."""
    if device.type != "cpu":
        return 1
    want = 2 * torch.get_num_threads()
    return next((g for g in range(min(want, experts), experts + 1) if experts % g == 0), experts)


def all_experts_ffn(x, w_in, w_gate, w_out, b_in, b_gate, b_out, activation) -> Tensor:
    """The whole FFN from its expert blocks when every expert is selected with weight 1 (a
    MoEfied layer at 100% of experts): no router and no routing tensors.

    On a GPU: two dense matmuls on the flat [E * d_e, d] views. On a CPU the experts run as G
    groups of whole experts (`expert_groups`), each a partial FFN: one batched matmul over the
    groups per projection, then the G partial outputs are summed. The groups are views of the
    contiguous blocks (no copy), and the batched matmul splits the work over the threads: for
    a [N, 4096] x [4096, 1024] product measured on this project's 2-core CPU it ran 1.5-2x
    faster than the single matmul (the flat `w_out` view is [d_ff, d], the layout MKL's one
    matmul uses less well than nn.Linear's [d, d_ff])."""
    e, de, d = w_in.shape
    groups = expert_groups(e, x.device)
    if groups == 1:
        up = F.linear(x, w_in.reshape(e * de, d), None if b_in is None else b_in.reshape(-1))
        gate = None if w_gate is None else F.linear(x, w_gate.reshape(e * de, d), None if b_gate is None else b_gate.reshape(-1))
        hidden = _hidden(up, gate, activation)
        flat_out = w_out.reshape(e * de, d)
        return hidden @ flat_out if b_out is None else torch.addmm(b_out, hidden, flat_out)
    width = e // groups * de  # neurons per group
    rows = x.expand(groups, *x.shape)  # [G, N, d], no copy

    def project(w: Tensor, b: Tensor | None) -> Tensor:  # [G, N, width]
        w = w.view(groups, width, d).transpose(1, 2)
        return torch.bmm(rows, w) if b is None else torch.baddbmm(b.view(groups, 1, width), rows, w)

    hidden = _hidden(project(w_in, b_in), None if w_gate is None else project(w_gate, b_gate), activation)
    out = torch.bmm(hidden, w_out.view(groups, width, d)).sum(0)
    return out if b_out is None else out + b_out


class PairPlan(NamedTuple):
    """The (token, expert) pairs of a routing, grouped by expert.

    Pair p = token * k + j is token's j-th choice. `tokens` lists the pairs' tokens sorted by
    expert (stable), expert `experts[i]` owning sorted pairs `starts[i]:ends[i]`; `inverse[p]`
    is pair p's place in that order, so `combine_pairs` can sum each token's k outputs in
    choice order whatever order the experts were computed in."""

    order: Tensor  # [P] pair index at each sorted position
    tokens: Tensor  # [P] token of each sorted pair
    inverse: Tensor  # [P] sorted position of each pair
    experts: list[int]  # experts with at least one pair, ascending
    starts: list[int]
    ends: list[int]


def plan_pairs(expert_ids: Tensor) -> PairPlan:
    n, k = expert_ids.shape
    if n * k <= 64 and expert_ids.device.type == "cpu":
        # Decoding: a few dozen pairs sort faster in Python than through a dozen tensor ops.
        flat = expert_ids.reshape(-1).tolist()
        order = sorted(range(len(flat)), key=flat.__getitem__)
        inverse = [0] * len(order)
        experts, starts, ends = [], [], []
        for place, pair in enumerate(order):
            inverse[pair] = place
            if not experts or flat[pair] != experts[-1]:
                experts.append(flat[pair])
                starts.append(place)
                ends.append(place)
            ends[-1] = place + 1
        # one tensor for the three index lists: a single small allocation instead of three ops
        order_t, tokens, inverse_t = torch.tensor([order, [p // k for p in order], inverse]).unbind(0)
        return PairPlan(order_t, tokens, inverse_t, experts, starts, ends)
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=1)
    present = torch.nonzero(counts).flatten()
    ends = counts.cumsum(0).index_select(0, present)
    starts = ends - counts.index_select(0, present)
    return PairPlan(order, order // k, inverse, present.tolist(), starts.tolist(), ends.tolist())


def expert_output(rows: Tensor, w_in: Tensor, w_gate: Tensor | None, w_out: Tensor, b_in: Tensor | None,
                  b_gate: Tensor | None, activation: str, weights: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """One expert on its rows [m, d] -> [m, d] (no b_out), each row scaled by `weights` [m].

    With `out` (inference only) the product is written there. The single definition of an
    expert's arithmetic: the resident torch path and the offload engine (cpmctl/offload.py,
    experts in cache slots) both call it on the same rows, so their outputs agree bit for bit."""
    if isinstance(w_in, QuantizedView):  # weight-only quantized experts (cpmctl.quant)
        up = _quantized_project(rows, w_in, b_in)
        gate = None if w_gate is None else _quantized_project(rows, w_gate, b_gate)
        hidden = _hidden(up, gate, activation)
        if weights is not None:
            hidden = hidden * weights[:, None].to(hidden.dtype)
        return quantized_matmul_out(hidden, w_out, out)
    up = F.linear(rows, w_in, b_in)
    gate = None if w_gate is None else F.linear(rows, w_gate, b_gate)
    if out is not None and gate is None and activation in _IN_PLACE_ACTIVATIONS:
        # inference: the activation overwrites its fresh input (same values, one buffer fewer)
        hidden = _IN_PLACE_ACTIVATIONS[activation](up)
    elif out is not None and gate is not None:
        hidden = gated_hidden(gate, up, activation, in_place=True)
    else:
        hidden = _hidden(up, gate, activation)
    if weights is not None:
        hidden = hidden * weights[:, None].to(hidden.dtype)
    if out is not None:  # straight into the caller's buffer (no autograd): one copy fewer
        return torch.mm(hidden, w_out, out=out) if hidden.dim() == 2 else torch.matmul(hidden, w_out, out=out)
    return hidden @ w_out


# Activations with an in-place form that computes the same values as ACTIVATIONS' (for `out=` calls).
_IN_PLACE_ACTIVATIONS = {"relu": torch.relu_, "drelu": torch.relu_, "silu": lambda t: F.silu(t, inplace=True)}


def _quantized_project(rows: Tensor, w: QuantizedView, b: Tensor | None) -> Tensor:
    y = quantized_linear(rows, w)
    return y if b is None else y + b


def combine_pairs(sorted_out: Tensor, plan: PairPlan, n: int, k: int) -> Tensor:
    """[P, d] outputs in sorted pair order -> [n, d]: each token's k outputs summed in choice order."""
    return sorted_out.index_select(0, plan.inverse).view(n, k, -1).sum(1)


def _grouped_mm_fits(rows: Tensor, weight: Tensor) -> bool:
    """torch's grouped GEMM takes float32/bf16/fp16 with rows and columns 16-byte aligned."""
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not hasattr(F, "grouped_mm"):
        return False
    return all(size * rows.element_size() % 16 == 0 for size in (rows.shape[-1], weight.shape[-1]))


class ExpertJob(NamedTuple):
    """Expert `expert` computes `rows` (weighted by `weights`) into rows start:end of the output buffer."""

    expert: int
    start: int
    end: int
    rows: Tensor
    weights: Tensor | None


class ExpertWork(NamedTuple):
    jobs: list[ExpertJob]
    width: int  # rows of the output buffer
    finish: "Callable[[Tensor], Tensor]"  # filled buffer -> [n, d]


def expert_jobs(x: Tensor, expert_ids: Tensor, expert_weights: Tensor) -> ExpertWork:
    """The per-expert work of a routing: jobs, the output buffer's row count, and the function that
    turns the filled buffer into [n, d] by summing each token's k outputs in choice order.

    Jobs may run in any order (the resident torch path runs them by expert; the offload engine as
    the experts' weights arrive) and give the same bits. Weights all 1 (MoEfied experts are summed)
    are left out, which saves a multiply and changes nothing (x * 1 == x). One token (decoding)
    skips the sort: its k experts write rows 0..k-1 of a [k, d] buffer."""
    n, k = expert_ids.shape
    if n == 1:  # a handful of Python numbers: checked without tensor ops
        ones = all(w == 1 for w in expert_weights[0].tolist())
        weights = None if ones else expert_weights[0]
        jobs = [ExpertJob(e, j, j + 1, x, None if ones else weights[j : j + 1]) for j, e in enumerate(expert_ids[0].tolist())]
        return ExpertWork(jobs, k, _sum_rows)
    ones = bool((expert_weights == 1).all())
    plan = plan_pairs(expert_ids)
    weights = None if ones else expert_weights.reshape(-1).index_select(0, plan.order)
    rows = x.index_select(0, plan.tokens)
    jobs = [ExpertJob(e, s, t, rows[s:t], None if ones else weights[s:t]) for e, s, t in zip(plan.experts, plan.starts, plan.ends)]
    return ExpertWork(jobs, n * k, lambda out: combine_pairs(out, plan, n, k))


def _sum_rows(out: Tensor) -> Tensor:
    return out.sum(0, keepdim=True)


def _by_expert(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, activation) -> Tensor:
    """Each selected expert once on its rows (`expert_jobs`), outputs summed per token. On a GPU,
    many tokens run one grouped GEMM per projection over all experts instead (the offload
    engine's bit-exact match with the resident model is a CPU guarantee)."""
    n, k = expert_ids.shape
    quantized = isinstance(w_in, QuantizedWeight)
    if n > 1 and x.device.type != "cpu" and not quantized and _grouped_mm_fits(x, w_in.transpose(1, 2)):
        plan = plan_pairs(expert_ids)
        rows = x.index_select(0, plan.tokens)
        counts = torch.bincount(expert_ids.reshape(-1), minlength=w_in.shape[0])
        offs = counts.cumsum(0).to(torch.int32)
        experts_sorted = expert_ids.reshape(-1).index_select(0, plan.order)
        up = F.grouped_mm(rows, w_in.transpose(1, 2), offs=offs)
        if b_in is not None:
            up = up + b_in.index_select(0, experts_sorted)
        gate = None
        if w_gate is not None:
            gate = F.grouped_mm(rows, w_gate.transpose(1, 2), offs=offs)
            if b_gate is not None:
                gate = gate + b_gate.index_select(0, experts_sorted)
        hidden = _hidden(up, gate, activation)
        hidden = hidden * expert_weights.reshape(-1).index_select(0, plan.order)[:, None].to(up.dtype)
        return combine_pairs(F.grouped_mm(hidden, w_out, offs=offs), plan, n, k)
    jobs, width, finish = expert_jobs(x, expert_ids, expert_weights)
    out = x.new_empty(width, x.shape[-1])
    in_place = not torch.is_grad_enabled()
    if quantized:  # one view of each stack (the int4 CPU layout is prepared once), indexed per expert
        w_in, w_out = w_in.view_all(), w_out.view_all()
        w_gate = None if w_gate is None else w_gate.view_all()
    for job in jobs:
        e = job.expert
        result = expert_output(job.rows, w_in[e], None if w_gate is None else w_gate[e], w_out[e],
                               None if b_in is None else b_in[e], None if b_gate is None else b_gate[e],
                               activation, job.weights, out=out[job.start : job.end] if in_place else None)
        if not in_place:
            out[job.start : job.end] = result
    return finish(out)


def moe_ffn_reference(
    x: Tensor,
    expert_ids: Tensor,
    expert_weights: Tensor,
    w_in: Tensor,
    w_gate: Tensor | None,
    w_out: Tensor,
    b_in: Tensor | None,
    b_gate: Tensor | None,
    b_out: Tensor | None,
    activation: str,
) -> Tensor:
    """sum_j weight[n, j] * expert_{ids[n, j]}(x[n]) (+ b_out), computing only the selected experts.

    x [N, d]; expert_ids [N, k] int64 (distinct per row); expert_weights [N, k]; weights in the
    layout above. Returns [N, d] with b_out added (when given). This is the torch path and the
    reference the Triton kernel `cpmctl_kernels.moe_ffn` (same signature) is tested against; the
    fill of skipped experts is added by `MoEFeedForward` outside both.
    """
    n, k = expert_ids.shape
    e = w_in.shape[0]
    args = (x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, activation)
    if n == 0:
        out = torch.zeros_like(x)
    elif k == e and not isinstance(w_in, QuantizedWeight):
        out = _all_experts(*args)
    else:
        out = _by_expert(*args)
    if b_out is not None:
        out = out + b_out
    return out


def dense_masked_reference(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation) -> Tensor:
    """The same result the slow way: every expert computed, unselected ones weighted 0 (for tests)."""
    e = w_in.shape[0]
    every = torch.arange(e, device=x.device).expand(x.shape[0], e)
    full = torch.zeros(x.shape[0], e, dtype=expert_weights.dtype, device=x.device).scatter(1, expert_ids, expert_weights)
    out = _all_experts(x, every, full, w_in, w_gate, w_out, b_in, b_gate, activation)
    return out + b_out if b_out is not None else out


def fill_for_skipped(fill_out: Tensor, experts: Tensor) -> Tensor:
    """[N, d]: the sum of the fill outputs fill_out [E, d] of the experts each token skips."""
    n, k = experts.shape
    return fill_out.sum(0) - fill_out.index_select(0, experts.reshape(-1)).view(n, k, -1).sum(1)


# -- routers ----------------------------------------------------------------------------------------
class CenterRouter(nn.Module):
    """Cosine-style score of the L2-normalised input against each expert's centre."""

    def __init__(self, d: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, d))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(x, dim=-1), self.weight)


class MLPRouter(nn.Module):
    """MoEfication's router: Linear(d, E) -> tanh -> Linear(E, E) on the L2-normalised input."""

    def __init__(self, d: int, experts: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, experts)
        self.mix = nn.Linear(experts, experts)

    @torch.no_grad()
    def init_from_centres(self, centres: Tensor) -> None:
        """Start as the centre router: proj = centres, mix = identity, biases 0."""
        self.proj.weight.copy_(centres)
        self.proj.bias.zero_()
        self.mix.weight.copy_(torch.eye(self.mix.weight.shape[0]))
        self.mix.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(torch.tanh(self.proj(F.normalize(x, dim=-1))))


def group_limited(scores: Tensor, groups: int, topk_groups: int) -> Tensor:
    """`scores` [N, E] with the experts outside each token's best `topk_groups` of `groups` equal
    groups set to -inf; a group's score is the sum of its two best scores (DeepSeek-V3)."""
    n, e = scores.shape
    grouped = scores.view(n, groups, e // groups)
    best = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
    keep = torch.zeros_like(best, dtype=torch.bool).scatter(1, best.topk(topk_groups, dim=-1).indices, True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(n, e)


def select_experts(logits: Tensor, top_k: int, *, scoring: str, norm_topk: bool, score_bias: Tensor | None,
                   groups: int, topk_groups: int, routed_scale: float) -> tuple[Tensor, Tensor]:
    """(experts [N, k], fp32 weights [N, k]) from router logits [N, E] under a MoEConfig's scoring.

    Scores are softmax(logits) over all experts or sigmoid(logits) per expert, in fp32; experts
    are chosen on the scores plus `score_bias` (when given) within each token's best groups, and
    weighted by their scores without the bias, renormalised to sum 1 (`norm_topk`; the 1e-20
    keeps an all-zero sigmoid row finite) and scaled by `routed_scale`."""
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if score_bias is None else scores + score_bias.float()
    if groups > 1:
        choice = group_limited(choice, groups, topk_groups)
    experts = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if norm_topk:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if routed_scale != 1.0:
        weights = weights * routed_scale
    return experts, weights


def make_router(kind: str, d: int, experts: int) -> nn.Module | None:
    if kind == "linear":
        return nn.Linear(d, experts, bias=False)
    if kind == "center":
        return CenterRouter(d, experts)
    if kind == "mlp":
        return MLPRouter(d, experts)
    return None  # oracle: no parameters


class MoEFeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        e, de, d = moe.experts, moe.expert_size, config.d_model
        self.top_k, self.activation = moe.top_k, config.activation
        self.router_kind = moe.router
        self.kernels = "torch"  # "triton": cpmctl_kernels.moe_ffn; "cpu": cpmctl_cpu.sparse_ffn (both imported on first use)
        quant = config.quantization
        self.quantized = quant is not None and quant.weights == "experts"
        if self.quantized:
            # Weight-only int8/int4 experts (cpmctl quantize): buffers NAME.qweight/.scales/.zeros.
            # w_out is quantized in its linear form [E, d, d_e] (groups along d_e).
            self.w_in = QuantizedWeight((e,), de, d, quant.scheme, quant.group_size)
            self.w_gate = QuantizedWeight((e,), de, d, quant.scheme, quant.group_size) if config.gated else None
            self.w_out = QuantizedWeight((e,), d, de, quant.scheme, quant.group_size, transposed=True)
        else:
            self.w_in = nn.Parameter(torch.empty(e, de, d))
            self.w_gate = nn.Parameter(torch.empty(e, de, d)) if config.gated else None
            self.w_out = nn.Parameter(torch.empty(e, de, d))
        self.b_in = nn.Parameter(torch.zeros(e, de)) if config.bias else None
        self.b_gate = nn.Parameter(torch.zeros(e, de)) if (config.bias and config.gated) else None
        self.b_out = nn.Parameter(torch.zeros(d)) if config.bias else None
        self.router = make_router(moe.router, d, e)
        self.routing = moe  # scoring, bias, groups and scale of the linear router (MoEConfig)
        if moe.score_bias:
            self.register_buffer("score_bias", torch.zeros(e))
        else:
            self.score_bias = None
        # The always-on shared expert (a dense FFN beside the routed ones) and its sigmoid gate.
        self.shared = FeedForward(config.replace(d_ff=moe.shared_size, moe=None)) if moe.shared_size else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if moe.shared_gate else None
        if moe.permuted:
            self.register_buffer("perm", torch.arange(e * de))
        else:
            self.perm = None
        if moe.fill_skipped:
            # A typical (median) activation of each neuron, measured on data at MoEfication, and
            # each expert's output at those values: a skipped expert contributes that output
            # instead of zero (GELU neurons mostly sit near a small negative value, not at 0).
            self.register_buffer("act_fill", torch.zeros(e, de))
            self.register_buffer("fill_out", torch.zeros(e, d))
        else:
            self.act_fill = self.fill_out = None
        self._fill_key: tuple[int, int, int] | None = None  # (w_out, act_fill) state fill_out was computed from
        # (tokens, token-expert pairs) computed since the last reset: the compute fraction.
        self.counts = [0, 0]

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def expert_size(self) -> int:
        return self.w_in.shape[1]

    @property
    def sums_experts(self) -> bool:
        """True when experts are pieces of one FFN (MoEfication): selected outputs add with weight 1."""
        return self.router_kind in MOEFIED_ROUTERS

    @property
    def selects_all(self) -> bool:
        """Every token runs every expert with weight 1: the layer is exactly its dense FFN, and
        routing would only cost time (the router's choice cannot change the output)."""
        return self.sums_experts and self.top_k >= self.num_experts

    @torch.no_grad()
    def reset_expert_parameters(self, std: float) -> None:
        for p in (self.w_in, self.w_gate, self.w_out):
            if isinstance(p, nn.Parameter):  # quantized weights are not trained or initialised
                nn.init.normal_(p, std=std)
        for p in (self.b_in, self.b_gate, self.b_out):
            if p is not None:
                nn.init.zeros_(p)
        if isinstance(self.router, MLPRouter):
            nn.init.normal_(self.router.proj.weight, std=std)
            nn.init.eye_(self.router.mix.weight)
        elif isinstance(self.router, CenterRouter):
            nn.init.normal_(self.router.weight, std=std)
        if self.score_bias is not None:
            self.score_bias.zero_()
        if self.perm is not None:
            self.perm.copy_(torch.arange(self.perm.numel()))
        if self.act_fill is not None:
            self.act_fill.zero_()
            self.fill_out.zero_()

    def expert_activations(self, x: Tensor) -> Tensor:
        """Every neuron's activation [N, E, d_e] (what the oracle and MoEfication statistics use)."""
        e, de, d = self.w_in.shape
        up = F.linear(x, self.w_in.reshape(e * de, d), None if self.b_in is None else self.b_in.reshape(-1))
        gate = None
        if self.w_gate is not None:
            gate = F.linear(x, self.w_gate.reshape(e * de, d), None if self.b_gate is None else self.b_gate.reshape(-1))
        return _hidden(up, gate, self.activation).view(-1, e, de)

    def expert_scores(self, x: Tensor) -> Tensor:
        """Activation mass of each expert [N, E]: the sum over its neurons of |activation| (minus
        the fill value when skipped experts are filled) times the norm of the neuron's output
        weights, i.e. how much the expert's output moves when it is skipped."""
        hidden = self.expert_activations(x)
        if self.act_fill is not None:
            hidden = hidden - self.act_fill
        return (hidden.abs() * self.w_out.norm(dim=-1)).sum(-1)

    @torch.no_grad()
    def set_fill(self, act_fill: Tensor) -> None:
        """Store per-neuron fill activations [E, d_e] and the expert outputs they give."""
        self.act_fill.copy_(act_fill)
        self.fill_out.copy_(self._fill_outputs())
        self._fill_key = self._fill_state()

    def _fill_state(self) -> tuple[int, int, int]:
        """What the stored fill_out depends on: w_out's and act_fill's versions (bumped by every
        in-place update) and w_out's storage (replaced when weights are loaded by assignment)."""
        return (self.w_out._version, self.w_out.data_ptr(), self.act_fill._version)

    def _fill_outputs(self) -> Tensor:
        """[E, d]: each expert's output at its fill activations."""
        return torch.einsum("ek,ekd->ed", self.act_fill.to(self.w_out.dtype), self.w_out)

    def skipped_fill(self, experts: Tensor) -> Tensor:
        """Sum of the fill outputs of the experts each token skips [N, d].

        While w_out trains (calibration), the fill outputs are computed from it, so they follow
        the weights and pass their gradient; otherwise the stored `fill_out` (refreshed by
        `set_fill` once training is over) saves that [E, d_e] x [E, d_e, d] product per call."""
        if self.quantized:  # quantized experts never change: fill_out as stored
            fill_out = self.fill_out
        elif torch.is_grad_enabled() and self.w_out.requires_grad:
            fill_out = self._fill_outputs()
        else:
            # w_out may have changed since fill_out was stored (pretrain or calibration of a MoEfied
            # checkpoint updates it in place): refresh once per change of the weights
            key = self._fill_state()
            if key != self._fill_key:
                with torch.no_grad():
                    self.fill_out.copy_(self._fill_outputs())
                self._fill_key = key  # the copy changed neither w_out nor act_fill
            fill_out = self.fill_out
        return fill_for_skipped(fill_out, experts)

    def router_logits(self, x: Tensor) -> Tensor:
        if self.router is None:
            return self.expert_scores(x)
        return self.router(x)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(experts [N, k], weights [N, k]) for flattened tokens x [N, d]."""
        if not self.routing.plain_routing:
            r = self.routing
            experts, weights = select_experts(self.router_logits(x), self.top_k, scoring=r.scoring, norm_topk=r.norm_topk,
                                              score_bias=self.score_bias, groups=r.groups, topk_groups=r.topk_groups,
                                              routed_scale=r.routed_scale)
            return experts, weights.to(x.dtype)
        logits, experts = self.router_logits(x).topk(self.top_k, dim=-1)
        if self.sums_experts:
            return experts, torch.ones_like(logits, dtype=x.dtype)
        return experts, torch.softmax(logits.float(), dim=-1).to(x.dtype)

    def add_shared(self, x: Tensor, routed: Tensor) -> Tensor:
        """The routed output [N, d] plus the shared expert's on x [N, d] (gated when it has a gate)."""
        if self.shared is None:
            return routed
        shared = self.shared(x)
        if self.shared_gate is not None:
            shared = torch.sigmoid(self.shared_gate(x)) * shared
        return routed + shared

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.selects_all and not self.quantized:
            self.counts[0] += flat.shape[0]
            self.counts[1] += flat.shape[0] * self.num_experts
            out = all_experts_ffn(flat, self.w_in, self.w_gate, self.w_out, self.b_in, self.b_gate, self.b_out, self.activation)
            return out.view(shape)
        experts, weights = self.route(flat)
        self.counts[0] += experts.shape[0]
        self.counts[1] += experts.numel()
        ffn = moe_ffn_reference
        # The Triton kernels are forward-only: where autograd needs a backward (training,
        # calibration) the torch path runs instead.
        if self.kernels == "triton" and not (torch.is_grad_enabled() and (flat.requires_grad or self.w_in.requires_grad)):
            ffn = triton_moe_ffn
        elif (self.kernels == "cpu" and not self.quantized
              and cpu_kernel_fits(flat, self.w_in, self.w_gate, self.w_out, self.b_in, self.b_gate, self.b_out)
              and cpu_sparse_ops() is not None):
            ffn = cpu_moe_ffn
            if self.sums_experts:
                weights = None  # MoEfied experts add with weight 1: no multiply
        out = ffn(flat, experts, weights, self.w_in, self.w_gate, self.w_out, self.b_in, self.b_gate, self.b_out, self.activation)
        if self.fill_out is not None and experts.shape[1] < self.num_experts:
            out = out + self.skipped_fill(experts).to(out.dtype)
        return self.add_shared(flat, out).view(shape)


def triton_moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, *rest):
    """`cpmctl_kernels.moe_ffn` (same arguments as `moe_ffn_reference`), its input errors as UserError.
    Quantized expert stacks go in as stored (the kernels dequantize inside; w_out in its linear form)."""
    from cpmctl_kernels import KernelInputError, QuantizedWeights, moe_ffn  # optional dependency (triton): imported on first use

    def kernel_weight(w):
        if not isinstance(w, QuantizedWeight):
            return w
        return QuantizedWeights(w.qweight, w.scales, w.zeros, w.group_size if w.scheme == "int4" else None)

    try:
        return moe_ffn(x, expert_ids, expert_weights, kernel_weight(w_in), kernel_weight(w_gate), kernel_weight(w_out), *rest)
    except KernelInputError as exc:
        raise UserError(str(exc)) from None


def cpu_moe_ffn(x, expert_ids, expert_weights, w_in, w_gate, w_out, b_in, b_gate, b_out, activation):
    """`cpmctl_cpu.sparse_ffn.moe_ffn` (same arguments as `moe_ffn_reference`; weights None = all 1):
    the selected experts of a few fp32 tokens in one C++ call, its input errors as UserError."""
    from cpmctl_cpu import CpuKernelInputError

    kernel = cpu_sparse_ops()
    detach = lambda t: None if t is None else t.detach()  # noqa: E731  (no autograd on this path)
    try:
        return kernel.moe_ffn(x.contiguous(), expert_ids, None if expert_weights is None else expert_weights.float().contiguous(),
                              w_in.detach(), detach(w_gate), w_out.detach(), detach(b_in), detach(b_gate), detach(b_out), activation)
    except CpuKernelInputError as exc:
        raise UserError(str(exc)) from None


# -- choosing the kernels ----------------------------------------------------------------------------
KERNEL_CHOICES = ("auto", "torch", "triton")
# FFN activations the Triton kernels do not fuse: dReLU's second ReLU (on the up branch) has no
# kernel epilogue, so its MoE layers run the torch path (the C++ CPU kernels do compute it).
TORCH_ONLY_ACTIVATIONS = ("drelu",)


def resolve_kernels(choice: str, device, activation: str | None = None) -> str:
    """`--kernels auto|torch|triton` on a device (for a model with FFN `activation`) -> "torch", "cpu"
    or "triton".

    auto = Triton on CUDA (when triton imports); on a CPU "cpu", the C++ sparse kernels of
    `cpmctl_cpu` for decode-sized MoE and thresholded FFNs (compiled on first use; they compute
    dReLU too), or the torch path with a note where this machine cannot build them; the torch
    path for activations the Triton kernels do not compute (dReLU), where asking for Triton is
    refused. Triton on a CPU needs its interpreter (TRITON_INTERPRET=1, which is slow and meant
    for tests)."""
    if choice not in KERNEL_CHOICES:
        raise UserError(f"unknown MoE kernels {choice!r}; expected one of {', '.join(KERNEL_CHOICES)}", option="kernels")
    device_type = torch.device(device).type if device is not None else "cpu"
    if choice == "torch":
        return "torch"
    if choice == "auto" and device_type == "cpu":
        return "cpu" if _cpu_kernels_buildable() else "torch"
    if activation in TORCH_ONLY_ACTIVATIONS:
        if choice == "triton":
            raise UserError(f"the Triton kernels do not compute the {activation} activation (a ReLU on both branches "
                            "of the gated FFN); use the torch kernels", option="kernels")
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        if choice == "triton":
            raise UserError("the Triton kernels need the triton package (pip install triton)", option="kernels") from None
        return "torch"
    if choice == "auto":
        return "triton" if device_type == "cuda" else "torch"
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU interpreter)",
                        option="kernels")
    return "triton"


def _cpu_kernels_buildable() -> bool:
    """Whether the C++ CPU kernels can be built here (a compiler and ninja); a note where not."""
    try:
        from cpmctl_cpu import build_problem
    except ImportError as exc:
        problem = f"the cpmctl_cpu package is not importable ({exc})"
    else:
        problem = build_problem()
    if problem is not None:
        import warnings

        warnings.warn(f"note: the sparse FFNs run on the torch path: {problem}", stacklevel=3)
    return problem is None


def set_kernels(model: nn.Module, kernels: str) -> int:
    """Point every MoE and thresholded FFN of this model instance at "torch", "triton" or "cpu"
    (the C++ sparse kernels at decode sizes); returns how many."""
    if kernels not in ("torch", "triton", "cpu"):
        raise ValueError(f"kernels must be 'torch', 'triton' or 'cpu', got {kernels!r}")
    layers = [m for m in model.modules() if isinstance(m, (MoEFeedForward, ThresholdFeedForward))]
    for layer in layers:
        layer.kernels = kernels
    return len(layers)


# -- dense <-> MoE conversion -----------------------------------------------------------------------
def _neurons(linear: nn.Linear | None, perm: Tensor, valid: Tensor, shape: tuple[int, int, int], rows: bool = True) -> Tensor | None:
    """A dense projection's neurons in expert order, zero at padding positions, as [E, d_e, d]."""
    if linear is None:
        return None
    weight = linear.weight.detach()
    per_neuron = weight if rows else weight.T  # [d_ff, d]
    picked = per_neuron.index_select(0, perm.clamp(min=0)) * valid[:, None].to(weight.dtype)
    return picked.reshape(shape).contiguous()


@torch.no_grad()
def moe_from_dense(ffn: nn.Module, config: ModelConfig, perm: Tensor) -> MoEFeedForward:
    """A MoE FFN holding exactly the dense FFN's neurons, permuted into expert blocks.

    `config.moe` gives E, d_e, router and k; `perm` [E * d_e] names the dense neuron at each
    expert position (-1: padding, a neuron with zero weights, for uneven splits). The router's
    parameters are left as initialised: the caller sets them.
    """
    moe = MoEFeedForward(config).to(ffn.w_in.weight.dtype)
    e, de, d = moe.w_in.shape
    valid = perm >= 0
    shape = (e, de, d)
    moe.w_in.copy_(_neurons(ffn.w_in, perm, valid, shape))
    if ffn.w_gate is not None:
        moe.w_gate.copy_(_neurons(ffn.w_gate, perm, valid, shape))
    moe.w_out.copy_(_neurons(ffn.w_out, perm, valid, shape, rows=False))
    if ffn.w_in.bias is not None:
        moe.b_in.copy_((ffn.w_in.bias.index_select(0, perm.clamp(min=0)) * valid).view(e, de))
        if ffn.w_gate is not None:
            moe.b_gate.copy_((ffn.w_gate.bias.index_select(0, perm.clamp(min=0)) * valid).view(e, de))
        moe.b_out.copy_(ffn.w_out.bias)
    moe.perm.copy_(perm)
    return moe


@torch.no_grad()
def dense_from_moe(moe: MoEFeedForward, config: ModelConfig) -> nn.Module:
    """The dense FFN back from a MoEfied one: its neurons un-permuted, padding dropped (bit-exact)."""
    if moe.perm is None:
        raise ValueError("this MoE layer stores no neuron permutation; only MoEfied layers can be restored")
    dense_config = config.replace(moe=None)
    ffn = FeedForward(dense_config).to(moe.w_in.dtype)
    e, de, d = moe.w_in.shape
    perm = moe.perm
    keep = (perm >= 0).nonzero(as_tuple=True)[0]
    order = perm.index_select(0, keep)  # dense index of each kept expert position
    if order.numel() != config.d_ff or not torch.equal(order.sort().values, torch.arange(config.d_ff, device=order.device)):
        raise ValueError("the stored permutation is not a permutation of the FFN's neurons")

    def place(blocks: Tensor) -> Tensor:
        flat = blocks.reshape(e * de, -1).index_select(0, keep)
        out = torch.empty_like(flat)
        out[order] = flat
        return out

    ffn.w_in.weight.copy_(place(moe.w_in))
    if moe.w_gate is not None:
        ffn.w_gate.weight.copy_(place(moe.w_gate))
    ffn.w_out.weight.copy_(place(moe.w_out).T)
    if moe.b_in is not None:
        ffn.w_in.bias.copy_(place(moe.b_in.reshape(e * de, 1)).view(-1))
        if moe.b_gate is not None:
            ffn.w_gate.bias.copy_(place(moe.b_gate.reshape(e * de, 1)).view(-1))
        ffn.w_out.bias.copy_(moe.b_out)
    return ffn
