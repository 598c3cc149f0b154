"""The C++ sparse FFN kernels (kernels/cpmctl_cpu/sparse_ffn.cpp): the MoE FFN over selected experts
and the TEAL threshold GEMV/FFN against their torch references, bad operands, and cpmctl's CPU
MoE and thresholded layers running them at decode sizes (parity with the torch path, fallback)."""

from __future__ import annotations

import warnings

import pytest
import torch

from cpmctl import ffn as ffn_module
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.ffn import GATHER_MAX_TOKENS, FeedForward, ThresholdFeedForward
from cpmctl.moe import moe_ffn_reference, moe_from_dense, resolve_kernels, set_kernels

import cpmctl_cpu  # noqa: E402 - part of the project (kernels/): a missing package is a failure, not a skip

if cpmctl_cpu.build_problem() is not None:
    pytest.skip(f"the C++ CPU kernels cannot be built here: {cpmctl_cpu.build_problem()}", allow_module_level=True)

from cpmctl_cpu import CpuKernelInputError  # noqa: E402
from cpmctl_cpu import sparse_ffn as sf  # noqa: E402

ACTS = ["relu", "silu", "gelu", "gelu_tanh", "drelu"]


def _experts(e, de, d, gated, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    return dict(w_in=rnd(e, de, d, scale=d ** -0.5), w_gate=rnd(e, de, d, scale=d ** -0.5) if gated else None,
                w_out=rnd(e, de, d, scale=de ** -0.5), b_in=rnd(e, de, scale=0.1) if bias else None,
                b_gate=rnd(e, de, scale=0.1) if (bias and gated) else None, b_out=rnd(d, scale=0.1) if bias else None)


def _call(fn, x, ids, weights, w, activation):
    return fn(x, ids, weights, w["w_in"], w["w_gate"], w["w_out"], w["b_in"], w["b_gate"], w["b_out"], activation)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("gated,bias", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("n,e,de,d,k", [(1, 8, 16, 64, 2), (2, 5, 7, 37, 1), (3, 6, 19, 53, 6), (4, 16, 32, 96, 4)])
def test_moe_ffn_matches_its_reference(activation, gated, bias, n, e, de, d, k):
    w = _experts(e, de, d, gated, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    for weights in (None, torch.rand(n, k, generator=g) + 0.5):
        got = _call(sf.moe_ffn, x, ids, weights, w, activation)
        torch.testing.assert_close(got, _call(sf.moe_ffn_reference, x, ids, weights, w, activation), atol=1e-5, rtol=1e-5)
        if activation != "drelu":  # cpmctl's own torch path (ones for None)
            ones = torch.ones(n, k) if weights is None else weights
            torch.testing.assert_close(got, _call(moe_ffn_reference, x, ids, ones, w, activation), atol=1e-5, rtol=1e-5)


def test_moe_ffn_with_every_expert_is_the_dense_ffn():
    e, de, d = 6, 16, 40
    w = _experts(e, de, d, True, False)
    x = torch.randn(2, d)
    ids = torch.arange(e).expand(2, e).contiguous()
    dense = torch.nn.functional.silu(x @ w["w_gate"].reshape(-1, d).T) * (x @ w["w_in"].reshape(-1, d).T) @ w["w_out"].reshape(-1, d)
    torch.testing.assert_close(_call(sf.moe_ffn, x, ids, None, w, "silu"), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,k_dim,m", [(1, 64, 128), (3, 37, 91), (4, 768, 300)])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.7])
def test_threshold_gemv_matches_its_reference(n, k_dim, m, threshold):
    g = torch.Generator().manual_seed(2)
    x, rows, bias = torch.randn(n, k_dim, generator=g), torch.randn(k_dim, m, generator=g) * k_dim ** -0.5, torch.randn(m, generator=g)
    x[0, :5] = 0.0
    for b in (None, bias):
        torch.testing.assert_close(sf.threshold_gemv(x, rows, threshold, b), sf.threshold_gemv_reference(x, rows, threshold, b),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("gated,bias", [(False, False), (True, True)])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_threshold_ffn_matches_its_reference(activation, gated, bias, n):
    d, d_ff = 45, 131
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g) * s[0] ** -0.5  # noqa: E731
    args = (rnd(d, d_ff), rnd(d, d_ff) if gated else None, rnd(d_ff, d), rnd(d_ff) if bias else None,
            rnd(d_ff) if bias and gated else None, rnd(d) if bias else None)
    x = torch.randn(n, d, generator=g)
    for t_in, t_hidden in ((0.5, 0.05), (torch.tensor(0.3), torch.tensor(0.0)), (-1.0, -1.0)):
        got = sf.threshold_ffn(x, *args, t_in, t_hidden, activation)
        torch.testing.assert_close(got, sf.threshold_ffn_reference(x, *args, t_in, t_hidden, activation), atol=1e-5, rtol=1e-5)


def test_ops_trace_under_torch_compile():
    sf.ops()  # built and loaded eagerly (the build holds a lock, which a traced function cannot enter)
    w = _experts(4, 8, 32, True, False)
    x, ids = torch.randn(1, 32), torch.tensor([[0, 2]])
    compiled = torch.compile(lambda x: _call(sf.moe_ffn, x, ids, None, w, "silu"), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), _call(sf.moe_ffn_reference, x, ids, None, w, "silu"), atol=1e-5, rtol=1e-5)
    rows = torch.randn(32, 20)
    compiled = torch.compile(lambda x: sf.ops().threshold_gemv(x, rows, torch.tensor(0.1), None), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), sf.threshold_gemv_reference(x, rows, 0.1), atol=1e-5, rtol=1e-5)


def _bad_cases():
    w = _experts(4, 8, 16, True, False)
    x, ids = torch.randn(1, 16), torch.tensor([[0, 1]])
    good = dict(x=x, ids=ids, weights=None, **w)
    yield "x float64", {**good, "x": x.double()}, "x must be float32"
    yield "x wrong d", {**good, "x": torch.randn(1, 15)}, "x must be [N, 16]"
    yield "ids int32", {**good, "ids": ids.int()}, "expert_ids must be an int64"
    yield "id out of range", {**good, "ids": torch.tensor([[0, 4]])}, "expert ids must be in [0, 4)"
    yield "negative id", {**good, "ids": torch.tensor([[-1, 0]])}, "expert ids must be in [0, 4)"
    yield "weights shape", {**good, "weights": torch.ones(1, 3)}, "expert_weights must have shape [1, 2]"
    yield "w_out shape", {**good, "w_out": torch.randn(4, 8, 15)}, "w_out must have shape [4, 8, 16]"
    yield "not contiguous", {**good, "w_in": w["w_in"].transpose(1, 2).contiguous().transpose(1, 2)}, "w_in must be contiguous"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_moe_operands_are_one_line(case):
    _, a, message = case
    with pytest.raises(CpuKernelInputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as info:
        sf.moe_ffn(a["x"], a["ids"], a["weights"], a["w_in"], a["w_gate"], a["w_out"], a["b_in"], a["b_gate"], a["b_out"], "silu")
    assert "\n" not in str(info.value)


def test_bad_threshold_operands_are_one_line():
    x, rows = torch.randn(1, 8), torch.randn(8, 4)
    for call, message in ((lambda: sf.threshold_gemv(x, rows[:7], 0.1), "matching K"),
                          (lambda: sf.threshold_gemv(x, rows, torch.ones(2)), "one-element"),
                          (lambda: sf.threshold_gemv(x, rows, 0.1, torch.ones(5)), "bias must have shape"),
                          (lambda: sf.threshold_ffn(x, rows, None, torch.randn(4, 8), None, None, None, 0, 0, "tanh"), "unknown activation"),
                          (lambda: sf.threshold_ffn(x, rows, None, torch.randn(5, 8), None, None, None, 0, 0, "relu"), "rows_out must have shape")):
        with pytest.raises(CpuKernelInputError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


# -- cpmctl's layers on the kernels -------------------------------------------------------------------
def _moe_layer(activation, gated, bias, experts, top_k, router):
    config = ModelConfig.from_preset("bert-tiny", activation=activation, gated=gated, bias=bias)
    torch.manual_seed(0)
    dense = FeedForward(config)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.2)
    moe_config = config.replace(moe=dict(experts=experts, expert_size=config.d_ff // experts, top_k=top_k, router=router,
                                         permuted=True))
    return moe_from_dense(dense, moe_config, torch.randperm(config.d_ff)).eval()


@pytest.mark.parametrize("activation,gated,bias,router,top_k", [("relu", False, True, "mlp", 2), ("silu", True, False, "linear", 3),
                                                                ("gelu", False, False, "center", 1), ("relu", False, False, "mlp", 7)])
def test_moe_layer_on_the_kernel_equals_the_torch_path(activation, gated, bias, router, top_k):
    layer = _moe_layer(activation, gated, bias, 8, top_k, router)
    d = layer.w_in.shape[-1]
    for n in (1, 3, GATHER_MAX_TOKENS):
        assert_kernel_equals_torch_path(layer, torch.randn(n, d))


def assert_kernel_equals_torch_path(layer, x):
    with torch.no_grad():
        layer.kernels = "torch"
        want = layer(x)
        layer.kernels = "cpu"
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_thresholded_layer_on_the_kernel_equals_the_torch_path():
    for activation, gated, bias in (("silu", True, False), ("gelu", False, True), ("drelu", True, True)):
        config = ModelConfig.from_preset("llama-tiny", activation=activation, gated=gated, bias=bias, threshold_sparsity=0.4)
        torch.manual_seed(0)
        layer = ThresholdFeedForward(config)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.1)
        layer.threshold_in.fill_(0.5)
        layer.threshold_hidden.fill_(0.02)
        for n in (1, 4, GATHER_MAX_TOKENS + 3):  # the last: the masked dense path on either setting
            assert_kernel_equals_torch_path(layer, torch.randn(n, config.d_model))


def test_training_keeps_the_torch_path():
    layer = _moe_layer("relu", False, True, 8, 2, "mlp").train()
    layer.kernels = "cpu"
    x = torch.randn(2, layer.w_in.shape[-1], requires_grad=True)
    layer(x).sum().backward()  # the kernel has no backward: autograd runs the torch path
    assert x.grad is not None and layer.w_in.grad is not None


def test_auto_picks_the_cpu_kernels_and_set_kernels_reaches_thresholded_layers():
    assert resolve_kernels("auto", "cpu") == "cpu"
    assert resolve_kernels("torch", "cpu") == "torch"
    config = ModelConfig.from_preset("llama-tiny", threshold_sparsity=0.4)
    from cpmctl.model import build_model

    model = build_model(config)
    assert set_kernels(model, "cpu") == config.n_layers
    assert all(f.kernels == "cpu" for _, _, f in model.ffn_modules())


def test_a_machine_that_cannot_build_falls_back_with_a_note(monkeypatch):
    layer = _moe_layer("relu", False, True, 8, 2, "mlp")
    x = torch.randn(1, layer.w_in.shape[-1])
    with torch.no_grad():
        want = layer(x)
    monkeypatch.setattr(ffn_module, "_cpu_ops", None)
    monkeypatch.setattr(ffn_module, "_cpu_problem", None)

    def no_build():
        raise cpmctl_cpu.CpuKernelBuildError("no C++ compiler (c++) on PATH")

    monkeypatch.setattr(sf, "ops", no_build)
    layer.kernels = "cpu"
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = layer(x)
        layer(x)  # the note is given once
    assert torch.equal(got, want)
    notes = [str(w.message) for w in caught if "torch path" in str(w.message)]
    assert notes == ["note: the sparse FFNs run on the torch path: no C++ compiler (c++) on PATH"]
    monkeypatch.setattr(cpmctl_cpu, "build_problem", lambda: "ninja is not installed")
    with pytest.warns(UserWarning, match="ninja is not installed"):
        assert resolve_kernels("auto", "cpu") == "torch"


def test_bad_operands_from_a_layer_become_a_user_error():
    from cpmctl.moe import cpu_moe_ffn

    w = _experts(4, 8, 16, False, False)
    with pytest.raises(UserError, match="expert ids must be in"):
        cpu_moe_ffn(torch.randn(1, 16), torch.tensor([[5]]), None, w["w_in"], None, w["w_out"], None, None, None, "relu")


def test_two_threads_split_the_work_and_agree():
    """Wide enough for two column blocks and several row blocks per expert: the threaded split."""
    w = _experts(6, 40, 600, True, True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 600, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(3)])
    weights = torch.rand(3, 3, generator=g)
    rows = (torch.randn(600, 700, generator=g) * 0.04, torch.randn(600, 700, generator=g) * 0.04, torch.randn(700, 600, generator=g) * 0.04)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = _call(sf.moe_ffn, x, ids, weights, w, "silu")
        got_t = sf.threshold_ffn(x, *rows, None, None, None, 0.3, 0.01, "silu")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, _call(sf.moe_ffn_reference, x, ids, weights, w, "silu"), atol=1e-5, rtol=1e-5)
    want_t = sf.threshold_ffn_reference(x, *rows, None, None, None, 0.3, 0.01, "silu")
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-5)


def test_layers_the_kernel_does_not_take_keep_the_torch_path():
    layer = _moe_layer("silu", True, False, 8, 2, "linear")
    x = torch.randn(1, layer.w_in.shape[-1])
    with torch.no_grad():
        # non-contiguous expert weights (the same values): the torch path, no error
        layer.w_in = torch.nn.Parameter(layer.w_in.detach().transpose(1, 2).contiguous().transpose(1, 2))
        want = layer(x)
        layer.kernels = "cpu"
        assert torch.equal(layer(x), want)
        layer.double()  # float64: the torch path
        assert layer(x.double()).dtype == torch.float64
