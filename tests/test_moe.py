"""The MoE FFN layer: sparse paths against a dense-masked reference, dense <-> MoE conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpmctl.config import ModelConfig, MoEConfig
from cpmctl.model import FeedForward, build_model
from cpmctl.moe import MoEFeedForward, dense_from_moe, dense_masked_reference, moe_ffn_reference, moe_from_dense


def _weights(e, de, d, gated, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dtype)
    return dict(
        w_in=rnd(e, de, d), w_gate=rnd(e, de, d) if gated else None, w_out=rnd(e, de, d),
        b_in=rnd(e, de) if bias else None, b_gate=rnd(e, de) if (bias and gated) else None, b_out=rnd(d) if bias else None,
    )


def _routing(n, e, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    return ids, (torch.rand(n, k, generator=g) + 0.5).to(dtype)


@pytest.mark.parametrize("activation,gated,bias", [("relu", False, True), ("gelu", False, False), ("silu", True, False), ("gelu_tanh", True, True)])
@pytest.mark.parametrize("n,e,de,k", [(1, 16, 4, 3), (1, 4, 8, 2), (2, 32, 4, 5), (64, 8, 8, 3), (17, 6, 5, 6), (5, 4, 64, 1)])
def test_sparse_path_equals_dense_masked_reference(activation, gated, bias, n, e, de, k):
    d = 12
    w = _weights(e, de, d, gated, bias)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    ids, weights = _routing(n, e, k, torch.float32)
    got = moe_ffn_reference(x, ids, weights, activation=activation, **w)
    want = dense_masked_reference(x, ids, weights, activation=activation, **w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference takes its own single-token path
        torch.testing.assert_close(moe_ffn_reference(x, ids, weights, activation=activation, **w), want, atol=1e-5, rtol=1e-5)


def test_float64_fallback_and_gradients_match_reference():
    d, e, de, k, n = 10, 6, 4, 2, 30
    w = {name: (t.double().requires_grad_() if t is not None else None) for name, t in _weights(e, de, d, True, True).items()}
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    ids, weights = _routing(n, e, k, torch.float64)
    got = moe_ffn_reference(x, ids, weights, activation="gelu", **w)
    grads = torch.autograd.grad((got * got).sum(), [x, w["w_in"], w["w_out"]])
    want = dense_masked_reference(x, ids, weights, activation="gelu", **w)
    want_grads = torch.autograd.grad((want * want).sum(), [x, w["w_in"], w["w_out"]])
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


def test_float32_grouped_path_backward():
    d, e, de, k, n = 16, 8, 4, 3, 40  # 16-byte rows: the grouped GEMM path
    w = {name: (t.requires_grad_() if t is not None else None) for name, t in _weights(e, de, d, False, True).items()}
    x = torch.randn(n, d)
    ids, weights = _routing(n, e, k, torch.float32)
    (moe_ffn_reference(x, ids, weights, activation="relu", **w) ** 2).sum().backward()
    got = [w[name].grad.clone() for name in ("w_in", "w_out", "b_in")]
    for t in w.values():
        if t is not None:
            t.grad = None
    (dense_masked_reference(x, ids, weights, activation="relu", **w) ** 2).sum().backward()
    for a, name in zip(got, ("w_in", "w_out", "b_in")):
        torch.testing.assert_close(a, w[name].grad, atol=1e-5, rtol=1e-5)


# -- whole models: all experts == dense, restore == dense ------------------------------------------
MODELS = {
    "encoder-gelu": ("bert-tiny", {}),
    "decoder-swiglu": ("llama-tiny", {}),
    "encoder-decoder-gated-gelu": ("t5-tiny", {}),
    "encoder-decoder-relu": ("t5-tiny", {"activation": "relu", "gated": False}),
}


def _inputs(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=g)
    if model.config.arch == "encoder-decoder":
        return dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    return dict(input_ids=ids)


def moefy_model_randomly(model, experts: int, top_k: int, router: str = "oracle", seed: int = 0):
    """Every FFN of `model` MoEfied in place with a random neuron permutation."""
    config = model.config
    de = -(-config.d_ff // experts)
    moe_config = config.replace(moe=dict(experts=experts, expert_size=de, top_k=top_k, router=router, permuted=True))
    g = torch.Generator().manual_seed(seed)
    for stack, index, ffn in model.ffn_modules():
        perm = torch.cat([torch.randperm(config.d_ff, generator=g), torch.full((experts * de - config.d_ff,), -1)])
        perm = perm[torch.randperm(perm.numel(), generator=g)]
        model.replace_ffn(stack, index, moe_from_dense(ffn, moe_config, perm))
    model.config = moe_config
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("experts", [8, 12])  # 12 does not divide d_ff: zero-padded experts
def test_all_experts_equal_dense(name, experts):
    preset, overrides = MODELS[name]
    torch.manual_seed(0)
    dense = build_model(ModelConfig.from_preset(preset, **overrides)).eval()
    inputs = _inputs(dense)
    with torch.no_grad():
        want = dense(**inputs)
        moe = moefy_model_randomly(dense, experts, top_k=experts, router="mlp")
        got = moe(**inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_restore_is_bit_exact(name):
    preset, overrides = MODELS[name]
    torch.manual_seed(0)
    dense = build_model(ModelConfig.from_preset(preset, **overrides))
    original = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = moefy_model_randomly(dense, 12, top_k=3)
    for stack, index, ffn in moe.ffn_modules():
        moe.replace_ffn(stack, index, dense_from_moe(ffn, moe.config))
    restored = moe.state_dict()
    assert sorted(restored) == sorted(original)
    for key, value in original.items():
        assert torch.equal(restored[key], value), key


def _layer(activation="gelu", gated=False, bias=True, experts=8, top_k=2, router="oracle"):
    config = ModelConfig.from_preset("bert-tiny", activation=activation, gated=gated, bias=bias)
    torch.manual_seed(0)
    dense = FeedForward(config)
    moe_config = config.replace(moe=dict(experts=experts, expert_size=config.d_ff // experts, top_k=top_k, router=router, permuted=True))
    return dense, moe_from_dense(dense, moe_config, torch.randperm(config.d_ff))


@pytest.mark.parametrize("activation,gated", [("relu", False), ("gelu", False), ("silu", True)])
def test_oracle_router_selects_the_largest_activation_mass(activation, gated):
    dense, moe = _layer(activation, gated, top_k=3)
    x = torch.randn(20, 64)
    # By hand, in dense neuron order: |activation| times the norm of the neuron's output weights.
    contribution = dense.hidden(x).abs() * dense.w_out.weight.norm(dim=0)
    mass = contribution[:, moe.perm].view(20, 8, -1).sum(-1)
    experts, weights = moe.route(x)
    assert torch.equal(experts.sort(-1).values, mass.topk(3, dim=-1).indices.sort(-1).values)
    assert torch.equal(weights, torch.ones_like(weights))
    # And the layer's output is the dense FFN restricted to those experts' neurons.
    keep = torch.zeros(20, 8).scatter(1, experts, 1.0).repeat_interleave(moe.expert_size, 1)
    mask = torch.zeros(20, 128)
    mask[:, moe.perm] = keep
    want = (dense.hidden(x) * mask) @ dense.w_out.weight.T + dense.w_out.bias
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("one_group", [False, True])  # True: the GPU layout (one matmul per projection)
@pytest.mark.parametrize("activation,gated,bias", [("relu", False, True), ("gelu", False, False), ("silu", True, True)])
def test_all_experts_skip_the_router_and_equal_the_dense_ffn(activation, gated, bias, one_group, monkeypatch):
    import cpmctl.moe as moe_module

    if one_group:
        monkeypatch.setattr(moe_module, "expert_groups", lambda experts, device: 1)
    dense, moe = _layer(activation, gated, bias, experts=8, top_k=8, router="mlp")

    class NoRouter(nn.Module):
        def forward(self, x):
            raise AssertionError("the router ran although every expert is selected")

    moe.router = NoRouter()
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe(x[0, :1]), dense(x[0, :1]), atol=1e-5, rtol=1e-5)  # one token, with autograd
    assert moe.counts == [22, 22 * 8]


def test_expert_groups_give_every_cpu_thread_two_groups_of_whole_experts():
    from cpmctl.moe import expert_groups

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert [expert_groups(e, torch.device("cpu")) for e in (1, 3, 7, 12, 48, 64)] == [1, 3, 7, 4, 4, 4]
        torch.set_num_threads(1)
        assert [expert_groups(e, torch.device("cpu")) for e in (1, 7, 64)] == [1, 7, 2]
    finally:
        torch.set_num_threads(before)
    assert expert_groups(64, torch.device("meta")) == 1  # not a CPU: one matmul per projection


def test_compute_counts_and_triton_dispatch_name():
    _, moe = _layer(top_k=2)
    moe(torch.randn(3, 5, 64))
    assert moe.counts == [15, 30]
    assert moe.kernels == "torch"


def test_linear_router_upcycled_top1_equals_dense():
    config = ModelConfig.from_preset("llama-tiny")
    torch.manual_seed(0)
    dense = FeedForward(config)
    moe = MoEFeedForward(config.replace(moe=dict(experts=4, expert_size=config.d_ff, top_k=1)))
    assert isinstance(moe.router, nn.Linear) and moe.perm is None
    with torch.no_grad():
        for e in range(4):
            moe.w_in[e].copy_(dense.w_in.weight)
            moe.w_gate[e].copy_(dense.w_gate.weight)
            moe.w_out[e].copy_(dense.w_out.weight.T)
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


def test_moe_config_defaults_keep_old_checkpoints_loading():
    old = MoEConfig(experts=4, expert_size=8, top_k=1, router="linear", layers=None)
    assert old.permuted is False and old.ratio is None
    with pytest.raises(Exception, match="unknown MoE router"):
        MoEConfig(experts=4, expert_size=8, router="magic")


def test_skipped_expert_fill_follows_w_out_when_it_changes():
    """A skipped expert adds its output at the neuron fill values. When w_out is trained (grad on)
    that output is computed from w_out; under no_grad the stored one is refreshed after any change
    of w_out, so a trained layer evaluates as it was trained."""
    config = ModelConfig.from_preset("bert-tiny", activation="gelu", gated=False, bias=True)
    torch.manual_seed(0)
    dense = FeedForward(config)
    moe_config = config.replace(moe=dict(experts=8, expert_size=config.d_ff // 8, top_k=2, router="oracle",
                                         permuted=True, fill_skipped=True))
    moe = moe_from_dense(dense, moe_config, torch.randperm(config.d_ff))
    moe.set_fill(torch.randn(8, config.d_ff // 8) * 0.1)
    x = torch.randn(5, 64)

    def by_hand():  # selected experts run; each skipped one adds act_fill @ its w_out block
        experts, _ = moe.route(x)
        out = moe_ffn_reference(x, experts, torch.ones(experts.shape), moe.w_in, None, moe.w_out, moe.b_in, None, moe.b_out, "gelu")
        fill = torch.einsum("ek,ekd->ed", moe.act_fill, moe.w_out)
        skipped = torch.ones(5, 8).scatter(1, experts, 0.0)
        return out + skipped @ fill

    with torch.no_grad():
        torch.testing.assert_close(moe(x), by_hand(), atol=1e-5, rtol=1e-5)
        moe.w_out.mul_(1.5)  # an in-place update, as an optimizer step makes
        torch.testing.assert_close(moe(x), by_hand(), atol=1e-5, rtol=1e-5)
    out = moe(x)  # grad enabled, w_out trainable: the fill passes w_out's gradient
    out.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(out, by_hand(), atol=1e-5, rtol=1e-5)
    assert moe.w_out.grad is not None
    skipped_any = torch.ones(5, 8).scatter(1, moe.route(x)[0], 0.0).sum(0) > 0
    assert skipped_any.any() and torch.all(moe.w_out.grad[skipped_any].abs().sum((1, 2)) > 0)
