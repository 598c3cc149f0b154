"""benchmarks/trained_moe.py's `scale` step: the small trained MoE tiled into a big one (layers
repeated, experts cut into blocks of neurons and tiled, router rows repeated), on tiny models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from cpmctl.checkpoint import LazyTensor, load_model, save_checkpoint
from cpmctl.config import ModelConfig
from cpmctl.model import build_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHAPE = dict(arch="decoder", vocab_size=64, d_model=32, n_heads=2, n_kv_heads=2, d_ff=16, n_layers=2,
             position="rotary", activation="silu", gated=True, eos_token_id=None, max_positions=64,
             moe=dict(experts=4, expert_size=16, top_k=2))


@pytest.fixture(scope="module")
def trained_moe():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("trained_moe_under_test", BENCHMARKS / "trained_moe.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPE)).eval()
    for _, _, ffn in model.ffn_modules():  # routers with clear preferences (the default init is near 0)
        torch.nn.init.normal_(ffn.router.weight, std=1.0)
    return model


def materialize(tensors):
    return {k: (v.produce() if isinstance(v, LazyTensor) else v) for k, v in tensors.items()}


def scaled_model(trained_moe, small, **kw):
    state = {k: v.detach() for k, v in small.state_dict().items()}
    tensors, config = trained_moe.scaled_tensors(state, small.config, **kw)
    model = build_model(config).eval()
    model.load_state_dict(materialize(tensors), strict=True)
    return model, tensors, config


def test_shapes_and_config(trained_moe, small):
    model, tensors, config = scaled_model(trained_moe, small, repeat=3, split=2, width=4, noise=0.01)
    assert (config.n_layers, config.moe.experts, config.moe.expert_size, config.moe.top_k) == (6, 8, 32, 4)
    for j in range(6):
        assert tuple(tensors[f"decoder.blocks.{j}.ffn.w_in"].shape) == (8, 32, 32)
        assert tuple(tensors[f"decoder.blocks.{j}.ffn.router.weight"].shape) == (8, 32)
        src = small.state_dict()[f"decoder.blocks.{j // 3}.attn.o.weight"]
        assert torch.equal(tensors[f"decoder.blocks.{j}.attn.o.weight"], src / 3)
        assert torch.equal(tensors[f"decoder.blocks.{j}.attn.qkv.weight"], small.state_dict()[f"decoder.blocks.{j // 3}.attn.qkv.weight"])
    # without noise, new expert 2e+b is block b of expert e tiled 4 times (w_out / 4 * 2 / 3)
    _, exact, _ = scaled_model(trained_moe, small, repeat=3, split=2, width=4, noise=0.0)
    w_in, w_out = small.state_dict()["decoder.blocks.1.ffn.w_in"], small.state_dict()["decoder.blocks.1.ffn.w_out"]
    got_in, got_out = exact["decoder.blocks.4.ffn.w_in"].produce(), exact["decoder.blocks.4.ffn.w_out"].produce()
    for e in range(4):
        for b in range(2):
            block = slice(8 * b, 8 * b + 8)
            assert torch.equal(got_in[2 * e + b], w_in[e, block].repeat(4, 1))
            assert torch.equal(got_out[2 * e + b], w_out[e, block].repeat(4, 1) * (2 / (4 * 3)))
    # with noise every expert of a layer, and a layer's copies, differ
    w = tensors["decoder.blocks.0.ffn.w_in"].produce()
    assert all(not torch.equal(w[i], w[j]) for i in range(8) for j in range(i))
    assert not torch.equal(w, tensors["decoder.blocks.1.ffn.w_in"].produce())


def test_without_noise_and_repeat_the_scaled_model_computes_the_small_one(trained_moe, small):
    model, _, _ = scaled_model(trained_moe, small, repeat=1, split=2, width=3, noise=0.0)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = small(ids), model(ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_tiled_routers_route_like_the_learned_ones(trained_moe, small):
    """On the same inputs, layer j's router chooses the blocks of the experts its source layer's
    router chooses, with the benchmark's default noise (0.01 of the router's std)."""
    model, _, _ = scaled_model(trained_moe, small, repeat=2, split=4, width=2, noise=0.01)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(2))
    small_ffns = [f for _, _, f in small.ffn_modules()]
    agree = total = 0
    for j, (_, _, ffn) in enumerate(model.ffn_modules()):
        src = small_ffns[j // 2]
        with torch.no_grad():
            want, _ = src.route(x)
            got, weights = ffn.route(x)
        assert got.shape == (256, 8)
        want_sets = [set(r) for r in want.tolist()]
        got_sets = [set(r) for r in (got // 4).tolist()]
        agree += sum(w == g for w, g in zip(want_sets, got_sets))
        total += len(want_sets)
        # a chosen expert's blocks share its weight: per token the weights still sum to 1
        assert torch.allclose(weights.float().sum(-1), torch.ones(256), atol=1e-5)
    assert agree / total >= 0.97, agree / total


def test_scaled_checkpoint_is_deterministic_and_loads(trained_moe, small, tmp_path):
    state = {k: v.detach() for k, v in small.state_dict().items()}
    hashes = []
    for name in ("a", "b"):
        tensors, config = trained_moe.scaled_tensors(state, small.config, repeat=2, split=2, width=2, noise=0.01, seed=0)
        hashes.append(save_checkpoint(tmp_path / name, config, tensors, stage="test")["content_hash"])
    assert hashes[0] == hashes[1]
    model, ckpt = load_model(tmp_path / "a")
    try:
        assert model.config.n_layers == 4 and model.config.moe.experts == 8
    finally:
        ckpt.close()
    other, _ = trained_moe.scaled_tensors(state, small.config, repeat=2, split=2, width=2, noise=0.01, seed=1)
    assert save_checkpoint(tmp_path / "c", config, other, stage="test")["content_hash"] != hashes[0]


def test_scale_plan_rejects_what_it_cannot_tile(trained_moe, small):
    with pytest.raises(ValueError, match="split must divide"):
        trained_moe.scale_plan(small.config, repeat=1, split=3, width=1)
    with pytest.raises(ValueError, match="linear top-k MoE"):
        trained_moe.scale_plan(small.config.replace(moe=None), repeat=1, split=1, width=1)
