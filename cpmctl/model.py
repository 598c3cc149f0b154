"""One Transformer for the three architectures cpmctl runs, driven by `ModelConfig`.

- encoder-decoder (T5 / CPM-2): pre-norm RMS, relative position bias, no biases, relu or
  gated-GELU FFN, unscaled attention;
- encoder-only (BERT): post-norm LayerNorm, learned absolute positions, token types, biases;
- decoder-only (Llama, GPT-2): pre-norm, rotary or absolute positions, SwiGLU or GELU.

Parameter names (the checkpoint format):
    embed.tokens / embed.positions / embed.token_types / embed.norm
    {encoder,decoder}.blocks.{i}.{attn_norm,attn,cross_norm,cross_attn,ffn_norm,ffn}.*
    {encoder,decoder}.relative_bias.weight, {encoder,decoder}.final_norm.*
    lm_head.{transform,transform_norm,proj}.*
Self-attention keeps q, k and v in one fused `qkv` projection (one GEMM instead of three);
cross-attention has `q` and a fused `kv`. The FFN of every block is a separate module behind a
one-method interface (`forward(x)` returns a new tensor of x's shape, never a view of x: without
autograd the block adds the residual into it in place), so MoE layers replace it per layer on a
given model instance (`Transformer.replace_ffn`).

Decoding uses `KVCache`: preallocated key/value buffers per layer application (so a shared
block applied L times has L cache slots) plus the cross-attention keys/values of the encoder
output, computed once.

Parameter-shared stacks as ODE steps (cpmctl's own reading of Chen, Xu et al. 2023, whose exact
method is not public): a pre-norm residual branch `h <- h + f(h)` is an explicit Euler step of
size 1, so a stack of G shared blocks trained with L applications can run n applications (a
multiple of G) with every residual branch scaled by beta = L / n, `h <- h + beta * f(h)`, which
follows the same trajectory with fewer, larger steps. `set_iterations(model, n, beta)` switches
a model instance; the defaults (n = L, beta = 1) compute exactly the plain forward. Since every
pre-norm branch reads a normalised input, n steps of size beta from embeddings e equal n unit
steps from e / beta (but for the norms' eps): beta only reweights the embeddings, and what makes
fewer iterations work is training at them (`cpmctl pretrain --step-robust`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmctl.config import ModelConfig
from cpmctl.ffn import ACTIVATIONS, FeedForward, ThresholdFeedForward
from cpmctl.moe import MoEFeedForward
from cpmctl.quant import swap_quantized_linears

class RMSNorm(nn.Module):
    """T5/Llama RMS norm: no mean subtraction, no bias, statistics in fp32.

    With `offset` (Gemma's 1 + w) the scale is offset + weight and the product is taken in fp32
    before casting back, as Gemma does; a fresh norm is the identity either way.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = x.float() * torch.rsqrt(variance + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(dim or config.d_model, config.norm_eps, config.norm_offset)
    return nn.LayerNorm(dim or config.d_model, eps=config.norm_eps)


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias, one scalar per (bucket, head)."""

    def __init__(self, config: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_buckets
        self.max_distance = config.relative_max_distance
        self.weight = nn.Parameter(torch.empty(config.relative_buckets, config.n_heads))

    def bucket(self, relative: Tensor) -> Tensor:
        """Map key-minus-query distances to buckets: exact for small, logarithmic for large."""
        buckets = torch.zeros_like(relative)
        num = self.num_buckets
        if self.bidirectional:
            num //= 2
            buckets += (relative > 0).long() * num
            distance = relative.abs()
        else:
            distance = -torch.clamp(relative, max=0)
        max_exact = num // 2
        is_small = distance < max_exact
        # Clamp before the log so distance 0 never reaches it (its bucket comes from is_small).
        log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(self.max_distance / max_exact)
        large = max_exact + (log_ratio * (num - max_exact)).long()
        large = torch.clamp(large, max=num - 1)
        return buckets + torch.where(is_small, distance, large)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """Bias of shape [1, heads, queries, keys]."""
        relative = key_positions[None, :] - query_positions[:, None]
        values = F.embedding(self.bucket(relative), self.weight)  # [q, k, heads]
        return values.permute(2, 0, 1).unsqueeze(0)


def rope_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies [rotary_dim / 2] and the factor on cos/sin, for the config's rotary
    scaling, computed as transformers' modeling_rope_utils does (linear, llama3, yarn)."""
    dim = config.rotary_dim or config.d_head
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], scaling.get("factor")
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolated low frequencies, extrapolated high ones, a linear ramp between.
    old = scaling["original_max_position_embeddings"]
    if factor is None:
        factor = config.max_positions / old

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def rotary_tables(positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables for rotary embeddings at the given positions (any leading shape)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([freqs, freqs], dim=-1)
    if attention_factor != 1.0:
        return angles.cos() * attention_factor, angles.sin() * attention_factor
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head (the Llama/NeoX layout). x: [B, H, T, D].

    Tables narrower than the head rotate its first dimensions only (partial rotary); the rest
    pass through unchanged."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :dim], cos, sin), x[..., dim:]], dim=-1)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@dataclass
class KVCache:
    """Decoder state for incremental generation.

    `keys[i]`/`values[i]`: [B, kv_heads, max_length, d_head] for layer application i.
    `cross[i]`: the (keys, values) of the encoder output for decoder layer i.
    `length`: how many positions are filled.

    The interface the model uses (a static cache, `cpmctl.static_cache.StaticKVCache`, gives the
    same methods with tensor positions, so that one compiled graph serves every position):
    `positions(t, device)` (query and key positions of the next t tokens), `masks_future`
    (whether attention must mask cache slots after the query: False here, since only the filled
    prefix is attended), `update(layer, k, v)` (store the new keys/values, return those to
    attend to), `advance(t)`, and `last_position(t)` (the largest position id, for the absolute
    position table's bounds check).
    """

    keys: list[Tensor]
    values: list[Tensor]
    cross: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)
    length: int = 0

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, max_length: int, *, device=None, dtype=torch.float32,
                 layers: int | None = None) -> "KVCache":
        """`layers`: cache slots (layer applications; default the config's decoder depth)."""
        n = config.stack_depths()["decoder"] if layers is None else layers
        shape = (batch, config.n_kv_heads, max_length, config.d_head)
        value_shape = shape
        if config.mla is not None:  # latent attention caches its latent and its shared rotary key
            shape, value_shape = (batch, 1, max_length, config.mla.kv_lora_rank), (batch, 1, max_length, config.mla.qk_rope_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            values=[torch.zeros(value_shape, device=device, dtype=dtype) for _ in range(n)],
            cross=[None] * n,
        )

    @classmethod
    def for_model(cls, model: "Transformer", batch: int, max_length: int, *, device=None, dtype=torch.float32) -> "KVCache":
        """A cache with one slot per decoder block application as `model` runs now (see set_iterations)."""
        return cls.allocate(model.config, batch, max_length, device=device, dtype=dtype, layers=model.decoder.applications)

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    masks_future = False  # attention reads the filled prefix only, so nothing after the query

    def positions(self, t: int, device) -> tuple[Tensor, Tensor]:
        """Query positions of the next `t` tokens and the key positions they attend over."""
        start = self.length
        return torch.arange(start, start + t, device=device), torch.arange(start + t, device=device)

    def last_position(self, t: int) -> int:
        return self.length + t - 1

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store keys/values [B, kv_heads, t, d_head] after the filled prefix; the keys and values
        the new queries attend to (the prefix and the new ones), in k's dtype."""
        start, t = self.length, k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start : start + t] = k.to(keys.dtype)
        values[:, :, start : start + t] = v.to(values.dtype)
        return keys[:, :, : start + t].to(k.dtype), values[:, :, : start + t].to(v.dtype)

    def advance(self, t: int) -> None:
        self.length += t

    def match_applications(self, n: int) -> None:
        """Make the slots follow a stack that runs n block applications: an empty cache is resized
        (so a cache allocated for the trained depth serves a model switched to fewer or more
        iterations); a filled one must already match, since its keys belong to other steps."""
        if len(self.keys) == n:
            return
        if self.length:
            raise ValueError(f"the KV cache was filled by {len(self.keys)} block applications but the model now runs {n}; "
                             "set the iterations before generating")
        if len(self.keys) > n:
            del self.keys[n:], self.values[n:], self.cross[n:]
            return
        extra = n - len(self.keys)
        self.keys.extend(torch.zeros_like(self.keys[0]) for _ in range(extra))
        self.values.extend(torch.zeros_like(self.values[0]) for _ in range(extra))
        self.cross.extend([None] * extra)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, cross: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = config.n_heads, config.n_kv_heads, config.d_head
        d, inner, kv_inner = config.d_model, config.n_heads * config.d_head, config.n_kv_heads * config.d_head
        self.cross = cross
        if cross:
            self.q = nn.Linear(d, inner, bias=config.bias)
            self.kv = nn.Linear(d, 2 * kv_inner, bias=config.bias)
        else:
            self.qkv = nn.Linear(d, inner + 2 * kv_inner, bias=config.bias or config.qkv_bias)
        self.o = nn.Linear(inner, d, bias=config.bias)
        full = config.qk_norm_full  # OLMoE: one norm over all heads of q (of k) at once
        self.q_norm = make_norm(config, inner if full else config.d_head) if config.qk_norm and not cross else None
        self.k_norm = make_norm(config, kv_inner if full else config.d_head) if config.qk_norm and not cross else None
        self.norm_full = full
        self.clip = config.clip_qkv
        self.scale = None if config.attn_scale else 1.0  # T5 folds 1/sqrt(d) into its init
        if config.query_scale is not None:
            self.scale = config.query_scale
        self.softcap = config.attn_softcap
        self.dropout = config.dropout

    def _heads(self, x: Tensor, n: int) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.d_head).transpose(1, 2)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        memory: Tensor | None = None,
    ) -> Tensor:
        """mask: additive float mask broadcastable to [B, H, Tq, Tk] (None: attend to all).

        causal=True asks SDPA for its own causal mask (only valid when Tq == Tk and no mask).
        """
        b, t, _ = x.shape
        if self.cross:
            q = self._heads(self.q(x), self.n_heads)
            if cache is not None:
                if cache.cross[layer] is None:
                    cache.cross[layer] = self.project_kv(memory)
                k, v = cache.cross[layer]
            else:
                k, v = self.project_kv(memory)
        else:
            inner, kv_inner = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
            q, k, v = self.qkv(x).split([inner, kv_inner, kv_inner], dim=-1)
            if self.q_norm is not None and self.norm_full:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.clip is not None:
                q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
            q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
            if self.q_norm is not None and not self.norm_full:
                q, k = self.q_norm(q), self.k_norm(k)
            if rotary is not None:
                cos, sin = rotary
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if self.softcap is not None:
            out = self._capped_attention(q, k, v, mask, causal)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            )
        return self.o(out.transpose(1, 2).reshape(b, t, self.n_heads * self.d_head))

    def _capped_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """Attention with soft-capped scores, cap * tanh(s / cap), before the mask (Gemma 2):
        SDPA has no place for the cap, so the scores are formed explicitly."""
        scale = self.d_head**-0.5 if self.scale is None else self.scale
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if causal and mask is None:
            positions = torch.arange(k.shape[2], device=q.device)
            mask = causal_mask(positions[-q.shape[2]:], positions, scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        return torch.matmul(weights, v)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V3, `ModelConfig.mla`), with Attention's interface.

    q = q_b(norm(q_a x)) (or q x without a q bottleneck), split per head into unrotated and
    rotated dims; the latent c = norm(kv_a x)[:kv_lora_rank] and the shared rotary key
    r = rot(kv_a x)[kv_lora_rank:] are what the KV cache stores (its `keys` and `values` slots);
    kv_b c gives each head's unrotated key and its value. The bottleneck norms use eps 1e-6, as
    DeepSeek's do, whatever the model's norm_eps."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        mla = config.mla
        self.mla, self.n_heads = mla, config.n_heads
        d, h = config.d_model, config.n_heads
        qk = mla.qk_nope_dim + mla.qk_rope_dim
        if mla.q_lora_rank is None:
            self.q = nn.Linear(d, h * qk, bias=False)
            self.q_a = self.q_a_norm = self.q_b = None
        else:
            self.q = None
            self.q_a = nn.Linear(d, mla.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, 1e-6)
            self.q_b = nn.Linear(mla.q_lora_rank, h * qk, bias=False)
        self.kv_a = nn.Linear(d, mla.kv_lora_rank + mla.qk_rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(mla.kv_lora_rank, 1e-6)
        self.kv_b = nn.Linear(mla.kv_lora_rank, h * (mla.qk_nope_dim + mla.v_head_dim), bias=False)
        self.o = nn.Linear(h * mla.v_head_dim, d, bias=False)
        self.scale = config.query_scale
        self.dropout = config.dropout

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.mla.rope_interleave:  # pairs (x0, x1), ... -> halves, where the usual rotation applies
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        return apply_rotary(x, cos, sin)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False,
                rotary: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None, layer: int = 0,
                memory: Tensor | None = None) -> Tensor:
        mla, h = self.mla, self.n_heads
        b, t, _ = x.shape
        q = self.q(x) if self.q is not None else self.q_b(self.q_a_norm(self.q_a(x)))
        q = q.view(b, t, h, mla.qk_nope_dim + mla.qk_rope_dim).transpose(1, 2)
        q_pass, q_rot = q.split([mla.qk_nope_dim, mla.qk_rope_dim], dim=-1)
        latent, k_rot = self.kv_a(x).split([mla.kv_lora_rank, mla.qk_rope_dim], dim=-1)
        latent = self.kv_a_norm(latent)[:, None]  # [B, 1, T, rank]
        k_rot = k_rot[:, None]
        cos, sin = rotary
        q_rot, k_rot = self._rotate(q_rot, cos, sin), self._rotate(k_rot, cos, sin)
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + t] = latent.to(cache.keys[layer].dtype)
            cache.values[layer][:, :, start : start + t] = k_rot.to(cache.values[layer].dtype)
            latent = cache.keys[layer][:, :, : start + t].to(q.dtype)
            k_rot = cache.values[layer][:, :, : start + t].to(q.dtype)
        s = latent.shape[2]
        kv = self.kv_b(latent[:, 0]).view(b, s, h, mla.qk_nope_dim + mla.v_head_dim).transpose(1, 2)
        k_pass, v = kv.split([mla.qk_nope_dim, mla.v_head_dim], dim=-1)
        k = torch.cat([k_pass, k_rot.expand(-1, h, -1, -1)], dim=-1)
        q = torch.cat([q_pass, q_rot], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.o(out.transpose(1, 2).reshape(b, t, h * mla.v_head_dim))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, cross: bool, ffn: nn.Module) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = make_norm(config)
        self.attn = LatentAttention(config) if config.mla is not None else Attention(config)
        self.cross_norm = make_norm(config) if cross else None
        self.cross_attn = Attention(config, cross=True) if cross else None
        self.ffn_norm = make_norm(config)
        self.ffn = ffn
        # Gemma 2's sandwich: each branch's output is normalised again before the residual add.
        self.attn_post_norm = make_norm(config) if config.post_norms else None
        self.ffn_post_norm = make_norm(config) if config.post_norms else None
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, sublayer, step: float | None, post_norm: nn.Module | None = None) -> Tensor:
        branch = sublayer(norm(x) if self.pre_norm else x)
        if post_norm is not None:
            branch = post_norm(branch)
        branch = self.dropout(branch)
        grad = torch.is_grad_enabled()
        if step is not None:  # an Euler step of size `step`: h + step * f(h) (None: exactly h + f(h))
            branch = branch * step if grad else branch.mul_(step)
        # Without autograd, add into the branch's fresh output instead of allocating a third tensor.
        out = x + branch if grad else branch.add_(x)
        return out if self.pre_norm else norm(out)

    def forward(self, x: Tensor, *, layer: int, self_mask, causal, rotary, cache, memory, cross_mask,
                step: float | None = None) -> Tensor:
        """`layer`: the application index (KV-cache slot); `step`: the residual step size (None: 1)."""
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, mask=self_mask, causal=causal, rotary=rotary, cache=cache, layer=layer),
                           step, self.attn_post_norm)
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(h, mask=cross_mask, cache=cache, layer=layer, memory=memory), step)
        return self._residual(x, self.ffn_norm, self.ffn, step, self.ffn_post_norm)


class Stack(nn.Module):
    """The encoder or the decoder: blocks, bias, final norm.

    A parameter-shared stack has G distinct blocks (1 with share_layers, G with share_groups), run
    as `applications` consecutive applications, block g for the g-th 1/G of them. `iterations`
    and `step_size` are the inference schedule (set by `set_iterations`; None: n_layers
    applications with exactly unit residual steps).
    """

    def __init__(self, config: ModelConfig, name: str, n_layers: int, causal: bool, cross: bool) -> None:
        super().__init__()
        self.name, self.n_layers, self.causal = name, n_layers, causal
        self.config = config
        unique = config.blocks_in_stack(name)
        self.blocks = nn.ModuleList(Block(config, cross, make_ffn(config, name, i)) for i in range(unique))
        self.relative_bias = RelativePositionBias(config, bidirectional=not causal) if config.position == "relative" else None
        self.final_norm = make_norm(config) if config.norm_position == "pre" else None
        self.iterations: int | None = None
        self.step_size: float | None = None

    def block(self, i: int) -> Block:
        """The i-th distinct block (the single one of a stack sharing one block)."""
        return self.blocks[0 if len(self.blocks) == 1 else i]

    @property
    def applications(self) -> int:
        """Block applications per forward pass under the current schedule."""
        return self.n_layers if self.iterations is None else self.iterations

    def block_at(self, application: int) -> Block:
        """The block run at 0-based `application`: consecutive equal runs of each distinct block."""
        return self.blocks[application * len(self.blocks) // self.applications]

    def forward(self, x: Tensor, *, self_mask, causal, rotary, cache, memory=None, cross_mask=None, sliding_mask=None) -> Tensor:
        """`sliding_mask`: the self-attention mask of the layers that attend through the
        config's sliding window (given whenever the config has one)."""
        n = self.applications
        if cache is not None:
            cache.match_applications(n)
        for i in range(n):
            sliding = sliding_mask is not None and self.config.is_sliding_layer(i)
            x = self.block_at(i)(x, layer=i, self_mask=sliding_mask if sliding else self_mask, causal=causal and not sliding,
                                 rotary=rotary, cache=cache, memory=memory, cross_mask=cross_mask, step=self.step_size)
        return self.final_norm(x) if self.final_norm is not None else x


def make_ffn(config: ModelConfig, stack: str, index: int) -> nn.Module:
    if config.is_moe_layer(stack, index):
        return MoEFeedForward(config)
    if config.threshold_sparsity is not None:
        return ThresholdFeedForward(config)
    return FeedForward(config)


def building_on_meta() -> bool:
    """True while modules are constructed under `torch.device("meta")` (build_model(device="meta")):
    shapes only, for weights that are assigned afterwards, so there is nothing to initialise."""
    return torch.get_default_device().type == "meta"


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times a constant (Gemma's sqrt(d_model), cast to the weights' dtype as
    Gemma does); whoever looks tokens up (prompts, mixup) gets the scaled vectors."""

    def __init__(self, num: int, dim: int, scale: float, **kwargs) -> None:
        super().__init__(num, dim, **kwargs)
        self.scale = scale

    def forward(self, input_ids: Tensor) -> Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


def make_embedding(num: int, dim: int, scale: float | None = None) -> nn.Embedding:
    kwargs = {}
    if building_on_meta():
        # nn.Embedding's own init is normal_, and torch's meta normal_ imports torch._dynamo
        # (~170 MiB resident, 1-2 s) in processes that only load weights (e.g. `cpmctl infer`).
        kwargs["_weight"] = torch.empty(num, dim)
    return ScaledEmbedding(num, dim, scale, **kwargs) if scale is not None else nn.Embedding(num, dim, **kwargs)


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tokens = make_embedding(config.vocab_size, config.d_model, config.d_model**0.5 if config.scale_embeddings else None)
        self.positions = make_embedding(config.max_positions, config.d_model) if config.position == "absolute" else None
        self.token_types = make_embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        self.norm = make_norm(config) if config.norm_position == "post" else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, input_ids: Tensor | None, position_ids: Tensor | None = None, token_type_ids: Tensor | None = None, *,
        last_position: int | None = None, inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """`last_position`: the largest position id when the caller knows it (saves a device sync).

        `inputs_embeds` [B, T, d] replaces the token lookup (soft prompts, mixup); positions,
        token types and the norm are added exactly as for ids.
        """
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if self.positions is not None:
            if position_ids is None:
                position_ids = torch.arange(t, device=x.device)
                last_position = t - 1
            if last_position is None:
                last_position = int(position_ids.max())
            if last_position >= self.positions.num_embeddings:
                raise ValueError(f"sequence of {last_position + 1} positions exceeds the model's {self.positions.num_embeddings}")
            x = x + self.positions(position_ids)
        if self.token_types is not None:
            types = torch.zeros((b, t), dtype=torch.long, device=x.device) if token_type_ids is None else token_type_ids
            x = x + self.token_types(types)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class LMHead(nn.Module):
    """Vocabulary projection, optionally after BERT's dense + activation + norm transform."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(config.d_model, config.d_model, bias=True) if config.lm_head_transform else None
        self.transform_norm = (nn.LayerNorm(config.d_model, eps=config.norm_eps) if config.norm == "layer" else RMSNorm(config.d_model, config.norm_eps)) if config.lm_head_transform else None
        self.activation = config.activation
        self.proj = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.lm_head_bias else None
        self.logit_scale = config.d_model**-0.5 if (config.tie_embeddings and config.scale_tied_logits) else 1.0
        self.softcap = config.logit_softcap

    def forward(self, x: Tensor, tied_weight: Tensor) -> Tensor:
        if self.transform is not None:
            x = self.transform_norm(ACTIVATIONS[self.activation](self.transform(x)))
        if self.logit_scale != 1.0:
            x = x * self.logit_scale
        if self.proj is not None and self.bias is None:
            # Through the module, not its weight: hook-based offloaders (accelerate's cpu_offload /
            # disk offload) bring a module's weights in only when that module's forward runs.
            logits = self.proj(x)
        else:
            weight = tied_weight if self.proj is None else self.proj.weight
            logits = F.linear(x, weight, self.bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def padding_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, Tk] of 1 (keep) / 0 (pad) -> additive mask [B, 1, 1, Tk]."""
    return torch.zeros_like(attention_mask, dtype=dtype).masked_fill(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]


def causal_mask(query_positions: Tensor, key_positions: Tensor, dtype: torch.dtype, window: int | None = None) -> Tensor:
    """Additive [1, 1, Tq, Tk] mask hiding keys after each query (and, with a sliding `window`,
    keys `window` or more positions before it)."""
    allowed = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - window
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _drop_full_mask(attention_mask: Tensor | None) -> Tensor | None:
    """An all-ones padding mask masks nothing: dropping it lets SDPA take its mask-free path."""
    if attention_mask is not None and bool(attention_mask.all()):
        return None
    return attention_mask


def _check_inputs(input_ids: Tensor | None, inputs_embeds: Tensor | None) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.encoder = Stack(config, "encoder", config.n_layers, causal=False, cross=False) if config.has_encoder else None
        if config.arch == "encoder-decoder":
            self.decoder = Stack(config, "decoder", config.n_decoder_layers, causal=True, cross=True)
        elif config.arch == "decoder":
            self.decoder = Stack(config, "decoder", config.n_layers, causal=True, cross=False)
        else:
            self.decoder = None
        self.lm_head = LMHead(config) if config.lm_head else None
        self._rope: tuple[Tensor, float] | None = None  # inverse frequencies, computed on first use
        if not building_on_meta():  # meta: shapes only, the weights are loaded afterwards (no init)
            self.reset_parameters()

    # -- construction ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices and embeddings, ones/zeros for norms and biases."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.weight, std=std)
            elif hasattr(module, "reset_expert_parameters"):
                module.reset_expert_parameters(std)
        if self.lm_head is not None and self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)

    def replace_ffn(self, stack: str, index: int, ffn: nn.Module) -> nn.Module:
        """Swap one block's FFN on this instance; returns the old module."""
        block = getattr(self, stack).block(index)
        old, block.ffn = block.ffn, ffn
        return old

    def ffn_modules(self) -> list[tuple[str, int, nn.Module]]:
        """(stack, block index, ffn) for every distinct FFN module."""
        out = []
        for name in ("encoder", "decoder"):
            stack = getattr(self, name)
            if stack is not None:
                out.extend((name, i, block.ffn) for i, block in enumerate(stack.blocks))
        return out

    # -- forward pieces ---------------------------------------------------------------------------
    def rope(self) -> tuple[Tensor, float]:
        """The rotary inverse frequencies and attention factor, computed once (a compiled step
        calls this before tracing, so that its graph never sees them missing)."""
        if self._rope is None:
            self._rope = rope_frequencies(self.config)
        return self._rope

    def _rotary(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.config.position != "rotary":
            return None
        cos, sin = rotary_tables(positions, *self.rope())
        # positions [T] -> [1, 1, T, D]; positions [B, T] -> [B, 1, T, D]
        return (cos[None, None], sin[None, None]) if positions.dim() == 1 else (cos[:, None], sin[:, None])

    def encode(
        self, input_ids: Tensor | None, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None, *,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Encoder hidden states [B, T, d] (encoder-decoder and encoder-only models).

        `inputs_embeds` [B, T, d], given instead of `input_ids`, are used in place of the token
        embeddings (positions, masks and token types are handled exactly as for ids).
        """
        if self.encoder is None:
            raise ValueError(f"a {self.config.arch} model has no encoder")
        _check_inputs(input_ids, inputs_embeds)
        source = input_ids if inputs_embeds is None else inputs_embeds
        t = source.shape[1]
        positions = torch.arange(t, device=source.device)
        x = self.embed(input_ids, positions, token_type_ids, last_position=t - 1, inputs_embeds=inputs_embeds)
        attention_mask = _drop_full_mask(attention_mask)
        mask = padding_mask(attention_mask, x.dtype) if attention_mask is not None else None
        if self.encoder.relative_bias is not None:
            mask = _add(self.encoder.relative_bias(positions, positions).to(x.dtype), mask)
        return self.encoder(x, self_mask=mask, causal=False, rotary=self._rotary(positions), cache=None)

    def decode(
        self,
        input_ids: Tensor,
        *,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Decoder hidden states [B, T, d].

        With a cache, `input_ids` are the next T tokens after the `cache.length` already seen,
        and `attention_mask`, if given, covers all `cache.length + T` positions.
        `position_ids` [B, T] overrides positions (left-padded batches of decoder-only models).
        `inputs_embeds` [B, T, d] may be given instead of `input_ids` (see `encode`).
        """
        if self.decoder is None:
            raise ValueError(f"a {self.config.arch} model has no decoder")
        _check_inputs(input_ids, inputs_embeds)
        source = input_ids if inputs_embeds is None else inputs_embeds
        b, t = source.shape[:2]
        device = source.device
        masks_future = cache is not None and cache.masks_future
        if cache is None:
            start, last_position = 0, t - 1
            query_pos = key_pos = torch.arange(t, device=device)
        else:
            # A static cache's positions are tensors (one compiled graph for every position), so
            # it has no Python length to read here; it bounds its own positions.
            start = None if masks_future else cache.length
            if start is not None and start + t > cache.max_length:
                raise ValueError(f"KV cache holds {cache.max_length} positions, {start + t} requested")
            query_pos, key_pos = cache.positions(t, device)
            last_position = cache.last_position(t)
        if position_ids is None:
            x = self.embed(input_ids, query_pos, last_position=last_position, inputs_embeds=inputs_embeds)
        else:
            # Explicit positions (left padding): their largest is read from them, but for a static
            # cache, which knows the largest it will see without a device sync.
            x = self.embed(input_ids, position_ids, last_position=last_position if masks_future else None,
                           inputs_embeds=inputs_embeds)
        dtype = x.dtype

        if not masks_future:  # a static cache's graph takes its mask as it comes (no sync on its values)
            attention_mask = _drop_full_mask(attention_mask)
        mask = padding_mask(attention_mask, dtype) if attention_mask is not None else None
        if self.decoder.relative_bias is not None:
            mask = _add(self.decoder.relative_bias(query_pos, key_pos).to(dtype), mask)
        # Causality: SDPA's own flag when the square case allows it, else an explicit mask.
        # A single new token after an eager cache sees every key, so it needs none; a static
        # cache always masks its slots after the query.
        causal = False
        if t > 1 or masks_future:
            if mask is None and start == 0 and not masks_future:
                causal = True
            else:
                mask = _add(causal_mask(query_pos, key_pos, dtype), mask)
        cross_mask = padding_mask(memory_mask, dtype) if (memory is not None and memory_mask is not None) else None
        sliding_mask = None
        if self.config.sliding_window is not None:
            # The window counts cache indices, padding included, as transformers' masks do.
            padding = padding_mask(attention_mask, dtype) if attention_mask is not None else None
            sliding_mask = _add(causal_mask(query_pos, key_pos, dtype, self.config.sliding_window), padding)
        out = self.decoder(
            x, self_mask=mask, causal=causal, rotary=self._rotary(query_pos if position_ids is None else position_ids),
            cache=cache, memory=memory, cross_mask=cross_mask, sliding_mask=sliding_mask,
        )
        if cache is not None:
            cache.advance(t)
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        if self.lm_head is None:
            raise ValueError("this model has no LM head")
        return self.lm_head(hidden, self.embed.tokens.weight)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        decoder_inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, T, V] (hidden states for a model without an LM head).

        encoder-decoder: `input_ids` feed the encoder, `decoder_input_ids` the decoder.
        `position_ids` [B, T] (decoder-only) places left-padded rows correctly.
        `inputs_embeds` / `decoder_inputs_embeds` [B, T, d] replace the matching ids' token
        embeddings (give one of each pair).
        """
        arch = self.config.arch
        if arch == "encoder-decoder":
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                raise ValueError("an encoder-decoder forward needs decoder_input_ids")
            memory = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds)
            hidden = self.decode(
                decoder_input_ids, memory=memory, memory_mask=attention_mask, attention_mask=decoder_attention_mask,
                inputs_embeds=decoder_inputs_embeds,
            )
        elif arch == "encoder":
            hidden = self.encode(input_ids, attention_mask, token_type_ids, inputs_embeds=inputs_embeds)
        else:
            hidden = self.decode(input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds)
        return self.logits(hidden) if self.lm_head is not None else hidden


def build_model(config: ModelConfig, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """A freshly initialised model; `device="meta"` builds shapes only (no memory, no init: no
    random numbers are drawn and torch._dynamo is not imported), for weights assigned afterwards."""
    with torch.device(device or "cpu"):
        model = Transformer(config)
    quant = config.quantization
    if quant is not None and quant.weights == "linear":
        # Weight-only quantized linear layers (cpmctl quantize --linear): a QuantizedLinear in
        # place of each, on this instance, for the stored qweight/scales/zeros to be loaded into.
        swap_quantized_linears(model, quant.scheme, quant.group_size, output=quant.output)
    return model.to(dtype) if dtype is not None else model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by role: embedding (incl. an untied output projection), attention, FFN, other."""
    counts = {"total": 0, "embedding": 0, "attention": 0, "ffn": 0, "other": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        counts["total"] += n
        parts = name.split(".")
        if parts[0] == "embed" and parts[1] in ("tokens", "positions", "token_types") or name == "lm_head.proj.weight":
            counts["embedding"] += n
        elif any(part in ("attn", "cross_attn", "relative_bias") for part in parts):
            counts["attention"] += n
        elif "ffn" in parts:
            counts["ffn"] += n
        else:
            counts["other"] += n
    return counts


# -- parameter-shared stacks: fewer, larger ODE steps ---------------------------------------------
def _stacks(model: Transformer) -> list[Stack]:
    return [s for s in (model.encoder, model.decoder) if s is not None]


def set_iterations(model: Transformer, iterations: int | None, step_size: float | None = None) -> None:
    """Run every stack of `model` with `iterations` block applications (None: the trained depth L)
    and residual step `step_size` (None: L / iterations). Changes this instance only, never its
    weights or config; `set_iterations(model, None)` restores the plain forward exactly.

    UserError for: iterations < 1; iterations != L or a step other than 1 on a model without
    shared layers; iterations not a multiple of share_groups; different encoder and decoder
    depths with iterations given; step_size <= 0; a step other than 1 on a post-norm model
    (its norm after the residual makes a block no Euler step)."""
    from cpmctl.errors import UserError

    config = model.config
    stacks = _stacks(model)
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        raise UserError(f"iterations must be an integer >= 1, got {iterations!r}")
    if step_size is not None and not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise UserError(f"step size must be a finite number > 0, got {step_size!r}")
    groups = config.shared_blocks
    depths = sorted({s.n_layers for s in stacks})
    if groups is None:
        if iterations is not None and len(depths) == 1 and iterations != depths[0]:
            raise UserError(f"iterations {iterations} != the model's {depths[0]} layers: fewer or more block applications "
                            "need a parameter-shared model (share_layers / share_groups)")
        if step_size is not None and step_size != 1:
            raise UserError("a step size other than 1 needs a parameter-shared model (share_layers / share_groups)")
    if iterations is not None:
        if len(depths) > 1:
            raise UserError(f"the encoder and decoder were trained with different depths ({', '.join(map(str, depths))}); "
                            "iterations apply only to equal depths")
        if groups is not None and iterations % groups:
            raise UserError(f"iterations {iterations} is not a multiple of share_groups {groups} "
                            "(every shared block runs the same number of times)")
    schedule = []  # (stack, n, beta), all checked before any stack changes
    for stack in stacks:
        n = stack.n_layers if iterations is None else iterations
        beta = float(step_size) if step_size is not None else stack.n_layers / n
        if beta != 1.0 and config.norm_position == "post":
            raise UserError("a step size other than 1 needs a pre-norm model: a post-norm block normalises after the "
                            "residual, so it is no Euler step (run fewer iterations with step size 1 instead)")
        schedule.append((stack, n, beta))
    for stack, n, beta in schedule:
        stack.iterations = None if n == stack.n_layers else n
        stack.step_size = None if beta == 1.0 else beta


def iteration_info(model: Transformer) -> dict:
    """The current schedule: {"trained_iterations": L, "iterations": n, "step_size": beta,
    "speedup": L / n, "shared_blocks": G or None, "stacks": {name: {...}}}; the top-level numbers
    are the decoder's (the encoder's for an encoder-only model)."""
    per_stack = {
        s.name: {"trained_iterations": s.n_layers, "iterations": s.applications,
                 "step_size": 1.0 if s.step_size is None else s.step_size}
        for s in _stacks(model)
    }
    main = per_stack.get("decoder") or per_stack["encoder"]
    return {**main, "speedup": main["trained_iterations"] / main["iterations"],
            "shared_blocks": model.config.shared_blocks, "stacks": per_stack}


def applied_block_parameters(model: Transformer) -> int:
    """Block parameters summed over every block application of the current schedule: what a
    forward pass multiplies per token in the stacks (a shared block counts once per application)."""
    return sum(sum(p.numel() for p in stack.block_at(i).parameters()) for stack in _stacks(model)
               for i in range(stack.applications))


def distinct_block_parameters(model: Transformer) -> int:
    """Block parameters counted once each (what a parameter count sees)."""
    return sum(p.numel() for stack in _stacks(model) for p in stack.blocks.parameters())
