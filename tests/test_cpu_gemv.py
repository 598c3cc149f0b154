"""cpmctl's C++ GEMV (kernels/cpmctl_cpu/gemv.cpp, issue 26): each op against its torch reference
(dequantize, then matmul in fp32) on odd shapes, 1-4 rows (and more, in passes), non-contiguous
inputs; every bad operand is a one-line CpuKernelInputError; QuantizedLinear's fast path equals
its torch path, and the compiled decoder stays token-identical to eager with the op in its graph."""

from __future__ import annotations

import pytest
import torch

from cpmctl_cpu import CpuKernelBuildError, CpuKernelInputError, build_problem

if build_problem() is not None:
    pytest.skip(f"the CPU kernels cannot be built here: {build_problem()}", allow_module_level=True)

from cpmctl_cpu import gemv  # noqa: E402

try:
    gemv.ops()
except CpuKernelBuildError as exc:  # pragma: no cover - a compiler that fails on this source
    pytest.fail(str(exc))

OUTS = [1, 3, 1000]
INS = [7, 16, 33, 100, 768]


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    """Within `rel` of the largest reference magnitude (the sums run in another order)."""
    return bool((got - want).abs().max() <= rel * max(1.0, float(want.abs().max())))


def int8_operands(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=g)
    s = (torch.rand(out_f, 1, generator=g) * 0.02 + 0.001).bfloat16()
    return q, s


def int4_operands(out_f, in_f, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, generator=g)
    s = (torch.rand(out_f, in_f // group, generator=g) * 0.02 + 0.001).bfloat16()
    z = (torch.randn(out_f, in_f // group, generator=g) * 0.01).bfloat16()
    return q, s, z


@pytest.mark.parametrize("out_f", OUTS)
@pytest.mark.parametrize("in_f", INS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])
def test_int8_linear_equals_the_dequantized_product(out_f, in_f, rows):
    q, s = int8_operands(out_f, in_f)
    x = torch.randn(rows, in_f)
    bias = torch.randn(out_f)
    assert close(gemv.int8_linear(x, q, s), gemv.int8_linear_reference(x, q, s))
    assert close(gemv.int8_linear(x, q, s, bias), gemv.int8_linear_reference(x, q, s, bias))


@pytest.mark.parametrize("out_f", OUTS)
@pytest.mark.parametrize("in_f", INS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6])
def test_bf16_linear_equals_the_fp32_product(out_f, in_f, rows):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_f, in_f, generator=g).bfloat16()
    x = torch.randn(rows, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    assert close(gemv.bf16_linear(x, w, bias), gemv.bf16_linear_reference(x, w, bias))


@pytest.mark.parametrize("out_f", OUTS)
@pytest.mark.parametrize("in_f,group", [(32, 32), (64, 32), (192, 64), (256, 128), (768, 256), (768, 64)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
def test_int4_linear_equals_the_dequantized_product(out_f, in_f, group, rows):
    q, s, z = int4_operands(out_f, in_f, group)
    x = torch.randn(rows, in_f)
    bias = torch.randn(out_f)
    assert close(gemv.int4_linear(x, q, s, z, group, bias), gemv.int4_linear_reference(x, q, s, z, group, bias))


def test_inputs_of_any_layout_and_float_dtype():
    q, s = int8_operands(40, 96)
    base = torch.randn(3, 2, 200)
    x = base[:, :, 10:106]  # non-contiguous rows, unit stride inside
    assert close(gemv.int8_linear(x, q, s), gemv.int8_linear_reference(x, q, s))
    xt = torch.randn(96, 3).T  # stride 3 along the input: copied once
    assert close(gemv.int8_linear(xt, q, s), gemv.int8_linear_reference(xt, q, s))
    w = torch.randn(80, 40).bfloat16().T  # a transposed weight view [40, 80] is made contiguous
    assert close(gemv.bf16_linear(x[..., :80], w), gemv.bf16_linear_reference(x[..., :80], w))
    xb = torch.randn(2, 96).bfloat16()  # bf16 activations: computed in fp32, returned in bf16
    got = gemv.int8_linear(xb, q, s)
    assert got.dtype == torch.bfloat16 and close(got.float(), gemv.int8_linear_reference(xb.float(), q, s), 1e-2)
    assert gemv.int8_linear(torch.randn(0, 96), q, s).shape == (0, 40)


def test_threads_split_the_rows_without_changing_the_result():
    q, s = int8_operands(3000, 768)
    x = torch.randn(1, 768)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.int8_linear(x, q, s)
        torch.set_num_threads(2)
        two = gemv.int8_linear(x, q, s)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each row is summed by one thread, in one order


def _bad_int8_cases():
    q, s = int8_operands(8, 32)
    x = torch.randn(2, 32)
    return [
        (lambda: gemv.int8_linear(x, q.float(), s), "qweight must be int8"),
        (lambda: gemv.int8_linear(x, q[None], s), "qweight must be 2-D"),
        (lambda: gemv.int8_linear(torch.randn(2, 31), q, s), "x must be [..., 32]"),
        (lambda: gemv.int8_linear(x.long(), q, s), "x must be a float tensor"),
        (lambda: gemv.int8_linear(x, q, s.float()), "scales must be bfloat16"),
        (lambda: gemv.int8_linear(x, q, s[:4]), "scales must be [8, 1]"),
        (lambda: gemv.int8_linear(x, q, s, torch.randn(7)), "bias must be a float [8]"),
        (lambda: gemv.int8_linear(x, q, s, torch.ones(8, dtype=torch.int32)), "bias must be a float [8]"),
        (lambda: gemv.int8_linear(x.to("meta"), q, s), "x is on meta"),
        (lambda: gemv.int8_linear(x.numpy(), q, s), "x must be a tensor"),
        (lambda: gemv.bf16_linear(x, torch.randn(8, 32)), "weight must be bfloat16"),
        (lambda: gemv.int4_linear(x, q.view(torch.uint8)[:, :16], s, s, 24), "group_size must be a positive multiple of 32"),
        (lambda: gemv.int4_linear(torch.randn(2, 48), q.view(torch.uint8)[:, :16], s, s, 32), "x must be [..., 32]"),
        (lambda: gemv.int4_linear(torch.randn(2, 64), torch.zeros(8, 32, dtype=torch.uint8), s, torch.zeros(8, 2).bfloat16(), 32),
         "scales must be [8, 2]"),
        (lambda: gemv.int4_linear(torch.randn(2, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(8, 2).bfloat16(),
                                  torch.zeros(8, 2), 32), "zeros must be bfloat16"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_int8_cases())))
def test_bad_operands_are_one_line_input_errors(case):
    call, message = _bad_int8_cases()[case]
    with pytest.raises(CpuKernelInputError) as raised:
        call()
    text = str(raised.value)
    assert message in text and "\n" not in text


def test_fake_impls_give_the_shapes_under_compile():
    q, s = int8_operands(24, 64)
    qs, ss, zs = int4_operands(24, 64, 32)
    w = torch.randn(24, 64).bfloat16()

    def f(x):
        return gemv.int8_linear(x, q, s) + gemv.int4_linear(x, qs, ss, zs, 32) + gemv.bf16_linear(x, w)

    x = torch.randn(2, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert close(compiled(x), f(x))


# -- QuantizedLinear's fast path ---------------------------------------------------------------------------
pytest.importorskip("torchao")
from cpmctl.quant import CPU_GEMV_MAX_ROWS, QuantizedLinear, set_cpu_gemv  # noqa: E402
from cpmctl.quantize import quantize_rows  # noqa: E402


def quantized_linear_module(scheme, group, in_f=256, out_f=96):
    torch.manual_seed(3)
    linear = torch.nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        linear.bias.normal_()
    module = QuantizedLinear.like(linear, scheme, group)
    module.load_state_dict({**quantize_rows(linear.weight.detach(), scheme, group), "bias": linear.bias.detach()}, assign=True)
    return module


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 2, CPU_GEMV_MAX_ROWS, CPU_GEMV_MAX_ROWS + 1])
def test_quantized_linear_fast_path_equals_the_dequantized_layer(scheme, group, rows):
    module = quantized_linear_module(scheme, group)
    assert module.cpu_gemv == (scheme == "int8")  # turned on at load for int8 (int4 keeps torch's faster kernel)
    module.cpu_gemv = True
    x = torch.randn(rows, 256)
    reference = torch.nn.functional.linear(x, module.dequantized_weight(), module.bias)
    got = module(x)
    if rows <= CPU_GEMV_MAX_ROWS:  # the C++ GEMV: the fp32 product
        assert close(got, reference)
    module.cpu_gemv = False  # torch's kernels (bf16 activations): within bf16 rounding of it
    plain = module(x)
    assert (got - plain).abs().max() <= 2**-7 * reference.abs().max()


def test_set_cpu_gemv_modes(monkeypatch):
    from cpmctl.errors import UserError

    model = torch.nn.Sequential(quantized_linear_module("int8", None))
    assert set_cpu_gemv(model, "off") is None and not model[0].cpu_gemv
    assert set_cpu_gemv(model, "auto") is None and model[0].cpu_gemv
    monkeypatch.setattr("cpmctl.quant._gemv_state", {"problem": "no C++ compiler (c++) on PATH"})
    note = set_cpu_gemv(model, "auto")
    assert "no C++ compiler" in note and not model[0].cpu_gemv
    with pytest.raises(UserError) as raised:
        set_cpu_gemv(model, "on")
    assert "no C++ compiler" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(UserError):
        set_cpu_gemv(model, "fast")


def dense_config(**overrides):
    from cpmctl.config import ModelConfig

    fields = dict(arch="decoder", vocab_size=96, d_model=64, n_heads=4, d_ff=128, n_layers=2, position="rotary",
                  activation="silu", gated=True, eos_token_id=None, init_std=0.1)
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize("rows", [1, 3, CPU_GEMV_MAX_ROWS + 2])
def test_bf16_linear_layers_run_the_gemv_and_equal_f_linear(rows):
    from cpmctl.quant import CpuGemvLinear

    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(200, 70), torch.nn.Linear(70, 30, bias=False)).bfloat16()
    x = torch.randn(rows, 200).bfloat16()
    plain = model(x)
    assert set_cpu_gemv(model, "auto") is None and all(type(m) is CpuGemvLinear for m in model)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight"]  # the same parameters
    got = model(x)
    hidden = gemv.bf16_linear_reference(x.float(), model[0].weight, model[0].bias).bfloat16()
    assert close(model[0](x).float(), hidden.float(), 2**-7)
    assert (got.float() - plain.float()).abs().max() <= 2**-6 * plain.float().abs().max()
    set_cpu_gemv(model, "off")
    assert all(type(m) is torch.nn.Linear for m in model) and torch.equal(model(x), plain)
    fp32 = torch.nn.Sequential(torch.nn.Linear(8, 8))
    set_cpu_gemv(fp32, "auto")
    assert type(fp32[0]) is torch.nn.Linear  # fp32 layers keep F.linear


def test_quantize_output_quantizes_an_untied_projection_only():
    from cpmctl.model import build_model
    from cpmctl.quantize import quantize_output

    torch.manual_seed(0)
    model = build_model(dense_config()).eval()
    weight = model.lm_head.proj.weight.detach().clone()
    assert quantize_output(model, "int8", None)
    head = model.lm_head.proj
    assert isinstance(head, QuantizedLinear) and head.cpu_gemv
    assert (head.dequantized_weight() - weight).abs().max() <= weight.abs().max(dim=1).values.max() / 127
    assert not quantize_output(model, "int8", None)  # already done
    tied = build_model(dense_config(tie_embeddings=True)).eval()
    assert not quantize_output(tied, "int8", None)


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_decoding_with_the_gemv_in_the_graph_equals_eager():
    """bf16 layers (CpuGemvLinear) and an int8 output projection: the compiled steps call the same
    C++ ops as eager, so greedy tokens are identical."""
    from cpmctl.compiled import CompiledDecoder
    from cpmctl.generate import generate
    from cpmctl.model import build_model
    from cpmctl.quantize import quantize_linears, quantize_output

    for dtype, scheme in ((torch.bfloat16, None), (torch.float32, "int8")):
        torch.manual_seed(0)
        model = build_model(dense_config(n_layers=1)).eval().to(dtype)
        if scheme:
            quantize_linears(model, scheme, None)
            quantize_output(model, scheme, None)
        set_cpu_gemv(model, "on")
        compiled = CompiledDecoder(model, autotune=False)
        ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
        expected, _ = generate(model, ids, max_new_tokens=6)
        got, _ = generate(model, ids, max_new_tokens=6, compiled=compiled)
        assert torch.equal(expected, got)
