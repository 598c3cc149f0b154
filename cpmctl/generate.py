"""Text generation and embeddings on a `Transformer`, as small pure functions (gpt-fast style).

    sample_next       logits [B, V] -> next tokens [B] (greedy, temperature, top-k, top-p)
    prefill           run the prompt through the decoder, filling the KV cache
    decode_one_token  one token per sequence through the cached decoder
    generate          the loop: encode (encoder-decoder) or prefill (decoder-only), then decode
    embed             pooled encoder hidden states (sentence embeddings)

Decoder-only prompts may be a left-padded batch: each row's positions come from the cumulative
sum of its attention mask, and padding keys stay masked for the whole generation. The KV cache
is allocated once for prompt + `max_new_tokens`; an encoder-decoder's cross-attention keys and
values are projected once, on the first decoder step, and kept in the cache.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from cpmctl.compiled import CompiledDecoder
from cpmctl.errors import UserError
from cpmctl.model import KVCache, Transformer

POOLINGS = ("mean", "cls")


# -- sampling ----------------------------------------------------------------------------------
def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Logits with the tokens outside the top-k and outside the nucleus set to -inf.

    top_k keeps exactly the k highest logits of each row. top_p keeps the smallest set of the most
    probable tokens (after top-k) whose cumulative probability reaches p, and always at least the
    most probable token.
    """
    _check_sampling(0.0, top_k, top_p)
    if top_k is not None and top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        # A token stays when the mass of the more probable tokens before it is still short of p;
        # the first token always stays (nothing comes before it).
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row of `logits` [B, V] -> LongTensor [B].

    temperature 0 is greedy (argmax; top_k/top_p do not change the argmax). Otherwise samples from
    softmax(logits / temperature) restricted by top-k, then top-p.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- model steps -----------------------------------------------------------------------------
def prefill(model: Transformer, input_ids: Tensor, cache: KVCache, **decode_kwargs) -> Tensor:
    """Feed `input_ids` [B, T] after what `cache` already holds; logits [B, V] of the last position.

    `decode_kwargs` go to `model.decode` (memory, memory_mask, attention_mask, position_ids).
    """
    hidden = model.decode(input_ids, cache=cache, **decode_kwargs)
    return model.logits(hidden[:, -1])


def decode_one_token(model: Transformer, token: Tensor, cache: KVCache, **decode_kwargs) -> Tensor:
    """Feed one token per sequence, `token` [B, 1]; logits [B, V]."""
    if token.dim() != 2 or token.shape[1] != 1:
        raise ValueError(f"decode_one_token takes tokens of shape [B, 1], got {list(token.shape)}")
    return model.logits(model.decode(token, cache=cache, **decode_kwargs)[:, -1])


def _check_generation(model: Transformer, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int) -> None:
    config = model.config
    if not config.has_decoder:
        raise UserError(f"an {config.arch}-only model cannot generate text; use embeddings (embed) instead")
    if model.lm_head is None:
        raise UserError("this model has no LM head (lm_head=false), so it cannot generate text")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise UserError(f"the prompt must be a non-empty batch of token ids [B, T], got shape {list(input_ids.shape)}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise UserError(f"attention_mask {list(attention_mask.shape)} does not match the prompt {list(input_ids.shape)}")
        mask = attention_mask.bool()
        if not mask.any(dim=1).all():
            raise UserError("a prompt in the batch is all padding")
        if config.is_causal_lm and (mask[:, 1:].long() < mask[:, :-1].long()).any():
            raise UserError("decoder-only prompts must be left-padded (padding before the text), not right-padded")


def _check_positions(config, prompt_length: int, max_new_tokens: int) -> None:
    """Absolute-position models cannot go past their position table."""
    if config.position != "absolute":
        return
    if config.arch == "encoder-decoder":
        if prompt_length > config.max_positions:
            raise UserError(f"the prompt has {prompt_length} tokens but the model has {config.max_positions} positions")
        needed, what = 1 + max_new_tokens, f"the start token + {max_new_tokens} new tokens"
    else:
        needed, what = prompt_length + max_new_tokens, f"a prompt of {prompt_length} tokens + {max_new_tokens} new tokens"
    if needed > config.max_positions:
        raise UserError(
            f"{what} need {needed} positions but the model has {config.max_positions}; "
            f"lower max_new_tokens to {max(config.max_positions - (needed - max_new_tokens), 0)} or shorten the prompt"
        )


@torch.inference_mode()
def generate(
    model: Transformer,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    on_token: Callable[[int, Tensor], None] | None = None,
    compiled: CompiledDecoder | None = None,
) -> tuple[Tensor, dict]:
    """Generate up to `max_new_tokens` per sequence; returns (new tokens [B, n], stats).

    input_ids [B, T]: the prompt (decoder-only, may be left-padded with `attention_mask`) or the
    encoder input (encoder-decoder, whose decoder starts from `config.start_token_id`).
    A sequence stops at `eos_token_id` (which it emits) and pads with `config.pad_token_id`
    afterwards; the loop ends when every sequence has stopped, so n <= max_new_tokens.
    eos_token_id=None never stops early (pass `model.config.eos_token_id` to stop at the model's).
    `on_token(step, tokens [B])` is called with each step's tokens as soon as they are chosen.
    `compiled` (decoder-only models): run the prefill and decode steps through its compiled
    graphs on a static KV cache instead of eagerly (same tokens; see cpmctl.compiled).
    Stats: time_to_first_token_s, decode_s, decode_tokens_per_s (the tokens after the first, of
    unfinished sequences, per second of the decode phase), generated_tokens (real tokens, eos
    included, over the batch), steps; with `compiled`, compile_s (seconds of the steps that
    built a graph, included in the times above).
    """
    config = model.config
    _check_generation(model, input_ids, attention_mask, max_new_tokens)
    if compiled is not None and compiled.model is not model:
        raise ValueError("the compiled steps were built for another model")
    sample = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    _check_sampling(temperature, top_k, top_p)

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    input_ids = input_ids.to(device)
    batch, prompt_width = input_ids.shape
    mask = attention_mask.to(device).long() if attention_mask is not None else None
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: SDPA's causal path, no explicit mask
    prompt_length = int(mask.sum(dim=1).max()) if mask is not None else prompt_width
    _check_positions(config, prompt_length, max_new_tokens)

    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    pad = config.pad_token_id
    stats = {"time_to_first_token_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "generated_tokens": 0, "steps": 0}
    if max_new_tokens == 0:
        return input_ids.new_empty(batch, 0), stats

    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        if config.arch == "encoder-decoder":
            memory = model.encode(input_ids, mask)
            cache = KVCache.for_model(model, batch, 1 + max_new_tokens, device=device, dtype=dtype)
            step_kwargs = dict(memory=memory, memory_mask=mask)
            first = torch.full((batch, 1), config.start_token_id, dtype=torch.long, device=device)
            logits = prefill(model, first, cache, **step_kwargs)

            def next_kwargs(length: int) -> dict:
                return step_kwargs
        elif compiled is not None:
            compile_before = compiled.stats.compile_s
            cache, logits, next_kwargs = _compiled_prefill(compiled, input_ids, mask, prompt_length, max_new_tokens)
        else:
            cache = KVCache.for_model(model, batch, prompt_width + max_new_tokens, device=device, dtype=dtype)
            if mask is None:
                logits = prefill(model, input_ids, cache)

                def next_kwargs(length: int) -> dict:
                    return {}
            else:
                # Padding stays masked as keys; generated positions are all real.
                full_mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], dim=1)
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                last_position = positions[:, -1:]
                logits = prefill(model, input_ids, cache, attention_mask=mask, position_ids=positions)

                def next_kwargs(length: int) -> dict:
                    # `length` positions are cached; the new token is the (length+1)-th.
                    return dict(attention_mask=full_mask[:, : length + 1], position_ids=last_position + (length + 1 - prompt_width))

        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        out = []
        decode_tokens = 0
        decode_start = None
        for step in range(max_new_tokens):
            tokens = sample_next(logits, generator=generator, **sample)
            tokens = tokens.masked_fill(finished, pad)
            alive = int((~finished).sum())
            stats["generated_tokens"] += alive
            if step == 0:
                stats["time_to_first_token_s"] = time.perf_counter() - start
                decode_start = time.perf_counter()
            else:
                decode_tokens += alive
            if eos_token_id is not None:
                finished = finished | (tokens == eos_token_id)
            out.append(tokens)
            if on_token is not None:
                on_token(step, tokens)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            if compiled is not None:
                logits = compiled.decode(tokens[:, None], cache, **next_kwargs(prompt_width + step))
            else:
                logits = decode_one_token(model, tokens[:, None], cache, **next_kwargs(cache.length))
        if decode_start is not None:
            stats["decode_s"] = time.perf_counter() - decode_start
        stats["steps"] = len(out)
        stats["decode_tokens_per_s"] = decode_tokens / stats["decode_s"] if stats["decode_s"] > 0 else 0.0
        if compiled is not None:
            stats["compile_s"] = compiled.stats.compile_s - compile_before
        return torch.stack(out, dim=1), stats
    finally:
        model.train(was_training)


def _compiled_prefill(compiled: CompiledDecoder, input_ids: Tensor, mask: Tensor | None, prompt_length: int,
                      max_new_tokens: int):
    """The static cache, the prompt's logits and the decode steps' extra inputs, as `generate`'s
    eager branch makes them, for the compiled steps: the padding mask covers every cache slot
    (one shape for every step) and positions are passed as tensors."""
    batch, prompt_width = input_ids.shape
    needed = max(prompt_width + max_new_tokens, compiled.prefill_width(prompt_width))
    cache = compiled.allocate(batch, needed, max_position=prompt_length + max_new_tokens - 1)
    if mask is None:
        return cache, compiled.prefill(input_ids, cache), lambda length: {}
    full_mask = torch.cat([mask, mask.new_ones(batch, cache.max_length - prompt_width)], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    last_position = positions[:, -1:]
    logits = compiled.prefill(input_ids, cache, attention_mask=full_mask, position_ids=positions)

    def next_kwargs(length: int) -> dict:
        return dict(attention_mask=full_mask, position_ids=last_position + (length + 1 - prompt_width))

    return cache, logits, next_kwargs


# -- embeddings ------------------------------------------------------------------------------
@torch.inference_mode()
def embed(
    model: Transformer,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    pooling: str = "mean",
    normalize: bool = False,
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Sentence embeddings [B, d]: the encoder's hidden states pooled over the real tokens.

    pooling "mean" averages the positions where attention_mask is 1 (sentence-transformers'
    mean pooling); "cls" takes the first position. normalize=True scales each to unit L2 norm.
    """
    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    if not model.config.has_encoder:
        raise UserError(f"embeddings need an encoder; a {model.config.arch}-only model has none")
    was_training = model.training
    model.eval()
    try:
        hidden = model.encode(input_ids, attention_mask, token_type_ids)
    finally:
        model.train(was_training)
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = attention_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled
