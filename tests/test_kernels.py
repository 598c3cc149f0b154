"""cpmctl_kernels against their torch references: routing, moe_align, grouped and decode FFN.

Without a GPU these run on CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernels); with one they run on CUDA. Shapes are
small and odd on purpose: d = 40 and d_e = 24 are not multiples of the 32-wide blocks.
"""

from __future__ import annotations

import pytest
import torch

import cpmctl_kernels as K
from cpmctl_kernels import _common
from cpmctl_kernels.reference import moe_align_reference, moe_ffn_reference, route_reference

if not K.INTERPRETER and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU) or a CUDA device", allow_module_level=True)

DEVICE = "cpu" if K.INTERPRETER else "cuda"
pytestmark = pytest.mark.kernels  # `make gpu-check` runs these on CUDA (pytest -m "gpu or kernels")
D, DE, E = 40, 24, 5
TOKENS = (1, 3, 17, 129)
# (activation, gated, bias, k): relu with biases, gelu_tanh, gated gelu with biases, SwiGLU
FFNS = [("relu", False, True, 1), ("gelu_tanh", False, False, 2), ("gelu", True, True, 2), ("silu", True, False, 2)]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def weights(e=E, de=DE, d=D, gated=True, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    return dict(
        w_in=rnd(e, de, d, scale=d**-0.5), w_gate=rnd(e, de, d, scale=d**-0.5) if gated else None,
        w_out=rnd(e, de, d, scale=de**-0.5), b_in=rnd(e, de, scale=0.5) if bias else None,
        b_gate=rnd(e, de, scale=0.5) if (bias and gated) else None, b_out=rnd(d, scale=0.5) if bias else None,
    )


def routing(n, k, e=E, experts=None, dtype=torch.float32, seed=1):
    """Distinct experts per token drawn from `experts` (default: all), weights in (0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(e) if experts is None else torch.tensor(experts)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(n)])
    return ids.to(DEVICE), (torch.rand(n, k, generator=g) + 0.5).to(dtype).to(DEVICE)


def tokens(n, d=D, dtype=torch.float32, seed=2):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def assert_close_relative(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.float().abs().max().clamp(min=1e-6)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= tol, f"max error {err:.3e} (relative to max |want| {scale:.3e}) above {tol}"


# -- routing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("k,softmax", [(1, "topk"), (2, "topk"), (2, "all"), (E, "topk")])
def test_route_matches_topk_softmax(n, k, softmax):
    logits = torch.randn(n, E, generator=torch.Generator().manual_seed(n)).to(DEVICE)
    ids, w = K.route(logits, k, softmax)
    want_ids, want_w = route_reference(logits, k, softmax)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-6)
    if softmax == "topk":
        torch.testing.assert_close(w.sum(-1), torch.ones(n, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_route_half_precision_logits(dtype):
    logits = torch.randn(17, 11, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)
    ids, w = K.route(logits, 3)
    want_ids, want_w = route_reference(logits, 3)
    assert torch.equal(ids, want_ids) and w.dtype == dtype
    torch.testing.assert_close(w.float(), want_w.float(), atol=1e-2, rtol=1e-2)


def test_route_strided_logits_and_all_softmax_weights():
    logits = torch.randn(9, 14, generator=torch.Generator().manual_seed(3)).to(DEVICE)[:, ::2]  # stride 2
    ids, w = K.route(logits, 2, softmax="all")
    probs = torch.softmax(logits, -1)
    assert torch.equal(ids, probs.topk(2, -1).indices)
    torch.testing.assert_close(w, probs.gather(-1, ids))


# -- moe_align ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("k,block", [(1, 16), (2, 32)])
def test_moe_align_matches_stable_sort(n, k, block):
    e = 7
    ids, _ = routing(n, k, e=e, experts=[0, 2, 3, 6])  # experts 1, 4, 5 receive no token
    got = K.moe_align(ids, e, block)
    want = moe_align_reference(ids, e, block)
    for name in ("sorted_ids", "block_expert_ids", "num_padded", "expert_counts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # invariants, independent of the reference: every entry once, in its expert's blocks
    used = int(got.num_padded)
    assert used % block == 0 and int(got.expert_counts.sum()) == n * k
    sorted_ids = got.sorted_ids[:used].long()
    real = sorted_ids[sorted_ids < n * k]
    assert torch.equal(real.sort().values, torch.arange(n * k, device=DEVICE))
    block_of = torch.arange(used, device=DEVICE) // block
    owner = got.block_expert_ids.long()[block_of][sorted_ids < n * k]
    assert torch.equal(owner, ids.reshape(-1)[real])
    assert bool((got.sorted_ids[used:] == n * k).all()) and bool((got.block_expert_ids[used // block:] == -1).all())


def test_moe_align_int32_ids_and_one_expert():
    ids = torch.zeros(5, 1, dtype=torch.int32, device=DEVICE)
    got = K.moe_align(ids, 1, 16)
    assert got.sorted_ids[:5].tolist() == [0, 1, 2, 3, 4] and int(got.num_padded) == 16
    assert got.block_expert_ids.tolist() == [0]


# -- FFN kernels ----------------------------------------------------------------------------------
def run_ffn(fn, n, activation, gated, bias, k, dtype, experts=None, e=E, **extra):
    w = weights(e=e, gated=gated, bias=bias, dtype=dtype)
    ids, rw = routing(n, k, e=e, experts=experts, dtype=dtype)
    x = tokens(n, dtype=dtype)
    got = fn(x, ids, rw, activation=activation, **w, **extra)
    want = moe_ffn_reference(x, ids, rw, activation=activation, **w)
    assert_close_relative(got, want, TOLERANCE[dtype])
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation,gated,bias,k", FFNS)
@pytest.mark.parametrize("n", TOKENS)
def test_grouped_ffn_matches_reference(n, activation, gated, bias, k, dtype):
    run_ffn(K.grouped_moe_ffn, n, activation, gated, bias, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation,gated,bias,k", FFNS)
@pytest.mark.parametrize("n", (1, 3))
def test_decode_ffn_matches_reference(n, activation, gated, bias, k, dtype):
    run_ffn(K.decode_moe_ffn, n, activation, gated, bias, k, dtype)


@pytest.mark.parametrize("n,ffn", [(17, FFNS[2]), (17, FFNS[3]), (129, FFNS[0])])
def test_decode_ffn_many_tokens(n, ffn):
    # the decode kernel is meant for <= 8 tokens but must stay correct beyond (interpreter: slow)
    run_ffn(K.decode_moe_ffn, n, *ffn, torch.float32)


@pytest.mark.parametrize("split", [2, 3])
def test_decode_split_rows_add_atomically(split):
    run_ffn(K.decode_moe_ffn, 2, "gelu", True, True, 2, torch.float32, split=split)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_deterministic_combine(dtype):
    """k > 1 through the ordered per-entry reduction instead of the atomic accumulator."""
    first = run_ffn(K.grouped_moe_ffn, 17, "gelu", True, True, 3, dtype, deterministic=True)
    again = run_ffn(K.grouped_moe_ffn, 17, "gelu", True, True, 3, dtype, deterministic=True)
    assert torch.equal(first, again)


@pytest.mark.parametrize("fn", [K.grouped_moe_ffn, K.decode_moe_ffn])
@pytest.mark.parametrize("n", (3, 17))
def test_all_experts_selected(fn, n):
    run_ffn(fn, n, "silu", True, True, E, torch.float32)


@pytest.mark.parametrize("fn", [K.grouped_moe_ffn, K.decode_moe_ffn])
def test_experts_without_tokens(fn):
    # 9 experts, only 2 of them used: 7 experts get no row and must not disturb the output
    run_ffn(fn, 5, "relu", False, True, 1, torch.float32, experts=[3, 7], e=9)


@pytest.mark.parametrize("n", [8, 9])
def test_moe_ffn_dispatch_both_sides_of_decode_limit(n, monkeypatch):
    called = []
    for name in ("decode_ffn_forward", "grouped_ffn_forward"):
        real = getattr(K.ops, name)
        monkeypatch.setattr(K.ops, name, lambda *a, _real=real, _name=name: called.append(_name) or _real(*a))
    run_ffn(K.moe_ffn, n, "gelu_tanh", True, False, 2, torch.float16)
    assert called == ["decode_ffn_forward" if n <= K.DECODE_MAX_TOKENS else "grouped_ffn_forward"]


def test_strided_inputs():
    """Views (transposed storage, column slices) are read through their strides, not copied."""
    w = weights(gated=True, bias=True)
    w_in_t = w["w_in"].transpose(1, 2).contiguous().transpose(1, 2)  # [E, d_e, d] with d_e stride 1
    x_wide = tokens(17, d=2 * D)
    x = x_wide[:, ::2]
    ids, rw = routing(17, 2)
    ids_t = ids.t().contiguous().t()
    want = moe_ffn_reference(x, ids, rw, activation="gelu", **w)
    w["w_in"] = w_in_t
    for fn in (K.grouped_moe_ffn, K.decode_moe_ffn):
        assert_close_relative(fn(x, ids_t, rw, activation="gelu", **w), want, 1e-4)


def test_grouped_reuses_alignment():
    w = weights(gated=False, bias=False)
    ids, rw = routing(17, 2)
    x = tokens(17)
    alignment = K.moe_align(ids, E, 32)
    got = K.grouped_moe_ffn(x, ids, rw, activation="relu", alignment=alignment, **w)
    assert_close_relative(got, moe_ffn_reference(x, ids, rw, activation="relu", **w), 1e-4)


@pytest.mark.parametrize("n", [3, 17])
@pytest.mark.parametrize("activation,gated,bias", [("silu", True, False), ("gelu", False, True)])
def test_moe_layer_triton_equals_torch_path(n, activation, gated, bias):
    """cpmctl.moe.MoEFeedForward with kernels='triton' against its own torch path."""
    from cpmctl.config import ModelConfig, MoEConfig
    from cpmctl.moe import MoEFeedForward, moe_ffn_reference as torch_path

    config = ModelConfig.from_preset("llama-tiny").replace(
        d_model=D, activation=activation, gated=gated, bias=bias, moe=MoEConfig(experts=E, expert_size=DE, top_k=2))
    torch.manual_seed(0)
    layer = MoEFeedForward(config)
    layer.reset_expert_parameters(std=0.2)
    with torch.no_grad():
        for p in (layer.b_in, layer.b_gate, layer.b_out):
            if p is not None:
                p.normal_(std=0.5)
    layer = layer.to(DEVICE)
    x = tokens(n).view(1, n, D)
    with torch.no_grad():
        want = layer(x)
        layer.kernels = "triton"
        got = layer(x)
        # the package reference agrees with the layer's torch path on the same routing
        flat = x.view(n, D)
        ids, rw = layer.route(flat)
        w = dict(w_in=layer.w_in, w_gate=layer.w_gate, w_out=layer.w_out, b_in=layer.b_in, b_gate=layer.b_gate, b_out=layer.b_out)
        torch.testing.assert_close(moe_ffn_reference(flat, ids, rw, activation=activation, **w),
                                   torch_path(flat, ids, rw, activation=activation, **w), atol=1e-5, rtol=1e-5)
    assert got.shape == want.shape
    assert_close_relative(got, want, 1e-4)


# -- launcher validation --------------------------------------------------------------------------
def _good_args(n=3):
    w = weights(gated=True, bias=True)
    ids, rw = routing(n, 2)
    return dict(x=tokens(n), expert_ids=ids, expert_weights=rw, activation="silu", **w)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(3, D + 1)), "w_in has d_model"),
    (dict(x=torch.zeros(3, 2, D)), "x must be 2-D"),
    (dict(expert_ids=torch.zeros(4, 2, dtype=torch.int64)), "expert_ids must have shape [3, k]"),
    (dict(expert_ids=torch.zeros(3, 2)), "expert_ids must be int64 or int32"),
    (dict(expert_ids=torch.full((3, 2), E, dtype=torch.int64)), "expert_ids must lie in 0..4"),
    (dict(expert_weights=torch.ones(3, 1)), "expert_weights must have shape [3, 2]"),
    (dict(w_out=torch.zeros(E, DE + 1, D)), "w_out must have shape [5, 24, 40]"),
    (dict(w_gate=torch.zeros(E, DE, D, dtype=torch.float16)), "w_gate is torch.float16 but x is torch.float32"),
    (dict(x=torch.zeros(3, D, dtype=torch.float64)), "x must be float32, float16 or bfloat16"),
    (dict(b_out=torch.zeros(D + 2)), "b_out must have shape [40]"),
    (dict(w_gate=None), "b_gate given without w_gate"),
    (dict(activation="swish"), "unknown activation 'swish'"),
    (dict(w_in=torch.zeros(E, DE, D, device="meta")), "w_in is on meta but x is on"),
])
@pytest.mark.parametrize("fn", [K.moe_ffn, K.grouped_moe_ffn, K.decode_moe_ffn])
def test_launchers_reject_bad_inputs(fn, change, message):
    args = _good_args()
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for k, v in change.items()})
    with pytest.raises(ValueError, match="^" + fn.__name__ if fn is not K.moe_ffn else "moe_ffn") as info:
        fn(**args)
    assert message in str(info.value)
    assert isinstance(info.value, K.KernelInputError)


def test_launchers_are_forward_only():
    args = _good_args()
    args["w_in"] = args["w_in"].clone().requires_grad_()
    with pytest.raises(K.KernelInputError, match="forward-only but w_in require"):
        K.moe_ffn(**args)
    with torch.no_grad():
        K.moe_ffn(**args)


def test_route_and_align_reject_bad_inputs():
    logits = torch.randn(4, E, device=DEVICE)
    with pytest.raises(K.KernelInputError, match=r"k must be an int in 1\.\.5"):
        K.route(logits, 6)
    with pytest.raises(K.KernelInputError, match="softmax must be 'topk' or 'all'"):
        K.route(logits, 2, softmax="sparse")
    with pytest.raises(K.KernelInputError, match="2-D tensor"):
        K.route(logits[0], 1)
    ids = torch.zeros(4, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(K.KernelInputError, match="block_size must be a power of two >= 16"):
        K.moe_align(ids, E, 24)
    with pytest.raises(K.KernelInputError, match="expert_ids must be int32 or int64"):
        K.moe_align(ids.float(), E, 16)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRETER", False)
    with pytest.raises(K.KernelInputError, match="TRITON_INTERPRET=1"):
        K.route(torch.randn(2, 3), 1)


# -- GPU only -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 64, 1000])
def test_cuda_cpm2_sized_layer(n, dtype):
    """CPM-2-like sizes on a GPU (autotuned configs, TF32-free fp32 path not involved)."""
    if K.INTERPRETER:
        pytest.skip("TRITON_INTERPRET=1 is set: kernels run on CPU only")
    e, de, d, k = 64, 160, 1024, 4
    g = torch.Generator().manual_seed(0)
    w = {name: (torch.randn(*s, generator=g) * sc).to(dtype).cuda() for name, s, sc in [
        ("w_in", (e, de, d), d**-0.5), ("w_gate", (e, de, d), d**-0.5), ("w_out", (e, de, d), de**-0.5)]}
    logits = torch.randn(n, e, generator=g).cuda()
    ids, rw = K.route(logits, k)
    x = torch.randn(n, d, generator=g).to(dtype).cuda()
    want = moe_ffn_reference(x, ids, rw.to(dtype), activation="silu", **w)
    for fn in (K.moe_ffn, K.grouped_moe_ffn):
        assert_close_relative(fn(x, ids, rw.to(dtype), activation="silu", **w), want, 2e-2)


# -- GPU compilation without a GPU ----------------------------------------------------------------
def _compile_check(*flags):
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "cpmctl_kernels.compile_check", *flags], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and "\n0 failures" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def test_kernels_compile_for_h100_quick():
    """The interpreter accepts what a GPU rejects: lower representative variants to sm_90 cubins."""
    out = _compile_check("--quick")
    from cpmctl_kernels.compile_check import QUICK

    assert out.count("ok    ") == len(QUICK)


@pytest.mark.slow
def test_kernels_compile_for_h100_all_variants():
    _compile_check()
