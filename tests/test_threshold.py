"""Training-free activation sparsity (`moefy --method threshold`, TEAL): the thresholded FFN's
gather path and masked Triton GEMV against the masked dense reference, calibration, the stage,
restore and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cpmctl import moefication as mf
from cpmctl.checkpoint import load_model, open_checkpoint, save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.ffn import GATHER_MAX_TOKENS, ThresholdFeedForward, gathered_matmul
from cpmctl.model import build_model
from cpmctl.stages.moefy import MoefyConfig, run

VARIANTS = [("silu", True, False), ("gelu", False, True), ("drelu", True, True)]


def _ffn(activation, gated, bias, t_in=0.5, t_hidden=0.02):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", activation=activation, gated=gated, bias=bias, threshold_sparsity=0.4)
    ffn = ThresholdFeedForward(config)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(0, 0.1)
    ffn.threshold_in.fill_(t_in)
    ffn.threshold_hidden.fill_(t_hidden)
    return ffn


def _masked_reference(ffn, x):
    """By hand: zero the small inputs, the dense FFN, zero the small hidden entries, project."""
    act = {"silu": F.silu, "gelu": F.gelu, "drelu": F.relu}[ffn.activation]
    xm = torch.where(x.abs() > ffn.threshold_in, x, 0.0)
    up = F.linear(xm, ffn.w_in.weight, ffn.w_in.bias)
    if ffn.w_gate is None:
        h = act(up)
    else:
        h = act(F.linear(xm, ffn.w_gate.weight, ffn.w_gate.bias)) * (F.relu(up) if ffn.activation == "drelu" else up)
    h = torch.where(h.abs() > ffn.threshold_hidden, h, 0.0)
    return F.linear(h, ffn.w_out.weight, ffn.w_out.bias)


@pytest.mark.parametrize("activation,gated,bias", VARIANTS)
def test_gather_path_equals_the_masked_dense_ffn(activation, gated, bias):
    ffn = _ffn(activation, gated, bias)
    for n in (1, 3, GATHER_MAX_TOKENS, GATHER_MAX_TOKENS + 5):  # gather path, then the dense masked path
        x = torch.randn(n, ffn.w_in.in_features)
        with torch.no_grad():
            torch.testing.assert_close(ffn(x), _masked_reference(ffn, x), atol=1e-5, rtol=1e-5)
    skipped = (x.abs() <= ffn.threshold_in).float().mean()
    assert 0.2 < float(skipped) < 0.8  # the thresholds really skip entries in this test


def test_zero_thresholds_give_the_dense_ffn():
    ffn = _ffn("silu", True, False, t_in=0.0, t_hidden=0.0)
    x = torch.randn(2, ffn.w_in.in_features)
    with torch.no_grad():
        dense = ffn.w_out(F.silu(ffn.w_gate(x)) * ffn.w_in(x))
        torch.testing.assert_close(ffn(x), dense, atol=1e-5, rtol=1e-5)


def test_gathered_matmul_reads_only_kept_rows():
    rows = torch.randn(6, 4)
    x = torch.tensor([[0.1, 2.0, 0.0, -3.0, 0.2, 1.0]])
    rows_poisoned = rows.clone()
    rows_poisoned[[0, 2, 4]] = float("nan")  # the skipped entries' rows: never read
    got = gathered_matmul(x, rows_poisoned, torch.tensor(0.5), None)
    torch.testing.assert_close(got, x[:, [1, 3, 5]] @ rows[[1, 3, 5]])


@pytest.mark.parametrize("activation,gated,bias", VARIANTS)
def test_triton_masked_gemv_matches_the_torch_reference(activation, gated, bias):
    pytest.importorskip("triton")
    from cpmctl_kernels import INTERPRETER, threshold_gemv

    if not INTERPRETER and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    ffn = _ffn(activation, gated, bias)
    x = torch.randn(2, ffn.w_in.in_features)
    ffn.kernels = "triton"
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), _masked_reference(ffn, x), atol=1e-5, rtol=1e-5)
    rows = torch.randn(37, 50)  # sizes that are not multiples of the blocks
    xs = torch.randn(3, 37)
    poisoned = rows.clone()
    poisoned[xs.abs().amax(0) <= 0.7] = float("nan")  # rows no token keeps: the kernel must not read them
    want = torch.where(xs.abs() > 0.7, xs, 0.0) @ rows + 1.0
    torch.testing.assert_close(threshold_gemv(xs, poisoned, torch.tensor(0.7), torch.ones(50)), want, atol=1e-5, rtol=1e-5)


def test_calibrated_thresholds_skip_the_target_fraction():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", activation="silu", gated=True)
    dense = build_model(config).ffn_modules()[0][2]
    x = torch.randn(3000, config.d_model) * torch.linspace(0.2, 3, config.d_model)
    sparse = mf.threshold_ffn_from_dense(dense, config.replace(threshold_sparsity=0.4), x, 0.4)
    assert float((x.abs() <= sparse.threshold_in).float().mean()) == pytest.approx(0.4, abs=0.01)
    with torch.no_grad():
        hidden = sparse.unthresholded_hidden(torch.where(x.abs() > sparse.threshold_in, x, 0.0))
    assert float((hidden.abs() <= sparse.threshold_hidden).float().mean()) == pytest.approx(0.4, abs=0.01)
    torch.testing.assert_close(sparse.w_in.weight, dense.w_in.weight, rtol=0, atol=0)
    assert mf.magnitude_quantile(torch.tensor([-4.0, 1.0, -2.0, 3.0]), 0.5) == 2.0


# -- the stage ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swiglu_ckpt(tmp_path_factory, sp_tokenizer):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size, activation="silu",
                                     eos_token_id=sp_tokenizer.eos_id, bos_token_id=None, pad_token_id=sp_tokenizer.pad_id)
    root = tmp_path_factory.mktemp("threshold")
    save_model(build_model(config), root / "dense", tokenizer_dir=sp_tokenizer.save(root / "tok"), stage="test")
    return root / "dense"


def test_moefy_threshold_writes_a_sparse_model_that_reloads_and_restores(tmp_path, swiglu_ckpt, stdlib_text):
    report = run(MoefyConfig(checkpoint=swiglu_ckpt, out=tmp_path / "sparse", method="threshold", sparsity=0.4, data=stdlib_text,
                             max_docs=100, eval_docs=20, seq_len=48, max_tokens=2048))
    assert report["method"] == "threshold" and set(report["layers"]) == {"decoder.0", "decoder.1"}
    for layer in report["layers"].values():  # held-out text: close to the calibrated target
        assert layer["input_skipped"] == pytest.approx(0.4, abs=0.08)
        assert layer["hidden_skipped"] == pytest.approx(0.4, abs=0.08)
    q = report["quality"]
    assert q["metric"] == "perplexity" and abs(q["perplexity_increase"]) < 0.05
    model, ckpt = load_model(tmp_path / "sparse")
    ckpt.close()
    assert model.config.threshold_sparsity == 0.4
    assert all(isinstance(f, ThresholdFeedForward) and float(f.threshold_in) > 0 for _, _, f in model.ffn_modules())
    run(MoefyConfig(checkpoint=tmp_path / "sparse", out=tmp_path / "dense", restore=True))
    with open_checkpoint(swiglu_ckpt) as a, open_checkpoint(tmp_path / "dense") as b:
        assert a.config == b.config
        assert sorted(a.tensor_names()) == sorted(b.tensor_names())
        for name in a.tensor_names():
            assert torch.equal(a.get(name), b.get(name)), name


def test_threshold_bad_input_exits_2(tmp_path, swiglu_ckpt, stdlib_text):
    runner = CliRunner()
    cases = [(["--sparsity", "1.5"], "--sparsity must be in (0, 1)"), (["--sparsity", "0"], "--sparsity must be in (0, 1)")]
    for extra, message in cases:
        result = runner.invoke(app, ["moefy", str(swiglu_ckpt), str(tmp_path / "o"), "--method", "threshold", "--data", str(stdlib_text), *extra])
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
    result = runner.invoke(app, ["moefy", str(swiglu_ckpt), str(tmp_path / "o"), "--method", "threshold"])
    assert result.exit_code == 2 and "give --data" in result.output
    assert not (tmp_path / "o").exists()
