"""Generation and embeddings: the cached loop against naive recomputation, sampling, stopping."""

from __future__ import annotations

import pytest
import torch

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.generate import decode_one_token, embed, filter_logits, generate, prefill, sample_next
from cpmctl.model import KVCache, build_model

STD = 0.05


def gpt2_like(**overrides) -> ModelConfig:
    fields = dict(
        arch="decoder", vocab_size=256, d_model=64, n_heads=4, d_ff=256, n_layers=2, norm="layer",
        norm_eps=1e-5, position="absolute", max_positions=32, activation="gelu_tanh", gated=False,
        bias=True, tie_embeddings=True, eos_token_id=None, init_std=STD,
    )
    return ModelConfig(**{**fields, **overrides})


def make(name: str, seed: int = 0, **overrides):
    config = gpt2_like(**overrides) if name == "gpt2-like" else ModelConfig.from_preset(name, init_std=STD, **overrides)
    torch.manual_seed(seed)
    return build_model(config).eval()


def ids(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def naive_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Re-run the whole forward on the growing sequence and take the argmax: no cache at all."""
    config = model.config
    if config.arch == "encoder-decoder":
        seq = torch.full((prompt.shape[0], 1), config.start_token_id, dtype=torch.long)
        for _ in range(steps):
            nxt = model(prompt, decoder_input_ids=seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        return seq[:, 1:]
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1] :]


def left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return tokens, mask


# -- greedy against the naive loop ------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-like", "t5-tiny"])
def test_greedy_equals_naive_loop(name):
    model = make(name)
    prompt = ids(2, 7, model.config.vocab_size)
    out, stats = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (2, 12) and out.dtype == torch.long
    assert torch.equal(out, naive_greedy(model, prompt, 12))
    assert len(set(out.flatten().tolist())) > 2  # not a degenerate constant sequence
    assert stats["steps"] == 12 and stats["generated_tokens"] == 24
    assert stats["time_to_first_token_s"] > 0 and stats["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-like"])
def test_left_padded_batch_equals_rows_alone(name):
    model = make(name)
    vocab = model.config.vocab_size
    rows = [ids(1, n, vocab, seed=20 + n)[0] for n in (9, 4, 6)]
    tokens, mask = left_pad(rows, model.config.pad_token_id)
    out, _ = generate(model, tokens, attention_mask=mask, max_new_tokens=10)
    for i, row in enumerate(rows):
        assert torch.equal(out[i], naive_greedy(model, row[None], 10)[0]), f"row {i}"


def test_encoder_decoder_padded_sources_equal_rows_alone():
    model = make("t5-tiny")
    rows = [ids(1, n, model.config.vocab_size, seed=30 + n)[0] for n in (8, 5)]
    width = 8
    tokens = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):  # encoder inputs may be padded on either side; right here
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = 1
    out, _ = generate(model, tokens, attention_mask=mask, max_new_tokens=8)
    for i, row in enumerate(rows):
        assert torch.equal(out[i], naive_greedy(model, row[None], 8)[0])


def test_prefill_and_decode_one_token_match_full_forward():
    model = make("llama-tiny")
    tokens = ids(2, 9, model.config.vocab_size)
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.allocate(model.config, 2, 9)
        last = prefill(model, tokens[:, :6], cache)
        assert last.shape == (2, model.config.vocab_size)
        assert (last - full[:, 5]).abs().max() <= 1e-5
        for t in (6, 7, 8):
            step = decode_one_token(model, tokens[:, t : t + 1], cache)
            assert (step - full[:, t]).abs().max() <= 1e-5
    assert cache.length == 9


# -- sampling ------------------------------------------------------------------------------------
def test_sampling_is_reproducible_and_seed_dependent():
    model = make("llama-tiny")
    prompt = ids(2, 5, model.config.vocab_size)
    kw = dict(max_new_tokens=16, temperature=1.0)
    a, _ = generate(model, prompt, seed=0, **kw)
    b, _ = generate(model, prompt, seed=0, **kw)
    c, _ = generate(model, prompt, seed=1, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy, _ = generate(model, prompt, max_new_tokens=16)
    assert not torch.equal(a, greedy)  # temperature 1 over a near-flat distribution really samples


def test_top_k_1_equals_greedy():
    model = make("gpt2-like")
    prompt = ids(3, 6, model.config.vocab_size)
    greedy, _ = generate(model, prompt, max_new_tokens=10)
    sampled, _ = generate(model, prompt, max_new_tokens=10, temperature=1.5, top_k=1, seed=3)
    assert torch.equal(sampled, greedy)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.9], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=99)).all()


# A hand-made distribution, deliberately not sorted: token 1 has 0.4, token 3 0.3, token 2 0.2,
# token 0 0.1. Nucleus sets: the smallest top set whose mass reaches p.
PROBS = torch.tensor([0.1, 0.4, 0.2, 0.3])


@pytest.mark.parametrize(
    "top_p,expected",
    [(0.05, {1}), (0.35, {1}), (0.65, {1, 3}), (0.75, {1, 2, 3}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_expected_tokens(top_p, expected):
    logits = PROBS.log()[None]
    kept = torch.isfinite(filter_logits(logits, top_p=top_p))[0].nonzero().flatten().tolist()
    assert set(kept) == expected
    # Sampling never leaves the nucleus, and within it follows the renormalised probabilities.
    draws = sample_next(logits.expand(4000, -1), temperature=1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert set(draws.unique().tolist()) == expected
    mass = sum(PROBS[t].item() for t in expected)
    for t in expected:
        assert abs(counts[t].item() - PROBS[t].item() / mass) < 0.03


def test_top_p_and_top_k_combine():
    logits = PROBS.log()[None]
    # top_k=2 leaves {1: 0.4, 3: 0.3} -> renormalised 4/7, 3/7; p=0.5 keeps only token 1
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.5))[0].tolist() == [False, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.6))[0].tolist() == [False, True, False, True]


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_options_raise(kw):
    with pytest.raises(UserError):
        sample_next(torch.zeros(1, 4), **{"temperature": 1.0, **kw})


# -- stopping ------------------------------------------------------------------------------------
def test_eos_stops_each_sequence_and_pads():
    model = make("llama-tiny")
    pad = model.config.pad_token_id
    prompt = ids(3, 5, model.config.vocab_size, seed=4)
    free, _ = generate(model, prompt, max_new_tokens=12)
    eos = int(free[0, 3])
    stopped, stats = generate(model, prompt, max_new_tokens=12, eos_token_id=eos)

    expected_rows, ends = [], []
    for row in free.tolist():
        end = row.index(eos) + 1 if eos in row else len(row)
        ends.append(end)
        expected_rows.append(row[:end] + [pad] * (len(row) - end))
    width = max(ends)
    assert stopped.shape == (3, width)
    assert stopped.tolist() == [r[:width] for r in expected_rows]
    assert ends[0] <= 4
    assert stats["generated_tokens"] == sum(ends)


def test_all_finished_stops_early_and_streams():
    model = make("t5-tiny")
    prompt = ids(1, 6, model.config.vocab_size, seed=5)
    free, _ = generate(model, prompt, max_new_tokens=10)
    eos = int(free[0, 2])
    first = free[0].tolist().index(eos)
    seen = []
    out, stats = generate(model, prompt, max_new_tokens=10, eos_token_id=eos, on_token=lambda step, tok: seen.append((step, tok.clone())))
    assert out.shape == (1, first + 1) and int(out[0, -1]) == eos
    assert [s for s, _ in seen] == list(range(first + 1))
    assert torch.equal(torch.stack([t for _, t in seen], dim=1), out)
    assert stats["steps"] == first + 1


def test_exceeding_absolute_positions_raises():
    model = make("gpt2-like")  # max_positions 32
    prompt = ids(1, 20, model.config.vocab_size)
    with pytest.raises(UserError, match="32"):
        generate(model, prompt, max_new_tokens=13)
    out, _ = generate(model, prompt, max_new_tokens=12)  # exactly fits
    assert out.shape == (1, 12)
    # left padding does not count against the limit: the real prompt is 20 tokens
    tokens, mask = left_pad([prompt[0]], 0)
    tokens = torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), mask], dim=1)
    padded, _ = generate(model, tokens, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(padded, out)


def test_right_padded_decoder_prompt_raises():
    model = make("llama-tiny")
    prompt = ids(2, 5, model.config.vocab_size)
    mask = torch.ones_like(prompt)
    mask[1, 3:] = 0
    with pytest.raises(UserError, match="left-padded"):
        generate(model, prompt, attention_mask=mask, max_new_tokens=3)


def test_encoder_only_cannot_generate():
    model = make("bert-tiny")
    with pytest.raises(UserError, match="cannot generate"):
        generate(model, ids(1, 4, model.config.vocab_size), max_new_tokens=3)


def test_generate_restores_training_mode_and_leaves_no_grad():
    model = make("llama-tiny").train()
    out, _ = generate(model, ids(1, 4, model.config.vocab_size), max_new_tokens=2)
    assert model.training and not out.requires_grad


# -- embeddings ------------------------------------------------------------------------------
def test_embed_mean_pooling_equals_manual_masked_mean():
    model = make("bert-tiny")
    tokens = ids(3, 7, model.config.vocab_size)
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        hidden = model.encode(tokens, mask)
    manual = torch.stack([hidden[i, mask[i].bool()].mean(dim=0) for i in range(3)])
    pooled = embed(model, tokens, mask)
    assert pooled.shape == (3, model.config.d_model)
    assert (pooled - manual).abs().max() <= 1e-5
    # the padded rows embed exactly as the same text alone
    alone = embed(model, tokens[2:, :2], mask[2:, :2])
    assert (pooled[2] - alone[0]).abs().max() <= 1e-5

    unit = embed(model, tokens, mask, normalize=True)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert (unit - manual / manual.norm(dim=-1, keepdim=True)).abs().max() <= 1e-5
    assert (embed(model, tokens, mask, pooling="cls") - hidden[:, 0]).abs().max() <= 1e-6
    with pytest.raises(UserError):
        embed(model, tokens, mask, pooling="max")


def test_embed_needs_an_encoder():
    model = make("llama-tiny")
    with pytest.raises(UserError, match="encoder"):
        embed(model, ids(1, 4, model.config.vocab_size), None)
