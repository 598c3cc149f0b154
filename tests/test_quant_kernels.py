"""The int8/int4 variants of the decode and grouped MoE kernels against dequantize-then-matmul.

Weights are random quantized tensors in cpmctl.quant's stored layout (every code, scale and
zero random), activations fp32; shapes are odd on purpose (d = 40, d_e = 24: not multiples of
the 32-wide blocks; group 8 puts several groups in one tile). Without a GPU the kernels run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

import cpmctl_kernels as K
from cpmctl_kernels.reference import dequantize_reference, quantized_moe_ffn_reference

if not K.INTERPRETER and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU) or a CUDA device", allow_module_level=True)

DEVICE = "cpu" if K.INTERPRETER else "cuda"
pytestmark = pytest.mark.kernels
D, DE, E, GROUP = 40, 24, 5, 8


def quantized(e, out_f, in_f, scheme, seed, group=GROUP) -> K.QuantizedWeights:
    """Random codes with scales about 1/(8 sqrt(in)) (weights of about the usual size)."""
    g = torch.Generator().manual_seed(seed)
    if scheme == "int8":
        q = torch.randint(-127, 128, (e, out_f, in_f), generator=g, dtype=torch.int8)
        s = (torch.rand(e, out_f, 1, generator=g) + 0.5) / (127 * in_f**0.5)
        return K.QuantizedWeights(q.to(DEVICE), s.to(torch.bfloat16).to(DEVICE))
    q = torch.randint(0, 256, (e, out_f, in_f // 2), generator=g, dtype=torch.uint8)
    s = (torch.rand(e, out_f, in_f // group, generator=g) + 0.5) / (8 * in_f**0.5)
    z = (torch.rand(e, out_f, in_f // group, generator=g) - 0.5) / (4 * in_f**0.5)
    return K.QuantizedWeights(q.to(DEVICE), s.to(torch.bfloat16).to(DEVICE), z.to(torch.bfloat16).to(DEVICE), group)


def experts(scheme, gated=True, bias=True, e=E, group=GROUP):
    g = torch.Generator().manual_seed(7)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.3).to(DEVICE)  # noqa: E731
    return dict(
        w_in=quantized(e, DE, D, scheme, 1, group), w_gate=quantized(e, DE, D, scheme, 2, group) if gated else None,
        w_out=quantized(e, D, DE, scheme, 3, group),  # the down projection's linear form [E, d, d_e]
        b_in=rnd(e, DE) if bias else None, b_gate=rnd(e, DE) if (bias and gated) else None, b_out=rnd(D) if bias else None,
    )


def routing(n, k, e=E, pool=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(e) if pool is None else torch.tensor(pool)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(n)])
    return ids.to(DEVICE), (torch.rand(n, k, generator=g) + 0.5).to(DEVICE)


def check_against_reference(fn, n, scheme, activation, gated, bias, k, e=E, pool=None, group=GROUP, **extra):
    w = experts(scheme, gated, bias, e, group)
    ids, rw = routing(n, k, e, pool)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = fn(x, ids, rw, activation=activation, **w, **extra)
    want = quantized_moe_ffn_reference(x, ids, rw, activation=activation, **w)
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got - want).abs().max() / want.abs().max()
    assert err <= 1e-5, f"max error {err:.2e} relative to max |want|"
    return got


FFNS = [("relu", False, True, 1), ("gelu", True, True, 2), ("silu", True, False, 2)]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("activation,gated,bias,k", FFNS)
@pytest.mark.parametrize("n", [1, 3])
def test_quantized_decode_kernel(n, scheme, activation, gated, bias, k):
    check_against_reference(K.decode_moe_ffn, n, scheme, activation, gated, bias, k)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("activation,gated,bias,k", FFNS)
@pytest.mark.parametrize("n", [3, 17])
def test_quantized_grouped_kernel(n, scheme, activation, gated, bias, k):
    check_against_reference(K.grouped_moe_ffn, n, scheme, activation, gated, bias, k)


def test_quantized_decode_split_and_deterministic_grouped_combine():
    check_against_reference(K.decode_moe_ffn, 2, "int4", "gelu", True, True, 2, split=3)
    first = check_against_reference(K.grouped_moe_ffn, 17, "int8", "silu", True, True, 3, deterministic=True)
    assert torch.equal(first, check_against_reference(K.grouped_moe_ffn, 17, "int8", "silu", True, True, 3, deterministic=True))


@pytest.mark.parametrize("fn", [K.decode_moe_ffn, K.grouped_moe_ffn])
def test_quantized_experts_without_tokens_and_one_group_per_row(fn):
    # 9 experts of which 2 are used; then groups of 4 (ten and six groups per row)
    check_against_reference(fn, 5, "int4", "relu", False, True, 1, e=9, pool=[3, 7])
    check_against_reference(fn, 5, "int4", "silu", True, False, 2, group=4)


def test_dequantize_reference_is_cpmctl_quant_format():
    from cpmctl.quant import QuantizedView, dequantize

    for scheme in ("int8", "int4"):
        w = quantized(3, DE, D, scheme, 5)
        view = QuantizedView(scheme, w.group_size, w.qweight, w.scales, w.zeros)
        assert torch.equal(dequantize_reference(w), dequantize(view))


@pytest.mark.parametrize("change,message", [
    (lambda w: w.update(w_out=w["w_in"]), "w_out.qweight"),
    (lambda w: w.update(w_gate=torch.zeros(E, DE, D, device=DEVICE)), "w_gate must be QuantizedWeights"),
    (lambda w: w.update(w_in=w["w_in"]._replace(group_size=3)), "group size 3"),
    (lambda w: w.update(w_in=w["w_in"]._replace(zeros=None)), "needs float zeros"),
    (lambda w: w.update(w_out=quantized(E, D, DE, "int8", 3)), "quantize all expert weights alike"),
])
def test_quantized_inputs_are_checked(change, message):
    w = experts("int4")
    change(w)
    ids, rw = routing(2, 2)
    with pytest.raises(K.KernelInputError, match=message):
        K.moe_ffn(torch.randn(2, D, device=DEVICE), ids, rw, activation="silu", **w)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_quantized_moe_layer_runs_the_kernels_on_its_stored_weights(scheme, group, monkeypatch):
    """A model's quantized MoE layer with kernels="triton" hands its buffers to the kernels as
    stored (no dequantize, no CPU fused matmul) and computes the dequantized layer."""
    import cpmctl.moe as moe_module
    from cpmctl.config import ModelConfig, QuantConfig
    from cpmctl.model import build_model

    config = ModelConfig(arch="decoder", vocab_size=96, d_model=64, n_heads=4, d_ff=128, n_layers=1, position="rotary",
                         activation="silu", gated=True, bias=True, eos_token_id=None,
                         moe=dict(experts=4, expert_size=32, top_k=2), quantization=QuantConfig(scheme, group))
    layer = next(m for m in build_model(config).modules() if isinstance(m, moe_module.MoEFeedForward)).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in (layer.w_in, layer.w_gate, layer.w_out):
            low, high = (-127, 128) if scheme == "int8" else (0, 256)
            w.qweight.copy_(torch.randint(low, high, w.qweight.shape, generator=g).to(w.qweight.dtype))
            w.scales.copy_((torch.rand(w.scales.shape, generator=g) + 0.5) / 100)
            if w.zeros is not None:
                w.zeros.copy_(torch.rand(w.zeros.shape, generator=g) / 100 - 0.005)
        for b in (layer.b_in, layer.b_gate, layer.b_out):
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    x = torch.randn(10, 64, generator=g).to(DEVICE)

    def stored(w):
        return K.QuantizedWeights(w.qweight, w.scales, w.zeros, group)

    monkeypatch.setattr(moe_module, "quantized_linear", lambda *a: pytest.fail("the dequantize/CPU matmul path ran"))
    layer.kernels = "triton"
    with torch.no_grad():
        for n in (1, 10):  # the decode (<= 8 tokens) and the grouped kernels
            got = layer(x[:n])
            ids, rw = layer.route(x[:n])
            want = quantized_moe_ffn_reference(x[:n], ids, rw, stored(layer.w_in), stored(layer.w_gate), stored(layer.w_out),
                                               layer.b_in, layer.b_gate, layer.b_out, "silu")
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
