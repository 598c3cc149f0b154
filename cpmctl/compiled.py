"""Compiled generation steps: torch.compile (inductor) over a static KV cache, frozen weights.

Eager decoding (`cpmctl.generate.prefill` / `decode_one_token`) stays the reference; this module
runs the same model code, traced once per shape:

- the decode step (one token per row) is one graph for every position: the KV cache is a
  `StaticKVCache`, whose position is a tensor and whose slots after the query are masked;
- the prefill step is one graph per prompt-length bucket (powers of two from 16): a prompt is
  padded on the right to its bucket, the logits are read at its last real token, and the
  filler's keys, in slots after the prompt, are overwritten by the decode steps before any
  query reaches them;
- the cache length is bucketed the same way, so a new prompt length or `max_new_tokens` reuses
  the graphs of its bucket;
- weights are frozen (inductor's `freezing`): the parameters are constants of the graph, so
  inductor packs them once for its GEMM. With `autotune` (max-autotune), every matmul shape is
  benchmarked on this machine between inductor's C++ GEMM template and ATen's (oneDNN / MKL)
  kernel and the fastest is kept: the GEMV is chosen by measurement, per dtype.

The compile cost is paid once per machine: inductor's own caches (FX graph, AOTAutograd and
autotune results, under its cache directory) key each graph by the torch version, the graph
and the weights' shapes and dtypes, and hand back the compiled code on the next run. Frozen
weights are not part of the key: they are read from the model of the run, so a cached graph
serves another checkpoint of the same shapes with that checkpoint's own weights (tested).

On CUDA the decode step also runs as a CUDA graph (inductor's cudagraph trees): one token's
step is hundreds of small kernels, whose launch cost would otherwise bound decode. A graph
replays fixed addresses, so the decoder keeps one KV cache per (batch, cache bucket) and hands it
out again, reset, to the next run of that shape (its tensors marked as static inputs), and the
logits a replay writes are copied out before the next replay overwrites them.

A layer is traced through its `forward`, so a linear layer whose weight is quantized (any module
with the same call signature) is compiled like `nn.Linear`; nothing here names nn.Linear.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cpmctl.errors import UserError
from cpmctl.model import Transformer
from cpmctl.static_cache import StaticKVCache

MIN_BUCKET = 16


def bucket(n: int) -> int:
    """The smallest power of two >= n (and >= MIN_BUCKET): the shapes a compiled graph is built for."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def check_compiler() -> str:
    """The C++ compiler inductor builds its CPU kernels with; a UserError when there is none."""
    from torch._inductor import cpp_builder, exc  # inductor is imported only when compiling (+1 s)

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise UserError("torch.compile cannot build on this machine: inductor found no C++ compiler "
                        "(install g++ or point the CXX environment variable at one)", option="compile") from None


def check_compilable(model: Transformer) -> None:
    config = model.config
    if config.arch != "decoder":
        raise UserError(f"compiled generation serves decoder-only models; this one is {config.arch}", option="compile")
    if config.moe is not None:
        # Routing sends a data-dependent number of tokens to each expert: no fixed-shape graph.
        raise UserError("compiled generation does not cover MoE layers (their expert batches change shape with "
                        "the routing); run this model eagerly", option="compile")
    if model.training:
        raise UserError("compiled generation needs a model in eval mode", option="compile")


def _decode_step(model: Transformer, tokens: Tensor, cache: StaticKVCache, attention_mask: Tensor | None,
                 position_ids: Tensor | None) -> Tensor:
    hidden = model.decode(tokens, cache=cache, attention_mask=attention_mask, position_ids=position_ids)
    return model.logits(hidden[:, -1])


def _prefill_step(model: Transformer, tokens: Tensor, cache: StaticKVCache, attention_mask: Tensor | None,
                  position_ids: Tensor | None, last: Tensor) -> Tensor:
    """Logits at index `last` (the prompt's last real token) of a right-filled bucket."""
    hidden = model.decode(tokens, cache=cache, attention_mask=attention_mask, position_ids=position_ids)
    return model.logits(hidden.index_select(1, last).squeeze(1))


def _own_code(fn):
    """A copy of `fn` with a code object of its own (dynamo keys its graphs by code object)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


@dataclass
class CompileStats:
    """Seconds spent in steps that compiled a graph (first call of a shape: tracing, inductor,
    the C++ build, or a cache hit), and the graphs built."""

    compile_s: float = 0.0
    graphs: list[str] = field(default_factory=list)


class CompiledDecoder:
    """Compiled prefill and decode steps of one model, built on first use of each shape.

    `autotune`: inductor's max-autotune (GEMM kernels chosen by measurement; slower to compile).
    `cuda_graphs`: replay the decode step as a CUDA graph (default: when the model is on CUDA).
    """

    def __init__(self, model: Transformer, *, autotune: bool = True, cuda_graphs: bool | None = None) -> None:
        check_compilable(model)
        check_compiler()
        self.model = model
        self.autotune = autotune
        if model.config.position == "rotary":
            model.rope()  # computed now, not inside the first graph (which would guard on its absence)
        options: dict = {"freezing": True}
        if autotune:
            options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
        # Two functions, two code objects: dynamo keeps each one's graphs apart, and dynamic=False
        # specialises every shape (a dynamic decode graph would lose the fixed GEMV shapes). Each
        # decoder compiles its own copies: dynamo counts graphs against its recompile limit (8) per
        # code object, so decoders of several models (or dtypes) in one process would otherwise
        # share, and exhaust, one budget.
        device = next(model.parameters()).device
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            raise UserError(f"CUDA graphs need a model on a CUDA device; this one is on {device}", option="compile")
        self.cuda_graphs = cuda_graphs
        # Prefill runs once per prompt: a graph of its own would cost more to record than it saves.
        decode_options = {**options, "triton.cudagraphs": True} if cuda_graphs else options
        self._decode = torch.compile(_own_code(_decode_step), fullgraph=True, dynamic=False, options=decode_options)
        self._prefill = torch.compile(_own_code(_prefill_step), fullgraph=True, dynamic=False, options=options)
        self._caches: dict[tuple[int, int], StaticKVCache] = {}
        self._seen: set[tuple] = set()
        self.stats = CompileStats()

    def allocate(self, batch: int, needed: int, *, max_position: int) -> StaticKVCache:
        """A cache for `needed` positions, rounded up to its bucket (so that lengths share graphs);
        `max_position`: the largest position id the run will use. A shape allocated before gets
        the same tensors back, emptied: the graphs (CUDA graphs above all) keep their addresses.

        The cache's own position bound is a constant of its shape, not of the run: dynamo bakes
        it into the graphs, and a bound that followed `max_new_tokens` recompiled the prefill for
        every new length. Real positions never reach it; it only keeps a prefill's right filler
        inside an absolute position table, so the run's own limit is checked here."""
        config = self.model.config
        if config.position == "absolute" and max_position >= config.max_positions:
            raise ValueError(f"sequence of {max_position + 1} positions exceeds the model's {config.max_positions}")
        key = (batch, bucket(needed))
        cache = self._caches.get(key)
        if cache is None:
            param = next(self.model.parameters())
            bound = min(key[1], config.max_positions) if config.position == "absolute" else key[1]
            cache = StaticKVCache.allocate(config, batch, key[1], layers=self.model.decoder.applications,
                                           device=param.device, dtype=param.dtype, max_position=bound - 1)
            if self.cuda_graphs:
                for tensor in (*cache.keys, *cache.values, cache.position, cache.slots):
                    torch._dynamo.mark_static_address(tensor)
            self._caches[key] = cache
        else:
            cache.reset()
        return cache

    def prefill_width(self, prompt_width: int) -> int:
        return bucket(prompt_width)

    def _timed(self, key: tuple, fn, *args) -> Tensor:
        # Dynamo would fall back to eager after its recompile limit; the steps never do silently.
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            if key in self._seen:
                return fn(*args)
            start = time.perf_counter()
            out = fn(*args)
            self.stats.compile_s += time.perf_counter() - start
            self.stats.graphs.append(" ".join(map(str, key)))
            self._seen.add(key)
            return out

    def prefill(self, input_ids: Tensor, cache: StaticKVCache, *, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """Logits [B, V] of the prompt's last token; fills the cache and leaves its position there.

        `attention_mask` [B, cache.max_length] (1 keep, 0 padding) covers every slot;
        `position_ids` [B, T] are the prompt's own."""
        batch, width = input_ids.shape
        padded = self.prefill_width(width)
        if padded > cache.max_length:
            raise ValueError(f"a prompt bucket of {padded} positions does not fit a cache of {cache.max_length}")
        if padded != width:
            filler = input_ids.new_full((batch, padded - width), self.model.config.pad_token_id)
            input_ids = torch.cat([input_ids, filler], dim=1)
            if position_ids is not None:
                # Filler positions continue the last real one (never past max_position in use).
                extra = torch.arange(1, padded - width + 1, device=position_ids.device)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + extra], dim=1).clamp(max=cache.max_position)
        last = torch.tensor([width - 1], device=input_ids.device)
        key = ("prefill", batch, padded, cache.max_length, attention_mask is not None)
        logits = self._timed(key, self._prefill, self.model, input_ids, cache, attention_mask, position_ids, last)
        cache.position.fill_(width)  # the filler's slots count as empty
        return logits

    def decode(self, tokens: Tensor, cache: StaticKVCache, *, attention_mask: Tensor | None = None,
               position_ids: Tensor | None = None) -> Tensor:
        """Logits [B, V] of one new token per row, `tokens` [B, 1]."""
        key = ("decode", tokens.shape[0], cache.max_length, attention_mask is not None)
        logits = self._timed(key, self._decode, self.model, tokens, cache, attention_mask, position_ids)
        # A CUDA graph's output lives in its pool and the next replay overwrites it.
        return logits.clone() if self.cuda_graphs else logits
