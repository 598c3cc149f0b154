"""`--kernels auto|torch|triton`: how the choice resolves per device, that a model instance's MoE
layers follow it, and that infer and pretrain give the torch path's results with the Triton
kernels (run here through Triton's CPU interpreter, which tests/conftest.py switches on)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from cpmctl.checkpoint import save_model
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.model import build_model
from cpmctl.moe import MoEFeedForward, resolve_kernels, set_kernels

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _moe_config(**kw) -> ModelConfig:
    fields = dict(vocab_size=1000, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                  moe=dict(experts=4, expert_size=16, top_k=2))
    return ModelConfig.from_preset("llama-tiny", **{**fields, **kw})


@pytest.mark.kernels
def test_auto_is_the_cpu_kernels_on_cpu_and_triton_on_cuda():
    from cpmctl_cpu import build_problem

    assert resolve_kernels("auto", "cpu") == ("cpu" if build_problem() is None else "torch")
    assert resolve_kernels("auto", torch.device("cuda")) == "triton"
    assert resolve_kernels("torch", "cuda") == "torch"


def test_unknown_choice_and_triton_on_cpu_without_interpreter_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown MoE kernels"):
        resolve_kernels("cuda", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="need a CUDA device") as info:
        resolve_kernels("triton", "cpu")
    assert info.value.option == "kernels"  # the command layer adds --kernels
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernels("triton", "cpu") == "triton"


def test_set_kernels_touches_only_this_instance():
    torch.manual_seed(0)
    a, b = build_model(_moe_config()), build_model(_moe_config())
    assert set_kernels(a, "triton") == 2
    assert {m.kernels for m in a.modules() if isinstance(m, MoEFeedForward)} == {"triton"}
    assert {m.kernels for m in b.modules() if isinstance(m, MoEFeedForward)} == {"torch"}
    with pytest.raises(ValueError):
        set_kernels(a, "auto")


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRETER, reason="needs Triton's interpreter (no CUDA) or a GPU run")
def test_triton_forward_equals_torch_and_training_falls_back_to_torch():
    torch.manual_seed(0)
    model = build_model(_moe_config()).eval()
    ids = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        reference = model(ids)
        set_kernels(model, "triton")
        fast = model(ids)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    # With autograd on, the forward-only kernels step aside: bit-equal to the torch path, and a
    # backward pass reaches the expert weights.
    set_kernels(model, "torch")
    expected = model(ids)
    set_kernels(model, "triton")
    trained = model(ids)
    assert torch.equal(trained, expected)
    trained.float().logsumexp(-1).mean().backward()
    moe = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    assert moe.w_in.grad is not None and moe.w_in.grad.abs().sum() > 0


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRETER, reason="needs Triton's interpreter (no CUDA) or a GPU run")
def test_infer_with_triton_kernels_generates_what_the_torch_path_does(tmp_path, sp_tokenizer):
    from cpmctl.stages.infer import InferConfig, run

    torch.manual_seed(0)
    model = build_model(_moe_config(vocab_size=sp_tokenizer.vocab_size))
    tok_dir = sp_tokenizer.save(tmp_path / "tok")
    save_model(model, tmp_path / "moe", tokenizer_dir=tok_dir)
    outputs = {}
    for kernels in ("torch", "triton"):
        result = run(InferConfig(checkpoint=tmp_path / "moe", texts=["Return the sum of"], max_new_tokens=4, kernels=kernels))
        assert result["stats"]["kernels"] == kernels
        outputs[kernels] = result["outputs"]
    assert outputs["triton"] == outputs["torch"]


def test_pretrain_continues_an_upcycled_moe_checkpoint(tmp_path, stdlib_text, sp_tokenizer):
    from cpmctl.data import prepare
    from cpmctl.stages import pretrain as stage
    from cpmctl.training import read_metrics

    torch.manual_seed(0)
    model = build_model(_moe_config(vocab_size=sp_tokenizer.vocab_size))
    tok_dir = sp_tokenizer.save(tmp_path / "tok")
    save_model(model, tmp_path / "moe", tokenizer_dir=tok_dir)
    prepare(stdlib_text, sp_tokenizer, tmp_path / "shards", progress=False)
    cfg = stage.PretrainConfig(out=tmp_path / "run", data=tmp_path / "shards", init=tmp_path / "moe", seq_len=16,
                               batch_size=4, max_steps=6, lr=3e-3, eval_batches=2, log_every=1, progress=False,
                               kernels="auto")
    result = stage.run(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert math.isfinite(result["final_eval_loss"])
    from cpmctl.checkpoint import read_config

    assert read_config(tmp_path / "run" / "checkpoint").moe.experts == 4
    with pytest.raises(UserError, match="unknown --kernels"):
        stage.run(stage.PretrainConfig(out=tmp_path / "bad", data=tmp_path / "shards", init=tmp_path / "moe", kernels="fast"))
    assert not (tmp_path / "bad").exists()
