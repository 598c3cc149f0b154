"""`cpmctl quantize --linear` and `cpmctl infer --dtype int8|int4` from the command line, and their bad
inputs (exit 2, one line, nothing written).

No module-level `pytest.importorskip("torchao")` here: CLI tests that use the sp_tokenizer fixture
crashed (SIGSEGV) in a module that imported torchao at collection; torchao is checked per test.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from cpmctl.checkpoint import save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.model import build_model

runner = CliRunner()
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (the quantizer) not installed")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def result_of(result, command: str) -> dict:
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["command"] == command
    return data["result"]


def assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def dense(tmp_path_factory, sp_tokenizer):
    root = tmp_path_factory.mktemp("qcli")
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size, init_std=0.05)
    tok = sp_tokenizer.save(root / "tok")
    save_model(build_model(config).eval(), root / "dense", tokenizer_dir=tok)
    save_model(build_model(config.replace(d_ff=128)).eval(), root / "dense128", tokenizer_dir=tok)  # widths of whole groups of 64
    return root


@needs_torchao
@pytest.mark.parametrize("scheme,extra", [("int8", []), ("int4", ["--group-size", "32"])])
def test_quantize_linear_then_infer_equals_quantizing_at_load(dense, scheme, extra):
    out = dense / f"dense-{scheme}"
    summary = result_of(invoke("quantize", dense / "dense", out, "--linear", scheme, *extra, "--json"), "quantize")
    layers = ModelConfig.from_preset("llama-tiny").n_layers
    # qkv, o, w_in, w_gate, w_out per layer; int8 also the (untied) output projection
    assert summary["weights"] == "linear" and summary["tensors_quantized"] == layers * 5 + (scheme == "int8")
    assert summary["group_size"] == (32 if scheme == "int4" else None)
    manifest = json.loads((out / "cpmctl.json").read_text())
    assert manifest["stage"] == "quantize" and manifest["options"]["linear"] == scheme
    assert json.loads((out / "config.json").read_text())["quantization"]["weights"] == "linear"
    stored = result_of(invoke("infer", out, "Return the", "--max-new-tokens", "6", "--json"), "infer")
    assert stored["stats"]["quantization"] == {"scheme": scheme, "group_size": summary["group_size"], "weights": "linear",
                                               "at_load": False}
    if scheme == "int8":  # --dtype int4 quantizes with the default group (64): compare int8 only
        at_load = result_of(invoke("infer", dense / "dense", "Return the", "--max-new-tokens", "6", "--dtype", "int8", "--json"),
                            "infer")
        assert at_load["stats"]["quantization"]["at_load"] is True
        assert at_load["outputs"] == stored["outputs"] and stored["stats"]["generated_tokens"] == 6


@needs_torchao
def test_infer_dtype_int4_uses_the_default_group(dense):
    assert_user_error(invoke("infer", dense / "dense", "hi", "--dtype", "int4"),  # llama-tiny's d_ff is 160
                      "--dtype int4: int4 with group size 64 needs input widths divisible by it; a weight has 160")
    result = result_of(invoke("infer", dense / "dense128", "Return the", "--max-new-tokens", "3", "--dtype", "int4", "--json"), "infer")
    assert result["stats"]["quantization"] == {"scheme": "int4", "group_size": 64, "weights": "linear", "at_load": True}
    assert result["stats"]["generated_tokens"] == 3


@needs_torchao
def test_quantize_bad_inputs_exit_2_and_write_nothing(dense, tmp_path):
    src = dense / "dense"
    quantized = tmp_path / "q8"
    result_of(invoke("quantize", src, quantized, "--linear", "int8", "--json"), "quantize")
    cases = [
        (["quantize", quantized, tmp_path / "a", "--linear", "int4"], "is already quantized (linear int8)"),
        (["quantize", src, tmp_path / "b", "--linear", "int4", "--group-size", "48"], "unsupported int4 group size 48"),
        (["quantize", src, tmp_path / "c", "--linear", "int8", "--group-size", "64"], "applies to int4 only (--group-size)"),
        (["quantize", src, tmp_path / "d", "--linear", "int3"], "--linear must be one of int8, int4"),
        (["quantize", src, tmp_path / "e", "--linear", "int8", "--experts", "int8"], "give one of --experts"),
        (["quantize", src, tmp_path / "f"], "give one of --experts"),
        (["quantize", src, tmp_path / "g", "--experts", "int8"], "no experts to quantize"),
        (["infer", quantized, "hi", "--dtype", "int4"], "--dtype int4: " + str(quantized) + " is already quantized"),
        (["infer", src, "hi", "--dtype", "int8", "--offload", "disk", "--memory-budget", "50%"], "run resident"),
        (["infer", src, "hi", "--dtype", "int2"], "unknown dtype 'int2'"),
    ]
    for argv, fragment in cases:
        assert_user_error(invoke(*argv), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]


@needs_torchao
def test_a_quantized_dtype_without_a_kernel_exits_2(dense, tmp_path, monkeypatch):
    import cpmctl.quant as quant

    src = dense / "dense"
    result_of(invoke("quantize", src, tmp_path / "q4", "--linear", "int4", "--group-size", "32", "--json"), "quantize")
    monkeypatch.setattr(quant, "cpu_kernels_available", lambda scheme: False)  # a torch without the fused kernels
    assert_user_error(invoke("infer", src, "hi", "--dtype", "int8"),
                      "--dtype int8: int8 weights on the CPU need torch._weight_int8pack_mm, which torch")
    assert_user_error(invoke("infer", tmp_path / "q4", "hi"), "int4 weights on the CPU need torch._weight_int4pack_mm_for_cpu")


@needs_torchao
def test_cpu_gemv_option_falls_back_with_a_note_or_exits_2(dense, monkeypatch):
    import cpmctl.quant as quant

    src = dense / "dense"
    args = ("infer", src, "Return the", "--max-new-tokens", "3", "--dtype", "int8", "--json")
    on = result_of(invoke(*args, "--cpu-gemv", "on"), "infer")
    off = result_of(invoke(*args, "--cpu-gemv", "off"), "infer")
    assert on["stats"]["generated_tokens"] == off["stats"]["generated_tokens"] == 3 and "cpu_gemv" not in on["stats"]
    assert_user_error(invoke(*args, "--cpu-gemv", "fast"), "unknown --cpu-gemv 'fast'")
    monkeypatch.setattr(quant, "_gemv_state", {"problem": "no C++ compiler (c++) on PATH; the CPU kernels are compiled on first use"})
    assert_user_error(invoke(*args, "--cpu-gemv", "on"), "--cpu-gemv on: the C++ CPU GEMV cannot run here: no C++ compiler")
    auto = result_of(invoke(*args), "infer")
    assert "no C++ compiler" in auto["stats"]["cpu_gemv"] and auto["outputs"] == off["outputs"]
