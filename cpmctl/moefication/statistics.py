"""Activation statistics in bounded memory: a fixed-size uniform sample of each chosen FFN's inputs.

`Reservoir` keeps a uniform sample of rows (Vitter's algorithm R in chunks); every statistic
(activation masses, co-activations, router targets) is recomputed from the sampled inputs, so
memory is bounded by the reservoir, not by the data. `collect_inputs` runs the dense model over
documents with a recorder on each chosen FFN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cpmctl.moefication.batches import length_sorted, model_inputs, real_tokens


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


class _AllRecorded(Exception):
    """Every recorded FFN has seen the batch: the rest of the forward pass is not needed."""


def collect_inputs(model, rows: list[list[int]], layers: list[str], *, max_tokens: int, batch_size: int, seed: int,
                   stop_early: bool = True) -> dict[str, Any]:
    """Run the dense model over `rows`; returns a reservoir sample of at most `max_tokens` of
    each layer's FFN inputs.

    The forward pass stops once the last recorded FFN has its input: later layers and, for
    LMs, the LM head over the whole vocabulary would be computed for nothing. (With shared
    layers one FFN runs several times per pass, so there the pass runs to the end.)"""
    ffns = {f"{stack}.{i}": ffn for stack, i, ffn in model.ffn_modules() if f"{stack}.{i}" in layers}
    by_stack: dict[str, dict[str, Any]] = {}
    for name, ffn in ffns.items():
        by_stack.setdefault(name.split(".")[0], {})[name] = ffn
    recorders = {stack: FFNInputRecorder(group, max_tokens, seed=seed) for stack, group in by_stack.items()}
    seen = [0]

    def stop_when_all_recorded(module, args):  # registered after the recorders' hooks: runs after them
        seen[0] += 1
        if seen[0] == len(ffns):
            raise _AllRecorded

    stoppers = [] if model.config.share_layers or not stop_early else [f.register_forward_pre_hook(stop_when_all_recorded) for f in ffns.values()]
    try:
        with torch.no_grad():
            for batch in length_sorted(rows, batch_size):
                inputs = model_inputs(model.config, batch)
                for stack, recorder in recorders.items():
                    recorder.keep = real_tokens(stack, inputs)
                seen[0] = 0
                try:
                    model(**inputs)
                except _AllRecorded:
                    pass
    finally:
        for handle in stoppers:
            handle.remove()
        for recorder in recorders.values():
            recorder.close()
    return {name: rec.reservoirs[name].sample() for rec in recorders.values() for name in rec.reservoirs}
