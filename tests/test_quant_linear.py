"""Weight-only int8/int4 dense linear layers (issue 26 part 2): QuantizedLinear against the format's
dequantization, `quantize --linear` checkpoints against quantizing at load, dtypes kept at load, and
compiled quantized decoding against eager. CLI runs and their bad inputs: tests/test_quant_cli.py."""

from __future__ import annotations

import pytest
import torch

from cpmctl.checkpoint import load_model, open_checkpoint, save_model, verify_checkpoint
from cpmctl.config import ModelConfig, QuantConfig
from cpmctl.errors import UserError
from cpmctl.generate import generate
from cpmctl.model import build_model
from cpmctl.quant import QuantizedLinear, QuantizedView, dequantize, quantizable_linears

pytest.importorskip("torchao")
from cpmctl.quantize import quantize_checkpoint, quantize_linears, quantize_rows  # noqa: E402

SCHEMES = [("int8", None), ("int4", 32), ("int4", 64)]


def dense_config(**overrides) -> ModelConfig:
    fields = dict(arch="decoder", vocab_size=96, d_model=64, n_heads=4, d_ff=128, n_layers=2, position="rotary",
                  activation="silu", gated=True, eos_token_id=None, init_std=0.1)
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dense") / "src"
    save_model(build_model(dense_config(bias=True)), path)
    return path


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=1e-30)))
    return torch.pow(2.0, exponent - 7)


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_linear_is_the_dequantized_product_rounded_once(scheme, group, rows):
    """The fused CPU kernel takes bf16 activations, accumulates in fp32 and returns bf16: its output
    is the dequantize-then-matmul product (fp32, on the same bf16 inputs) rounded to bf16, up to
    the order of the fp32 sums: almost every element exactly, none off by more than one bf16 step."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        linear.weight.mul_(0.5)
        linear.bias.normal_()
    module = QuantizedLinear.like(linear, scheme, group)
    module.load_state_dict({**quantize_rows(linear.weight.detach(), scheme, group), "bias": linear.bias.detach()},
                           assign=True)
    if scheme == "int4":
        assert module.cpu_packed is not None and module.cpu_scales_zeros is not None  # prepared at load
    module.cpu_gemv = False  # torch's fused kernels (the C++ GEMV's own test: tests/test_cpu_gemv.py)
    x = torch.randn(2, rows, 256)
    got = module(x)
    assert got.shape == (2, rows, 96) and got.dtype == torch.float32
    exact = x.to(torch.bfloat16).double() @ module.dequantized_weight().double().T  # fp64: the exact product
    rounded = exact.to(torch.bfloat16).double() + linear.bias.double()
    diff = (got.double() - rounded).abs()
    assert bool((diff <= bf16_ulp(exact) * 1.0001 + 1e-6).all())
    assert float((diff <= 1e-6).double().mean()) >= 0.97
    # and the model-level reference: a float linear layer holding the dequantized weight
    reference = torch.nn.functional.linear(x, module.dequantized_weight(), linear.bias)
    assert (got - reference).abs().max() <= 2**-7 * reference.abs().max()


def test_quantizable_linears_are_attention_and_dense_ffn_only():
    model = build_model(dense_config(), device="meta")
    names = sorted(quantizable_linears(model))
    per_block = ["attn.o", "attn.qkv", "ffn.w_gate", "ffn.w_in", "ffn.w_out"]
    assert names == sorted(f"decoder.blocks.{i}.{n}" for i in range(2) for n in per_block)
    moe = build_model(dense_config(moe=dict(experts=4, expert_size=32, top_k=1)), device="meta")
    assert sorted(quantizable_linears(moe)) == sorted(f"decoder.blocks.{i}.attn.{n}" for i in range(2) for n in ("o", "qkv"))


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_linear_checkpoint_equals_quantizing_at_load_and_keeps_the_rest_exact(dense_ckpt, tmp_path, scheme, group):
    out = tmp_path / "q"
    summary = quantize_checkpoint(dense_ckpt, out, linear=scheme, group_size=group)
    with_output = scheme == "int8"  # int8 quantizes the untied output projection too (cpmctl.quantize.quantizes_output)
    assert summary["tensors_quantized"] == 10 + with_output and summary["weights"] == "linear"
    assert summary["weight_bytes_after"] < summary["weight_bytes_before"]
    verify_checkpoint(out)
    with open_checkpoint(out) as q, open_checkpoint(dense_ckpt) as src:
        assert q.config.quantization == QuantConfig(scheme, group, "linear", output=with_output)
        names = set(q.tensor_names())
        assert {"decoder.blocks.0.attn.qkv.qweight", "decoder.blocks.1.ffn.w_out.scales", "decoder.blocks.0.attn.qkv.bias"} <= names
        assert "decoder.blocks.0.attn.qkv.weight" not in names
        assert ("decoder.blocks.0.ffn.w_in.zeros" in names) == (scheme == "int4")
        for name in src.tensor_names():  # embeddings, norms, biases (int4: the output projection): as they were
            if name in names:
                assert torch.equal(q.get(name), src.get(name)), name
        kept = [n for n in src.tensor_names() if n in names]
        assert "embed.tokens.weight" in kept and ("lm_head.proj.weight" in kept) != with_output
        assert ("lm_head.proj.qweight" in names) == with_output
        # the stored values are the quantizer's
        w = src.get("decoder.blocks.1.attn.o.weight")
        assert torch.equal(q.get("decoder.blocks.1.attn.o.qweight"), quantize_rows(w, scheme, group)["qweight"])
    stored, ckpt = load_model(out)
    ckpt.close()
    at_load, ckpt = load_model(dense_ckpt)
    ckpt.close()
    assert quantize_linears(at_load, scheme, group) == 10 + with_output
    assert isinstance(stored.decoder.blocks[0].attn.qkv, QuantizedLinear)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = stored(ids), at_load(ids)
    assert torch.equal(a, b)  # the same stored values, the same kernels
    assert torch.equal(generate(stored, ids, max_new_tokens=5)[0], generate(at_load, ids, max_new_tokens=5)[0])
    # against the float model holding the dequantized weights (the kernels round activations to bf16)
    reference, ckpt = load_model(dense_ckpt)
    ckpt.close()
    with torch.no_grad():
        for name, module in quantizable_linears(stored, output=with_output).items():
            reference.get_submodule(name).weight.copy_(module.dequantized_weight())
        want = reference(ids)
    assert (a - want).abs().max() <= 0.02 * want.abs().max()


def test_load_in_another_dtype_keeps_the_quantized_pieces(dense_ckpt, tmp_path):
    quantize_checkpoint(dense_ckpt, tmp_path / "q", linear="int4", group_size=32)
    model, ckpt = load_model(tmp_path / "q", dtype=torch.bfloat16)
    ckpt.close()
    qkv = model.decoder.blocks[0].attn.qkv
    assert qkv.qweight.dtype == torch.uint8 and qkv.scales.dtype == torch.bfloat16 and qkv.bias.dtype == torch.bfloat16
    assert model.embed.tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert model(ids).dtype == torch.bfloat16 and bool(torch.isfinite(model(ids)).all())


def test_bad_quantizations_are_user_errors_and_write_nothing(dense_ckpt, tmp_path):
    quantize_checkpoint(dense_ckpt, tmp_path / "q8", linear="int8")
    with pytest.raises(UserError, match="already quantized \\(linear int8\\)"):
        quantize_checkpoint(tmp_path / "q8", tmp_path / "again", linear="int4", group_size=64)
    with pytest.raises(UserError, match="unsupported int4 group size 48") as info:
        quantize_checkpoint(dense_ckpt, tmp_path / "g48", linear="int4", group_size=48)
    assert info.value.option == "group_size"
    with pytest.raises(UserError, match="divisible by it; a weight has 64"):
        quantize_checkpoint(dense_ckpt, tmp_path / "g256", linear="int4", group_size=256)  # d_model 64
    with pytest.raises(UserError, match="one scale per output row"):
        quantize_checkpoint(dense_ckpt, tmp_path / "i8g", linear="int8", group_size=64)
    with pytest.raises(UserError, match="either the experts or the linear layers"):
        quantize_checkpoint(dense_ckpt, tmp_path / "both", experts="int8", linear="int8")
    with pytest.raises(UserError, match="dense model: quantize its linear layers"):
        quantize_checkpoint(dense_ckpt, tmp_path / "exp", experts="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
@torch.inference_mode()
def test_compiled_quantized_decoding_equals_eager(scheme, group):
    """The compiled steps trace QuantizedLinear's forward (the fused kernels' ops, frozen buffers):
    token-identical greedy generation, logits within a bf16 step of eager's."""
    from cpmctl.compiled import CompiledDecoder
    from cpmctl.generate import decode_one_token, prefill
    from cpmctl.model import KVCache

    torch.manual_seed(0)
    model = build_model(dense_config(n_layers=1)).eval()
    quantize_linears(model, scheme, group)
    compiled = CompiledDecoder(model, autotune=False)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    expected, _ = generate(model, ids, max_new_tokens=6)
    got, _ = generate(model, ids, max_new_tokens=6, compiled=compiled)
    assert torch.equal(expected, got)
    cache, eager_cache = compiled.allocate(2, 11, max_position=10), KVCache.for_model(model, 2, 11)
    compiled_logits, eager_logits = compiled.prefill(ids, cache), prefill(model, ids, eager_cache)
    for _ in range(6):
        assert (compiled_logits - eager_logits).abs().max() <= 1e-2 * eager_logits.abs().max()
        token = eager_logits.argmax(-1)[:, None]
        compiled_logits, eager_logits = compiled.decode(token, cache), decode_one_token(model, token, eager_cache)
