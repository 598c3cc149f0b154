"""Routing kernels: top-k expert choice with its softmax weights, and the `moe_align` sort.

`route(logits, k)` picks each token's k largest router logits and weights them with a softmax,
over the k selected logits (`softmax="topk"`, cpmctl.moe's rule) or over all experts
(`softmax="all"`, the weights then sum to less than 1).

`moe_align(expert_ids, E, block_size)` sorts the flattened (token, slot) entries
`i = token * k + slot` by expert without moving any token: it returns their indices grouped by
expert (stable: ascending i inside an expert), each expert's group padded to a multiple of
`block_size` with the sentinel N * k, and the expert of every block of `block_size` entries.
Everything stays on the device: the only size the host needs (how many entries to allocate) is
the bound N * k + min(E, N * k) * (block_size - 1), so nothing is synchronised.

Three small kernels do the sort: per chunk of entries a histogram over the experts, one program
that turns the histograms into prefix offsets (per chunk and per expert) and the block->expert
table, and a scatter that writes each entry at its expert's offset plus its rank in the chunk.
Limits: experts <= 4096 (a chunk's histogram is one [chunk, E] tile), N * k < 2**31.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cpmctl_kernels._common import check, check_device, check_float, next_power_of_2

MAX_EXPERTS = 4096


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, ids_ptr, weights_ptr,
    num_tokens, num_experts, stride_ln, stride_le,
    K: tl.constexpr, BLOCK_K: tl.constexpr, SOFTMAX_ALL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < num_tokens
    col_mask = cols < num_experts
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_ln + cols[None, :] * stride_le
    logits = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)

    slots = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    chosen_logits = tl.full((BLOCK_N, BLOCK_K), float("-inf"), dtype=tl.float32)
    remaining = logits
    for j in tl.static_range(K):
        best = tl.max(remaining, axis=1)
        # the lowest index among equal maxima, like a stable sort would pick
        idx = tl.min(tl.where((remaining == best[:, None]) & col_mask[None, :], cols[None, :], BLOCK_E), axis=1)
        chosen = tl.where(slots[None, :] == j, idx[:, None], chosen)
        chosen_logits = tl.where(slots[None, :] == j, best[:, None], chosen_logits)
        remaining = tl.where(cols[None, :] == idx[:, None], float("-inf"), remaining)

    top = tl.max(chosen_logits, axis=1)  # the first choice: the row's maximum
    top = tl.where(row_mask, top, 0.0)  # rows past the end are all -inf: keep them NaN-free
    numer = tl.exp(chosen_logits - top[:, None])
    numer = tl.where(slots[None, :] < K, numer, 0.0)
    if SOFTMAX_ALL:
        denom = tl.sum(tl.where(col_mask[None, :], tl.exp(logits - top[:, None]), 0.0), axis=1)
    else:
        denom = tl.sum(numer, axis=1)
    weights = numer / tl.where(row_mask, denom, 1.0)[:, None]

    out_mask = row_mask[:, None] & (slots[None, :] < K)
    out_offs = rows.to(tl.int64)[:, None] * K + slots[None, :]
    tl.store(ids_ptr + out_offs, chosen.to(tl.int64), mask=out_mask)
    tl.store(weights_ptr + out_offs, weights.to(weights_ptr.dtype.element_ty), mask=out_mask)


def route(router_logits: torch.Tensor, k: int, softmax: str = "topk") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token and their weights.

    router_logits [N, E] (fp32/fp16/bf16, any strides) -> (expert_ids [N, k] int64, weights [N, k]
    in the logits' dtype, computed in fp32). Ties go to the lower expert index. Limits: E <= 4096,
    logits without NaN.
    """
    op = "route"
    check(isinstance(router_logits, torch.Tensor) and router_logits.dim() == 2,
          f"{op}: router_logits must be a 2-D tensor [tokens, experts], got {getattr(router_logits, 'shape', type(router_logits))}")
    check_float(op, "router_logits", router_logits)
    check_device(op, router_logits=router_logits)
    n, e = router_logits.shape
    check(softmax in ("topk", "all"), f"{op}: softmax must be 'topk' or 'all', got {softmax!r}")
    check(isinstance(k, int) and 1 <= k <= e, f"{op}: k must be an int in 1..{e} (the number of experts), got {k!r}")
    check(e <= MAX_EXPERTS, f"{op}: at most {MAX_EXPERTS} experts, got {e}")
    ids = torch.empty(n, k, dtype=torch.int64, device=router_logits.device)
    weights = torch.empty(n, k, dtype=router_logits.dtype, device=router_logits.device)
    if n == 0:
        return ids, weights
    block_e = next_power_of_2(e)
    block_n = max(1, min(16, 4096 // block_e))
    _topk_softmax_kernel[(triton.cdiv(n, block_n),)](
        router_logits, ids, weights, n, e, router_logits.stride(0), router_logits.stride(1),
        K=k, BLOCK_K=next_power_of_2(k), SOFTMAX_ALL=softmax == "all", BLOCK_N=block_n, BLOCK_E=block_e,
    )
    return ids, weights


class MoEAlignment(NamedTuple):
    """The entries of a routing sorted by expert (see the module docstring).

    sorted_ids [max_padded] int32: entry indices (token * k + slot) grouped by expert, each
        group padded to a multiple of block_size with the sentinel num_entries; slots past
        num_padded hold the sentinel too.
    block_expert_ids [max_padded // block_size] int32: the expert of each block, -1 past the end.
    num_padded [1] int32: how many leading slots of sorted_ids are in use (a device tensor).
    expert_counts [E] int32: entries routed to each expert.
    """

    sorted_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_padded: torch.Tensor
    expert_counts: torch.Tensor
    block_size: int
    num_entries: int


@triton.jit
def _align_count_kernel(ids_ptr, chunk_counts_ptr, num_entries, num_experts,
                        CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    cols = tl.arange(0, BLOCK_E)
    experts = tl.load(ids_ptr + offs, mask=offs < num_entries, other=-1).to(tl.int32)
    onehot = (experts[:, None] == cols[None, :]).to(tl.int32)
    counts = tl.sum(onehot, axis=0)
    tl.store(chunk_counts_ptr + pid.to(tl.int64) * num_experts + cols, counts, mask=cols < num_experts)


@triton.jit
def _align_offsets_kernel(chunk_counts_ptr, expert_start_ptr, expert_counts_ptr, block_expert_ptr,
                          num_padded_ptr, num_chunks, num_experts, num_blocks_out,
                          BLOCK_SIZE: tl.constexpr, BLOCK_E: tl.constexpr, FILL: tl.constexpr):
    # One program: the histograms become exclusive prefix offsets in place (chunk by chunk, so the
    # sort is stable), then the experts' padded groups are laid out one after another.
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < num_experts
    running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c in range(num_chunks):
        ptrs = chunk_counts_ptr + c * num_experts + cols
        counts = tl.load(ptrs, mask=col_mask, other=0)
        tl.store(ptrs, running, mask=col_mask)
        running += counts
    padded = (running + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    tl.store(expert_start_ptr + cols, start, mask=col_mask)
    tl.store(expert_counts_ptr + cols, running, mask=col_mask)
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)
    # block j belongs to the expert whose group holds it: the number of groups ending at or before it
    end_block = tl.where(col_mask, end // BLOCK_SIZE, 2147483647)
    for j0 in range(0, num_blocks_out, FILL):
        blocks = j0 + tl.arange(0, FILL)
        owner = tl.sum((end_block[None, :] <= blocks[:, None]).to(tl.int32), axis=1)
        owner = tl.where(blocks * BLOCK_SIZE < total, owner, -1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks_out)


@triton.jit
def _align_scatter_kernel(ids_ptr, chunk_offsets_ptr, expert_start_ptr, sorted_ids_ptr,
                          num_entries, num_experts, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    cols = tl.arange(0, BLOCK_E)
    experts = tl.load(ids_ptr + offs, mask=offs < num_entries, other=-1).to(tl.int32)
    valid = (experts >= 0) & (experts < num_experts)
    onehot = (experts[:, None] == cols[None, :]).to(tl.int32)
    # rank of each entry among the earlier entries of the chunk that chose the same expert
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    safe = tl.where(valid, experts, 0)
    base = tl.load(expert_start_ptr + safe, mask=valid, other=0) + \
        tl.load(chunk_offsets_ptr + pid.to(tl.int64) * num_experts + safe, mask=valid, other=0)
    tl.store(sorted_ids_ptr + base + rank, offs, mask=valid)


def max_padded_entries(num_entries: int, num_experts: int, block_size: int) -> int:
    """Host-side bound on num_padded: each non-empty expert wastes at most block_size - 1 slots,
    and the used blocks (sum of ceil(count_e / block_size)) are a whole number <= bound / block_size."""
    bound = num_entries + min(num_experts, num_entries) * (block_size - 1)
    return bound // block_size * block_size


def moe_align(expert_ids: torch.Tensor, num_experts: int, block_size: int) -> MoEAlignment:
    """Sort the (token, slot) entries of expert_ids [N, k] (int32/int64) by expert, padded per
    expert to `block_size` (a power of two >= 16, the grouped kernel's row block).

    Ids outside 0..E-1 are dropped (their entries appear in no group); the launchers of the FFN
    check the range on CPU, where it costs no synchronisation.
    """
    op = "moe_align"
    check(isinstance(expert_ids, torch.Tensor) and expert_ids.dim() == 2,
          f"{op}: expert_ids must be a 2-D tensor [tokens, k], got {getattr(expert_ids, 'shape', type(expert_ids))}")
    check(expert_ids.dtype in (torch.int32, torch.int64), f"{op}: expert_ids must be int32 or int64, got {expert_ids.dtype}")
    check_device(op, expert_ids=expert_ids)
    check(isinstance(num_experts, int) and 1 <= num_experts <= MAX_EXPERTS,
          f"{op}: num_experts must be an int in 1..{MAX_EXPERTS}, got {num_experts!r}")
    check(isinstance(block_size, int) and block_size >= 16 and block_size & (block_size - 1) == 0,
          f"{op}: block_size must be a power of two >= 16, got {block_size!r}")
    num_entries = expert_ids.numel()
    check(num_entries < 2**31 - max(num_experts, 1) * block_size, f"{op}: too many entries ({num_entries}) for int32 indices")
    device = expert_ids.device
    flat = expert_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    max_padded = max_padded_entries(num_entries, num_experts, block_size)
    num_blocks_out = max_padded // block_size
    sorted_ids = torch.full((max_padded,), num_entries, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(num_blocks_out, dtype=torch.int32, device=device)
    num_padded = torch.zeros(1, dtype=torch.int32, device=device)
    expert_counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    expert_start = torch.empty(num_experts, dtype=torch.int32, device=device)
    block_e = next_power_of_2(num_experts)
    chunk = max(16, min(256, 8192 // block_e))
    num_chunks = max(1, triton.cdiv(num_entries, chunk))
    chunk_counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=device)
    _align_count_kernel[(num_chunks,)](flat, chunk_counts, num_entries, num_experts, CHUNK=chunk, BLOCK_E=block_e)
    _align_offsets_kernel[(1,)](
        chunk_counts, expert_start, expert_counts, block_expert_ids, num_padded,
        num_chunks, num_experts, num_blocks_out,
        BLOCK_SIZE=block_size, BLOCK_E=block_e, FILL=max(16, min(256, 8192 // block_e)),
    )
    _align_scatter_kernel[(num_chunks,)](flat, chunk_counts, expert_start, sorted_ids, num_entries, num_experts,
                                         CHUNK=chunk, BLOCK_E=block_e)
    return MoEAlignment(sorted_ids, block_expert_ids, num_padded, expert_counts, block_size, num_entries)
