"""The Transformer's own invariants on tiny fp32 models: caching, padding, causality, sharing,
T5 position buckets, MoE equivalences, parameter counts and trainability."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cpmctl.config import ModelConfig
from cpmctl.model import ACTIVATIONS, FeedForward, KVCache, RelativePositionBias, build_model, parameter_counts
from cpmctl.moe import MoEFeedForward

TOL = 1e-5
# Larger than the presets' 0.02 so that attention patterns and positions visibly move the logits:
# a broken cache or mask then shows up far above the tolerance.
STD = 0.05


def gpt2_like(**overrides) -> ModelConfig:
    fields = dict(
        arch="decoder", vocab_size=256, d_model=64, n_heads=4, d_ff=256, n_layers=2, norm="layer",
        norm_eps=1e-5, norm_position="pre", position="absolute", max_positions=64, activation="gelu_tanh",
        gated=False, bias=True, tie_embeddings=True, eos_token_id=None,
    )
    return ModelConfig(**{**fields, **overrides})


def cpm2_small_shrunk(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("cpm2-small", n_layers=2, n_decoder_layers=2, vocab_size=1000, **overrides)


def config_for(name: str, **overrides) -> ModelConfig:
    overrides = {"init_std": STD, **overrides}
    if name == "gpt2-like":
        return gpt2_like(**overrides)
    if name == "cpm2-small":  # d_model 256: a smaller std gives activations of the same size
        return cpm2_small_shrunk(**{**overrides, "init_std": overrides["init_std"] * 0.5})
    return ModelConfig.from_preset(name, **overrides)


def make(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config).eval()
    # Norm weights and biases start at ones/zeros; randomise them so they are exercised too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def left_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)


# -- KV cache ------------------------------------------------------------------------------------
def incremental_decoder_logits(model, tokens, chunks, *, mask=None):
    """Logits of a decoder-only model fed `tokens` chunk by chunk through one KV cache."""
    b, t = tokens.shape
    cache = KVCache.allocate(model.config, b, t)
    out, start = [], 0
    positions = left_positions(mask) if mask is not None else None
    for size in chunks:
        kw = {}
        if mask is not None:
            kw = dict(attention_mask=mask[:, : start + size], position_ids=positions[:, start : start + size])
        out.append(model.logits(model.decode(tokens[:, start : start + size], cache=cache, **kw)))
        start += size
    assert start == t and cache.length == t
    return torch.cat(out, dim=1)



@pytest.fixture(params=["llama-tiny", "gpt2-like"])
def decoder_model(request):
    """A random decoder-only model of each kind: the llama-tiny preset and a GPT-2-like config."""
    return make(config_for(request.param))

@torch.no_grad()
def test_decoder_kv_cache_matches_full_recomputation(decoder_model):
    model = decoder_model
    tokens = ids(2, 12, model.config.vocab_size)
    full = model(tokens)
    # a 5-token prompt, a chunk of 4 more after the cached prefix, then one token at a time
    cached = incremental_decoder_logits(model, tokens, [5, 4, 1, 1, 1])
    assert (cached - full).abs().max() <= TOL
    assert full.std() > 0.1  # the logits are not vanishingly small, so TOL is a real bound


@pytest.mark.parametrize("name", ["t5-tiny", "cpm2-small"])
@torch.no_grad()
def test_encoder_decoder_kv_cache_matches_full_recomputation(name):
    model = make(config_for(name))
    vocab = model.config.vocab_size
    enc = ids(2, 9, vocab, seed=2)
    enc_mask = torch.ones_like(enc)
    enc_mask[1, 6:] = 0  # the second source is right-padded: cross-attention must ignore the pads
    dec = ids(2, 10, vocab, seed=3)
    full = model(enc, attention_mask=enc_mask, decoder_input_ids=dec)

    memory = model.encode(enc, enc_mask)
    cache = KVCache.allocate(model.config, 2, 10)
    out, start = [], 0
    for size in [3, 4, 1, 1, 1]:
        hidden = model.decode(dec[:, start : start + size], memory=memory, memory_mask=enc_mask, cache=cache)
        out.append(model.logits(hidden))
        start += size
    cached = torch.cat(out, dim=1)
    assert all(kv is not None for kv in cache.cross)
    assert (cached - full).abs().max() <= TOL
    # the masked source positions really are ignored: changing those tokens changes nothing
    enc2 = enc.clone()
    enc2[1, 6:] = ids(1, 3, vocab, seed=9)
    assert (model(enc2, attention_mask=enc_mask, decoder_input_ids=dec) - full).abs().max() <= TOL


@torch.no_grad()
def test_left_padded_batch_matches_rows_alone(decoder_model):
    model = decoder_model
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    lengths = [10, 6, 3]
    rows = [ids(1, n, vocab, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    tokens = torch.full((3, width), pad, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1

    full = model.logits(model.decode(tokens, attention_mask=mask, position_ids=left_positions(mask)))
    cached = incremental_decoder_logits(model, tokens, [7, 2, 1], mask=mask)
    for i, row in enumerate(rows):
        alone = model(row[None])[0]
        real = slice(width - len(row), width)
        assert (full[i, real] - alone).abs().max() <= TOL
        assert (cached[i, real] - alone).abs().max() <= TOL
    # Sensitivity: attending to the padding changes the padded rows.
    leaky = model.logits(model.decode(tokens, position_ids=left_positions(mask)))
    assert (leaky[2, width - 3 :] - model(rows[2][None])[0]).abs().max() > 1e-3
    if model.config.position == "absolute":  # rotary is shift-invariant; absolute positions are not
        shifted = model.logits(model.decode(tokens, attention_mask=mask))
        assert (shifted[2, width - 3 :] - model(rows[2][None])[0]).abs().max() > 1e-3


# -- shared layers -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny"])
@torch.no_grad()
def test_shared_layers_equal_unshared_copies(name):
    shared_cfg = config_for(name, share_layers=True, n_layers=3, **({"n_decoder_layers": 3} if name == "t5-tiny" else {}))
    shared = make(shared_cfg)
    keys = shared.state_dict().keys()
    for stack in ("encoder", "decoder") if shared_cfg.has_encoder else ("decoder",):
        assert any(k.startswith(f"{stack}.blocks.0.") for k in keys)
        assert not any(k.startswith(f"{stack}.blocks.1.") for k in keys)
        assert getattr(shared, stack).n_layers == 3

    unshared = make(shared_cfg.replace(share_layers=False), seed=5)
    state = {}
    for key in unshared.state_dict():
        parts = key.split(".")
        if parts[1] == "blocks":
            parts[2] = "0"
        state[key] = shared.state_dict()[".".join(parts)]
    unshared.load_state_dict(state)
    assert parameter_counts(shared)["total"] < parameter_counts(unshared)["total"]

    vocab = shared_cfg.vocab_size
    if shared_cfg.arch == "encoder-decoder":
        enc, dec = ids(2, 7, vocab), ids(2, 6, vocab, seed=4)
        a = shared(enc, decoder_input_ids=dec)
        b = unshared(enc, decoder_input_ids=dec)
        memory = shared.encode(enc)
        cache = KVCache.allocate(shared_cfg, 2, 6)
        assert len(cache.keys) == 3
        steps = [shared.logits(shared.decode(dec[:, :4], memory=memory, cache=cache))]
        steps += [shared.logits(shared.decode(dec[:, i : i + 1], memory=memory, cache=cache)) for i in (4, 5)]
    else:
        tokens = ids(2, 8, vocab)
        a, b = shared(tokens), unshared(tokens)
        cache = KVCache.allocate(shared_cfg, 2, 8)
        assert len(cache.keys) == 3
        steps = [shared.logits(shared.decode(tokens[:, :5], cache=cache))]
        steps += [shared.logits(shared.decode(tokens[:, i : i + 1], cache=cache)) for i in (5, 6, 7)]
    assert (a - b).abs().max() <= TOL
    assert (torch.cat(steps, dim=1) - a).abs().max() <= TOL
    # Each application has its own cache slot: the slots of different layers hold different keys.
    assert (cache.keys[0] - cache.keys[1]).abs().max() > 1e-3


# -- padding, causality --------------------------------------------------------------------------
@torch.no_grad()
def test_post_norm_encoder_ignores_appended_padding():
    model = make(config_for("bert-tiny"))
    tokens = ids(2, 6, model.config.vocab_size)
    plain = model.encode(tokens, torch.ones_like(tokens))
    padded_tokens = torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 6, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)], dim=1)
    padded = model.encode(padded_tokens, mask)
    assert (padded[:, :6] - plain).abs().max() <= TOL
    # Sensitivity: without the mask the padding leaks into the real positions.
    assert (model.encode(padded_tokens)[:, :6] - plain).abs().max() > 1e-3


@torch.no_grad()
def test_decoder_is_causal(decoder_model):
    model = decoder_model
    tokens = ids(1, 10, model.config.vocab_size)
    base = model(tokens)
    for t in (0, 4, 8):
        changed = tokens.clone()
        changed[0, t + 1 :] = ids(1, 10 - t - 1, model.config.vocab_size, seed=7 + t)
        other = model(changed)
        assert (other[0, : t + 1] - base[0, : t + 1]).abs().max() <= TOL
        assert (other[0, t + 1] - base[0, t + 1]).abs().max() > 1e-3


# -- T5 relative position buckets ----------------------------------------------------------------
# Hand-computed from T5's definition with 32 buckets and max distance 128 (relative = key - query).
# Bidirectional: 16 buckets per direction (+16 when the key is after the query), exact below 8,
#   then 8 + floor(ln(d/8) / ln(16) * 8), clamped to 15.
# Unidirectional: only keys at or before the query count (later ones -> 0), exact below 16,
#   then 16 + floor(ln(d/16) / ln(8) * 16), clamped to 31.
BIDIRECTIONAL = {
    0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -20: 10, -40: 12, -100: 15, -127: 15, -128: 15, -1000: 15,
    1: 17, 7: 23, 8: 24, 20: 26, 40: 28, 100: 31, 1000: 31,
}
UNIDIRECTIONAL = {
    0: 0, 1: 0, 5: 0, 1000: 0, -1: 1, -15: 15, -16: 16, -20: 17, -40: 23, -100: 30, -127: 31, -128: 31, -1000: 31,
}


def _bias_module(bidirectional: bool, buckets: int = 32, max_distance: int = 128) -> RelativePositionBias:
    config = ModelConfig.from_preset("t5-tiny", relative_buckets=buckets, relative_max_distance=max_distance)
    return RelativePositionBias(config, bidirectional=bidirectional)


@pytest.mark.parametrize("bidirectional,expected", [(True, BIDIRECTIONAL), (False, UNIDIRECTIONAL)])
def test_relative_buckets_hand_computed(bidirectional, expected):
    relative = torch.tensor(list(expected))
    buckets = _bias_module(bidirectional).bucket(relative)
    assert buckets.tolist() == list(expected.values())


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 32)])
def test_relative_buckets_match_transformers(buckets, max_distance):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    relative = torch.arange(-300, 301)
    for bidirectional in (True, False):
        ours = _bias_module(bidirectional, buckets, max_distance).bucket(relative)
        theirs = t5.T5Attention._relative_position_bucket(relative, bidirectional, buckets, max_distance)
        assert torch.equal(ours, theirs)
        assert int(ours.max()) == buckets - 1  # large distances clamp to the last bucket


# -- MoE -----------------------------------------------------------------------------------------
MOE_FAMILIES = {
    # gated SiLU, no biases (Llama-like); plain GELU with biases (BERT/GPT-2-like)
    "gated": dict(activation="silu", gated=True, bias=False),
    "biased": dict(activation="gelu", gated=False, bias=True),
}


def moe_config(family: str, experts: int, expert_size: int, top_k: int) -> ModelConfig:
    return ModelConfig.from_preset(
        "llama-tiny", **MOE_FAMILIES[family], moe={"experts": experts, "expert_size": expert_size, "top_k": top_k}
    )


def random_init(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def upcycle(dense: FeedForward, moe: MoEFeedForward) -> None:
    """CPM-2 upcycling: every expert is a full copy of the dense FFN."""
    with torch.no_grad():
        for e in range(moe.num_experts):
            moe.w_in[e].copy_(dense.w_in.weight)
            moe.w_out[e].copy_(dense.w_out.weight.T)
            if moe.w_gate is not None:
                moe.w_gate[e].copy_(dense.w_gate.weight)
            if moe.b_in is not None:
                moe.b_in[e].copy_(dense.w_in.bias)
        if moe.b_out is not None:
            moe.b_out.copy_(dense.w_out.bias)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
@pytest.mark.parametrize("top_k", [1, 2, 4])
@torch.no_grad()
def test_upcycled_moe_equals_dense(family, top_k):
    config = moe_config(family, experts=4, expert_size=160, top_k=top_k)
    dense = FeedForward(config)
    random_init(dense, seed=1)
    moe = MoEFeedForward(config)
    random_init(moe, seed=2)  # any router, any starting experts
    upcycle(dense, moe)
    x = torch.randn(3, 7, config.d_model, generator=torch.Generator().manual_seed(3))
    assert (moe(x) - dense(x)).abs().max() <= TOL
    experts, _ = moe.route(x.reshape(-1, config.d_model))
    assert experts.unique().numel() > 1  # the routing really spreads the tokens


def per_token_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    act = ACTIVATIONS[moe.activation]
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        e = int((moe.router.weight @ token).argmax())
        up = moe.w_in[e] @ token + (moe.b_in[e] if moe.b_in is not None else 0)
        if moe.w_gate is not None:
            hidden = act(moe.w_gate[e] @ token + (moe.b_gate[e] if moe.b_gate is not None else 0)) * up
        else:
            hidden = act(up)
        rows.append(moe.w_out[e].T @ hidden + (moe.b_out if moe.b_out is not None else 0))
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
@torch.no_grad()
def test_top1_moe_equals_per_token_loop(family):
    config = moe_config(family, experts=4, expert_size=48, top_k=1)
    moe = MoEFeedForward(config)
    random_init(moe, seed=4)
    x = torch.randn(2, 9, config.d_model, generator=torch.Generator().manual_seed(5))
    assert (moe(x) - per_token_reference(moe, x)).abs().max() <= TOL


def test_moe_with_idle_experts():
    config = moe_config("gated", experts=4, expert_size=48, top_k=1)
    moe = MoEFeedForward(config)
    random_init(moe, seed=6)
    with torch.no_grad():
        moe.router.weight.copy_(torch.cat([torch.ones(1, config.d_model), -torch.ones(3, config.d_model)]))
    x = torch.rand(2, 5, config.d_model) + 0.1  # positive: every token prefers expert 0
    experts, _ = moe.route(x.reshape(-1, config.d_model))
    assert experts.unique().tolist() == [0]
    out = moe(x)
    assert torch.isfinite(out).all()
    assert (out - per_token_reference(moe, x)).abs().max() <= TOL
    out.sum().backward()
    assert moe.w_in.grad[0].abs().sum() > 0
    assert moe.w_in.grad[1:].abs().max() == 0


@torch.no_grad()
def test_upcycled_moe_model_equals_dense_model():
    dense_cfg = config_for("t5-tiny")
    moe_cfg = dense_cfg.replace(moe={"experts": 3, "expert_size": dense_cfg.d_ff, "top_k": 1, "layers": ["encoder.1", "decoder.0"]})
    dense, moe_model = make(dense_cfg), make(moe_cfg, seed=8)
    moe_state = moe_model.state_dict()
    moe_model.load_state_dict({k: v for k, v in dense.state_dict().items() if k in moe_state}, strict=False)
    swapped = 0
    for stack, index, ffn in moe_model.ffn_modules():
        if isinstance(ffn, MoEFeedForward):
            upcycle(getattr(dense, stack).block(index).ffn, ffn)
            swapped += 1
    assert swapped == 2
    enc, dec = ids(2, 8, dense_cfg.vocab_size), ids(2, 5, dense_cfg.vocab_size, seed=2)
    assert (moe_model(enc, decoder_input_ids=dec) - dense(enc, decoder_input_ids=dec)).abs().max() <= TOL


# -- parameter counts on meta ---------------------------------------------------------------------
@pytest.mark.parametrize("preset,low,high", [("cpm2-11b", 10.5e9, 11.5e9), ("cpm2-moe-198b", 190e9, 205e9)])
def test_parameter_counts_on_meta(preset, low, high):
    model = build_model(ModelConfig.from_preset(preset), device="meta")
    counts = parameter_counts(model)
    assert all(p.is_meta for p in model.parameters())
    assert low <= counts["total"] <= high
    assert counts["total"] == sum(counts[k] for k in ("embedding", "attention", "ffn", "other"))
    assert counts["ffn"] > counts["attention"] > counts["embedding"] > 0


# A process that only loads weights and runs them: building on meta must not initialise (torch's
# meta normal_, e.g. nn.Embedding's init, imports torch._dynamo: ~170 MiB resident, 1-2 s).
LOAD_AND_RUN = """
import json, sys
import torch
from cpmctl.checkpoint import load_model
model, ckpt = load_model(sys.argv[1])
with torch.no_grad():
    out = model(torch.tensor(json.loads(sys.argv[2])))
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "out": out.flatten().tolist()}))
"""


def test_meta_build_draws_no_random_numbers():
    config = ModelConfig.from_preset("bert-tiny", vocab_size=300)
    before = torch.random.get_rng_state()
    model = build_model(config, device="meta")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(0)
    first = build_model(config).state_dict()
    torch.manual_seed(0)
    second = build_model(config).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # random init off meta: seeded
    assert first["embed.tokens.weight"].std().item() == pytest.approx(config.init_std, rel=0.1)


def test_load_model_and_forward_do_not_import_dynamo(tmp_path):
    import json
    import subprocess
    import sys

    from cpmctl.checkpoint import save_checkpoint

    config = ModelConfig.from_preset("bert-tiny", vocab_size=300, init_std=STD)  # token, position and type embeddings
    model = build_model(config).eval()
    save_checkpoint(tmp_path / "ck", config, model.state_dict())
    x = ids(2, 7, config.vocab_size)
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tmp_path / "ck"), json.dumps(x.tolist())],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["dynamo"] is False
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(torch.tensor(result["out"]).view_as(expected), expected, atol=1e-6, rtol=0)


# -- training ------------------------------------------------------------------------------------
TRAINABLE = ["llama-tiny", "gpt2-like", "t5-tiny", "bert-tiny", "cpm2-small", "moe"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_training_step_reduces_loss(name):
    if name == "moe":
        config = ModelConfig.from_preset("t5-tiny", moe={"experts": 4, "expert_size": 32, "top_k": 2})
    else:
        config = config_for(name, init_std=0.02)
    assert config.dropout == 0.0
    torch.manual_seed(0)
    model = build_model(config).train()
    vocab = config.vocab_size
    tokens = ids(4, 12, vocab)

    def loss_fn():
        if config.arch == "encoder-decoder":
            dec = torch.cat([torch.full((4, 1), config.start_token_id), tokens[:, :-1]], dim=1)
            logits = model(tokens, decoder_input_ids=dec)
            target = tokens
        elif config.arch == "encoder":
            logits, target = model(tokens), tokens  # reconstruct the input (an MLM with no masking)
        else:
            logits, target = model(tokens)[:, :-1], tokens[:, 1:]
        return F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, f"no finite gradient for {missing}"
            assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < losses[0] - 0.05, losses
