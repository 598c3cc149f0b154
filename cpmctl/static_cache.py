"""A KV cache whose shapes and positions never change, for compiled decoding.

`KVCache` (cpmctl.model) attends over its filled prefix, whose length is a Python int: every
decode step has new shapes, which a compiled graph would have to be rebuilt (or made dynamic)
for. `StaticKVCache` keeps the position of the next token in a tensor and attends over all
`max_length` slots, masking the slots after each query, so one compiled graph serves every
position. It gives the same methods the model calls on `KVCache` (`positions`, `masks_future`,
`update`, `advance`, `last_position`, `match_applications`), so any attention that stores its
keys and values through `update` works with either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpmctl.config import ModelConfig


class StaticKVCache:
    """Keys/values [B, kv_heads, max_length, d_head] per layer application, and the next position.

    `position` is a 0-dim long tensor (the number of positions filled), read and advanced inside
    the compiled step; `max_position` is the largest position id the run will use (it bounds an
    absolute position table without reading `position` on the host).
    """

    masks_future = True

    def __init__(self, keys: list[Tensor], values: list[Tensor], max_position: int) -> None:
        self.keys, self.values = keys, values
        self.cross: list = [None] * len(keys)
        self.max_position = max_position
        self.position = torch.zeros((), dtype=torch.long, device=keys[0].device)
        self.slots = torch.arange(self.max_length, device=keys[0].device)

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, max_length: int, *, layers: int, device=None,
                 dtype=torch.float32, max_position: int | None = None) -> "StaticKVCache":
        if config.arch != "decoder":
            raise ValueError(f"a static KV cache serves decoder-only models, not {config.arch}")
        shape = (batch, config.n_kv_heads, max_length, config.d_head)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
                   max_length - 1 if max_position is None else max_position)

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def length(self) -> int:
        """Positions filled (reads the device tensor: for callers outside the compiled step)."""
        return int(self.position)

    def reset(self) -> None:
        """Empty the cache for a new sequence (the buffers keep their stale values: the mask hides
        every slot at or after `position`, and each is overwritten before it is attended to)."""
        self.position.zero_()

    def positions(self, t: int, device) -> tuple[Tensor, Tensor]:
        """Query positions (kept <= max_position: a compiled prefill's right filler may run past
        the last real position, and an absolute position table must not be read beyond it)
        and every slot as key positions."""
        return (self.position + self.slots[:t]).clamp(max=self.max_position), self.slots

    def last_position(self, t: int) -> int:
        return self.max_position

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values at positions `position ...`; every slot is attended to (the
        model's mask hides those after each query)."""
        where = self.position + self.slots[: k.shape[2]]
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, where, k.to(keys.dtype))
        values.index_copy_(2, where, v.to(values.dtype))
        return keys.to(k.dtype), values.to(v.dtype)

    def advance(self, t: int) -> None:
        self.position.add_(t)

    def match_applications(self, n: int) -> None:
        if len(self.keys) != n:
            raise ValueError(f"the static KV cache has {len(self.keys)} layer slots but the model runs {n} block applications")
