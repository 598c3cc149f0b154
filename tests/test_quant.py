"""Weight-only int8/int4 experts: the stored format, torchao's quantizer behind `cpmctl quantize`,
the fused CPU matmuls against the format's dequantization, and the bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from cpmctl.checkpoint import load_model, open_checkpoint, save_model, verify_checkpoint
from cpmctl.config import ModelConfig, QuantConfig
from cpmctl.errors import UserError
from cpmctl.model import build_model
from cpmctl.quant import QuantizedView, dequantize, pack_int4, quantized_linear, unpack_int4

pytest.importorskip("torchao")
from cpmctl.quantize import quantize_checkpoint, quantize_stack  # noqa: E402


def moe_config(**moe) -> ModelConfig:
    return ModelConfig(arch="decoder", vocab_size=96, d_model=64, n_heads=4, d_ff=128, n_layers=2, position="rotary",
                       activation="silu", gated=True, eos_token_id=None, init_std=0.1,
                       moe=dict(experts=4, expert_size=64, top_k=2, **moe))


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("moe") / "src"
    save_model(build_model(moe_config()), path)
    return path


def test_int4_packing_round_trips():
    values = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (3, 5, 4) and torch.equal(unpack_int4(packed), values)
    assert pack_int4(torch.tensor([[1, 2]])).item() == 1 + (2 << 4)  # element 2j in the low nibble


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 64)])
def test_quantized_values_are_within_half_a_step_of_the_weights(scheme, group):
    torch.manual_seed(1)
    w = torch.randn(3, 16, 128)
    parts = quantize_stack(w, scheme, group, transposed=False)
    view = QuantizedView(scheme, group, parts["qweight"], parts["scales"], parts.get("zeros"))
    back = dequantize(view)
    step = parts["scales"].float()
    per_element = step.repeat_interleave(128 // step.shape[-1], dim=-1)
    # half a step of rounding, plus the bf16 rounding of the int4 zero (|zero| <= 8 steps, 2^-8 relative)
    slack = 0.5 * per_element * (1.001 if scheme == "int8" else 1.07) + 1e-6
    assert bool(((back - w).abs() <= slack).all())
    if scheme == "int8":
        assert parts["qweight"].dtype == torch.int8 and parts["scales"].shape == (3, 16, 1)
        assert int(parts["qweight"].abs().max()) == 127  # the largest weight of each row maps to +-127
    else:
        assert parts["qweight"].shape == (3, 16, 64) and parts["zeros"].shape == (3, 16, 128 // group)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_cpu_matmul_equals_the_dequantized_product(scheme, group, rows):
    torch.manual_seed(2)
    w = torch.randn(96, 256) * 0.05
    parts = quantize_stack(w, scheme, group, transposed=False)
    view = QuantizedView(scheme, group, parts["qweight"], parts["scales"], parts.get("zeros"))
    x = torch.randn(rows, 256)
    got = quantized_linear(x, view)
    # the kernels take bf16 activations and accumulate in fp32; the reference does the same in fp32
    want = x.to(torch.bfloat16).float() @ dequantize(view).T
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_transposed_stacks_quantize_their_linear_form():
    w_out = torch.randn(2, 64, 32)  # [E, d_e, d]: the linear weight is [d, d_e]
    parts = quantize_stack(w_out, "int8", None, transposed=True)
    assert parts["qweight"].shape == (2, 32, 64)
    back = dequantize(QuantizedView("int8", None, parts["qweight"], parts["scales"], None)).transpose(-1, -2)
    assert (back - w_out).abs().max() < 0.02 * w_out.abs().max()


def dequantized_reference(src, quantized):
    """The float model with each expert weight replaced by its dequantized value."""
    model, ckpt = load_model(src)
    with open_checkpoint(quantized) as q, torch.no_grad():
        spec = q.config.quantization
        for stack, i, ffn in model.ffn_modules():
            for w in ("w_in", "w_gate", "w_out"):
                name = f"{stack}.blocks.{i}.ffn.{w}"
                view = QuantizedView(spec.scheme, spec.group_size, q.get(name + ".qweight"), q.get(name + ".scales"),
                                     q.get(name + ".zeros") if spec.scheme == "int4" else None)
                back = dequantize(view)
                setattr(ffn, w, torch.nn.Parameter(back.transpose(-1, -2).contiguous() if w == "w_out" else back))
    ckpt.close()
    return model


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_quantized_checkpoint_computes_its_dequantized_weights_and_keeps_the_rest_exact(moe_ckpt, tmp_path, scheme, group):
    out = tmp_path / scheme
    summary = quantize_checkpoint(moe_ckpt, out, experts=scheme, group_size=group)
    assert summary["tensors_quantized"] == 6  # w_in, w_gate, w_out of 2 layers
    verify_checkpoint(out)  # checksums recorded and matching
    with open_checkpoint(out) as q, open_checkpoint(moe_ckpt) as src:
        assert q.config.quantization == QuantConfig(scheme, group)
        names = set(q.tensor_names())
        assert "decoder.blocks.0.ffn.w_in.qweight" in names and "decoder.blocks.0.ffn.w_in" not in names
        assert ("decoder.blocks.1.ffn.w_out.zeros" in names) == (scheme == "int4")
        for name in src.tensor_names():
            if ".ffn.w_" not in name:
                assert torch.equal(q.get(name), src.get(name)), name
        provenance = json.loads((out / "cpmctl.json").read_text())
        assert provenance["stage"] == "quantize" and provenance["tensor_crc32"]
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    reference = dequantized_reference(moe_ckpt, out)
    q_model, q_ckpt = load_model(out)
    with torch.no_grad():
        ref, got = reference(ids), q_model(ids)
        one = q_model(ids[:1, :3])  # a decode-sized call goes through the same experts
    q_ckpt.close()
    # the fused kernels take bf16 activations: that rounding, nothing more
    assert float((got - ref).abs().max()) < 2e-2 * float(ref.abs().max())
    # bf16 products: how many rows share a call moves the last bits, not more
    torch.testing.assert_close(one, got[:1, :3], rtol=0, atol=1e-3 * float(got.abs().max()))


def test_bad_inputs_are_one_line_user_errors_and_write_nothing(moe_ckpt, tmp_path):
    with pytest.raises(UserError, match="unsupported int4 group size 48"):
        quantize_checkpoint(moe_ckpt, tmp_path / "a", experts="int4", group_size=48)
    with pytest.raises(UserError, match="int8 keeps one scale per output row"):
        quantize_checkpoint(moe_ckpt, tmp_path / "b", experts="int8", group_size=64)
    with pytest.raises(UserError, match="unknown quantization 'int3'"):
        quantize_checkpoint(moe_ckpt, tmp_path / "c", experts="int3")
    quantize_checkpoint(moe_ckpt, tmp_path / "q", experts="int8")
    with pytest.raises(UserError, match=r"already quantized \(experts int8\)"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "d", experts="int4", group_size=64)
    torch.manual_seed(0)
    save_model(build_model(moe_config().replace(moe=None)), tmp_path / "dense")
    with pytest.raises(UserError, match="no experts to quantize"):
        quantize_checkpoint(tmp_path / "dense", tmp_path / "e", experts="int8")
    torch.manual_seed(0)
    save_model(build_model(moe_config().replace(d_model=48, n_heads=4)), tmp_path / "narrow")
    with pytest.raises(UserError, match="divisible"):
        quantize_checkpoint(tmp_path / "narrow", tmp_path / "f", experts="int4", group_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "narrow", "q"]


def test_cli_quantize_and_its_bad_input(moe_ckpt, tmp_path):
    from typer.testing import CliRunner

    from cpmctl.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["quantize", str(moe_ckpt), str(tmp_path / "q4"), "--experts", "int4"])
    assert done.exit_code == 0, done.output
    assert "as int4, group size 64" in done.output
    bad = runner.invoke(app, ["quantize", str(moe_ckpt), str(tmp_path / "x"), "--experts", "int4", "--group-size", "100"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and "error: unsupported int4 group size 100" in bad.output
    assert "(--group-size)" in bad.output and not (tmp_path / "x").exists()
    again = runner.invoke(app, ["quantize", str(tmp_path / "q4"), str(tmp_path / "y"), "--experts", "int8"])
    assert again.exit_code == 2 and "already quantized" in again.output and not (tmp_path / "y").exists()


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_offloaded_quantized_experts_equal_resident_bit_for_bit(moe_ckpt, tmp_path, scheme, group):
    from cpmctl.generate import generate
    from cpmctl.offload import checkpoint_weight_bytes, load_offloaded

    out = tmp_path / scheme
    quantize_checkpoint(moe_ckpt, out, experts=scheme, group_size=group)
    prompts = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(4))
    resident, ckpt = load_model(out)
    with torch.no_grad():
        want_logits = resident(prompts)
        want_tokens, _ = generate(resident, prompts, max_new_tokens=4)
        want_one, _ = generate(resident, prompts[:1], max_new_tokens=4)
    ckpt.close()
    total = checkpoint_weight_bytes(out)
    with open_checkpoint(out) as q:
        assert total == sum(q.tensor_info(n).nbytes if n.rpartition(".")[2] in ("qweight", "scales", "zeros")
                            else q.tensor_info(n).nbytes for n in q.tensor_names())  # fp32 model: stored bytes
    model, ckpt, engine = load_offloaded(out, mode="disk", budget=total, device=torch.device("cpu"), dtype=None)
    minimum, slot = engine.stats()["minimum_bytes"], engine.stats()["slot_bytes"]
    assert engine.stats()["slots"] == 8
    engine.close()
    ckpt.close()
    for budget in (minimum, minimum + 3 * slot):  # 1 and 4 of the 8 experts' slots
        model, ckpt, engine = load_offloaded(out, mode="disk", budget=budget, device=torch.device("cpu"), dtype=None)
        try:
            with torch.no_grad():
                assert torch.equal(model(prompts), want_logits)
                assert torch.equal(generate(model, prompts, max_new_tokens=4)[0], want_tokens)
                assert torch.equal(generate(model, prompts[:1], max_new_tokens=4)[0], want_one)
            stats = engine.stats()
            assert stats["slots"] < 8 and stats["misses"] > 0
            per_expert = sum(p.nbytes for p in engine.units[0].parts)
            assert stats["bytes_moved"] == stats["loads"] * per_expert
        finally:
            engine.close()
            ckpt.close()


def test_a_budget_below_one_quantized_slot_states_the_minimum(moe_ckpt, tmp_path):
    from cpmctl.offload import load_offloaded

    quantize_checkpoint(moe_ckpt, tmp_path / "q", experts="int4", group_size=64)
    with pytest.raises(UserError, match=r"below this model's minimum of .* one quantized expert slot"):
        load_offloaded(tmp_path / "q", mode="disk", budget=1000, device=torch.device("cpu"), dtype=None)


def test_int4_experts_on_the_host_route_equal_resident_bit_for_bit(moe_ckpt, tmp_path):
    """Host copies and slots hold int4 in the CPU kernel's layout (repacked once per read):
    both routes, and the resident model, give the same bits."""
    from cpmctl.offload import checkpoint_weight_bytes, load_offloaded
    from cpmctl.offload.placement import ComputeCosts

    out = tmp_path / "int4"
    quantize_checkpoint(moe_ckpt, out, experts="int4", group_size=32)
    prompts = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(6))
    resident, ckpt = load_model(out)
    with torch.no_grad():
        want = resident(prompts)
    ckpt.close()
    costs = ComputeCosts(host_flops=1e12, device_flops=1e12, h2d_bytes=1e6)  # a few rows: host
    model, ckpt, engine = load_offloaded(out, mode="disk", budget=checkpoint_weight_bytes(out), device=torch.device("cpu"), dtype=None)
    minimum = engine.stats()["minimum_bytes"]
    engine.close()
    ckpt.close()
    model, ckpt, engine = load_offloaded(out, mode="cpu", budget=minimum, device=torch.device("cpu"), dtype=None,
                                         expert_compute="auto", costs=costs)
    try:
        with torch.no_grad():
            assert torch.equal(model(prompts), want)
            assert torch.equal(model(prompts[:1, :2]), resident(prompts[:1, :2]))
        assert engine.stats()["experts_computed_on_host"] > 0
    finally:
        engine.close()
        ckpt.close()


def test_int4_misses_read_the_stored_cpu_layout_without_repacking(moe_ckpt, tmp_path, monkeypatch):
    """`quantize --experts int4` stores the qweights again in the CPU kernel's layout; offloaded
    misses read that (no repack) and stay bit-exact; without it, or when the running torch packs
    differently, the engine falls back to repacking on read."""
    import json

    import cpmctl.cpu_int4 as cpu_int4
    import cpmctl.offload.engine as engine_module
    from cpmctl.offload import load_offloaded

    out = tmp_path / "int4"
    quantize_checkpoint(moe_ckpt, out, experts="int4", group_size=32)
    manifest = json.loads((out / cpu_int4.MANIFEST_FILE).read_text())
    assert manifest["torch"] == torch.__version__ and len(manifest["crc32"]) == 2 * 3  # 2 layers x w_in, w_gate, w_out
    verify_checkpoint(out)  # the sidecar sits outside the checkpoint's provenance
    prompts = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(8))
    resident, ckpt = load_model(out)
    with torch.no_grad():
        want = resident(prompts)
    ckpt.close()

    def run(expect_prepacked: bool):
        model, ckpt, engine = load_offloaded(out, mode="disk", budget=10**9, device=torch.device("cpu"), dtype=None)
        minimum = engine.stats()["minimum_bytes"]
        engine.close()
        ckpt.close()
        model, ckpt, engine = load_offloaded(out, mode="disk", budget=minimum, device=torch.device("cpu"), dtype=None)
        try:
            names = [p.name for u in engine.units for p in u.parts if "qweight" in p.name]
            assert all(n.endswith(cpu_int4.PREPACKED_SUFFIX) for n in names) == expect_prepacked
            assert any(n.endswith(cpu_int4.PREPACKED_SUFFIX) for n in names) == expect_prepacked
            with torch.no_grad():
                assert torch.equal(model(prompts), want)
            assert engine.stats()["misses"] > 0
        finally:
            engine.close()
            ckpt.close()

    with monkeypatch.context() as m:
        m.setattr(engine_module, "cpu_int4_pack", lambda *a: pytest.fail("a miss repacked int4"))
        run(expect_prepacked=True)
    with monkeypatch.context() as m:  # a torch whose layout differs: the one-expert check refuses the sidecar
        m.setattr(cpu_int4, "cpu_int4_pack", lambda w: unpack_int4(w.qweight)[..., ::2].contiguous())
        run(expect_prepacked=False)
    (out / cpu_int4.MANIFEST_FILE).unlink()
    run(expect_prepacked=False)
