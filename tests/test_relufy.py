"""`cpmctl relufy`: activation swap (ReLU, dReLU), sparsity measurement, the progressive L1 term,
recovery training, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cpmctl import relufication as rf
from cpmctl.checkpoint import load_model, save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.ffn import FeedForward
from cpmctl.model import build_model
from cpmctl.stages.relufy import RelufyConfig, run


def test_drelu_is_relu_on_both_branches_and_needs_a_gated_ffn():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", activation="drelu")
    ffn = FeedForward(config)
    x = torch.randn(5, config.d_model)
    want = ffn.w_out(F.relu(ffn.w_gate(x)) * F.relu(ffn.w_in(x)))
    torch.testing.assert_close(ffn(x), want, rtol=0, atol=0)
    with torch.no_grad():  # the in-place inference path gives the same values
        torch.testing.assert_close(ffn(x), want, rtol=0, atol=0)
    with pytest.raises(UserError, match="needs a gated FFN"):
        ModelConfig.from_preset("bert-tiny", activation="drelu")


def test_relufied_config_refuses_relu_moe_and_thresholded_models():
    silu = ModelConfig.from_preset("llama-tiny", activation="silu")
    assert rf.relufied_config(silu, "relu", "m").activation == "relu"
    assert rf.relufied_config(silu, "drelu", "m").activation == "drelu"
    with pytest.raises(UserError, match="already a ReLU model"):
        rf.relufied_config(silu.replace(activation="relu"), "relu", "m")
    with pytest.raises(UserError, match="MoE model"):
        rf.relufied_config(silu.replace(moe=dict(experts=4, expert_size=32, top_k=1, router="mlp", permuted=True)), "relu", "m")
    with pytest.raises(UserError, match="thresholded"):
        rf.relufied_config(silu.replace(threshold_sparsity=0.4), "relu", "m")
    with pytest.raises(UserError, match="plain FFNs"):
        rf.relufied_config(ModelConfig.from_preset("bert-tiny"), "drelu", "m")


def test_l1_weight_rises_progressively_then_holds():
    weights = [rf.l1_weight(s, 10, 0.5, 0.4) for s in range(10)]
    assert weights[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert weights[4:] == [0.5] * 6
    assert rf.l1_weight(3, 10, 0.0, 0.4) == 0.0


def test_activation_sparsity_counts_exact_zeros_of_real_tokens_only():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("llama-tiny", vocab_size=50, activation="relu", gated=False, pad_token_id=0))
    rows = [[5, 6, 7, 8], [9, 10]]
    got = rf.activation_sparsity(model, rows, batch_size=2)
    zeros, total = {}, {}
    for row in rows:  # each row alone: no padding at all
        tap = rf.HiddenTap(model)
        with torch.no_grad():
            model(input_ids=torch.tensor([row]))
        for name, h in tap.hidden.items():
            zeros[name] = zeros.get(name, 0) + int((h == 0).sum())
            total[name] = total.get(name, 0) + h.numel()
        tap.close()
    assert got == {name: round(zeros[name] / total[name], 4) for name in zeros}
    assert all(0.3 < v < 0.7 for v in got.values())  # a random ReLU layer: about half


def test_recovery_kd_is_the_ki_loss_at_its_own_temperature():
    """The recovery mixes the LM loss with KD from the original at T = 2 (the temperature its
    benchmark was measured with), not at the pretrain KI default: checked against a direct
    computation of (1 - w) * CE + w * T^2 * KL(teacher || student)."""
    assert rf.RECOVERY_KD_TEMPERATURE == 2.0
    config = ModelConfig.from_preset("llama-tiny", vocab_size=50, activation="relu", pad_token_id=0)
    torch.manual_seed(0)
    student, teacher = build_model(config), build_model(config)
    with torch.no_grad():  # a confident teacher, so that the temperature matters
        for module in teacher.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == config.vocab_size:
                module.weight.mul_(20)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    tap = rf.HiddenTap(student)
    loss_fn = rf.recovery_loss(config, teacher, tap, lambda: 0, kd=0.3, l1=0.0, l1_ramp=0.5, steps=10)
    loss, stats = loss_fn(student, batch)
    tap.close()
    with torch.no_grad():
        s, t = student(**batch)[:, :-1], teacher(**batch)[:, :-1]
    keep = batch["attention_mask"][:, 1:].bool()
    labels = batch["input_ids"][:, 1:][keep]
    s, t = s[keep].double(), t[keep].double()
    ce = F.cross_entropy(s, labels)
    T = 2.0
    kl = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean()
    assert stats["count"] == 6
    assert float(loss) == pytest.approx(float(0.7 * ce + 0.3 * T * T * kl), rel=1e-5)
    kl1 = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    assert stats["kd"] == pytest.approx(float(T * T * kl), rel=1e-5)
    assert abs(stats["kd"] - float(kl1)) > 0.1  # not T = 1


# -- the stage on tiny models ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sp_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("relufy")
    tok_dir = sp_tokenizer.save(root / "tok")
    out = {}
    torch.manual_seed(0)
    for name, preset, kw in (("llama", "llama-tiny", dict(activation="silu", eos_token_id=sp_tokenizer.eos_id, bos_token_id=None)),
                             ("bert", "bert-tiny", {})):
        config = ModelConfig.from_preset(preset, vocab_size=sp_tokenizer.vocab_size, pad_token_id=sp_tokenizer.pad_id, **kw)
        save_model(build_model(config), root / name, tokenizer_dir=tok_dir, stage="test")
        out[name] = root / name
    return out


def _cfg(ckpt, out, corpus, **kw):
    base = dict(checkpoint=ckpt, out=out, data=corpus, max_docs=96, eval_docs=24, seq_len=48, batch_size=8, lr=3e-3, steps=6)
    return RelufyConfig(**{**base, **kw})


def test_relufy_llama_swaps_trains_and_writes_a_relu_checkpoint(tmp_path, checkpoints, stdlib_text, one_torch_thread):
    report = run(_cfg(checkpoints["llama"], tmp_path / "plain", stdlib_text, kd=0.5))
    assert report["activation"] == "silu -> relu" and report["metric"] == "perplexity"
    assert all(v == 0.0 for v in report["original"]["sparsity"].values())  # SiLU is never exactly 0
    assert all(0.3 < v < 0.7 for v in report["swapped"]["sparsity"].values())
    # 6 steps at lr 3e-3 on a random model: the LM loss falls far below the untrained model's
    assert report["recovered"]["quality"]["perplexity"] < 0.8 * report["swapped"]["quality"]["perplexity"]
    assert report["recovery"]["steps"] == 6 and report["recovery"]["flops"] > 0
    model, ckpt = load_model(tmp_path / "plain")
    ckpt.close()
    assert model.config.activation == "relu"
    assert all(f.activation == "relu" for _, _, f in model.ffn_modules())
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["recovered"] == report["recovered"]
    sparse = run(_cfg(checkpoints["llama"], tmp_path / "l1", stdlib_text, kd=0.5, l1=1.0, l1_ramp=0.5))
    for name, value in sparse["recovered"]["sparsity"].items():  # the L1 term makes more activations zero
        assert value > report["recovered"]["sparsity"][name] + 0.02


def test_relufy_encoder_matches_the_original_embeddings(tmp_path, checkpoints, stdlib_text, one_torch_thread):
    report = run(_cfg(checkpoints["bert"], tmp_path / "b", stdlib_text, steps=6, lr=1e-4))
    assert report["metric"] == "embedding cosine"
    assert report["original"]["quality"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert report["recovered"]["quality"]["mean_cosine"] > report["swapped"]["quality"]["mean_cosine"]
    assert all(0.3 < v < 0.7 for v in report["swapped"]["sparsity"].values())


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, checkpoints, stdlib_text):
    relu_dir = tmp_path / "relu"
    model, ckpt = load_model(checkpoints["llama"])
    ckpt.close()
    save_model(build_model(model.config.replace(activation="relu")), relu_dir, tokenizer_dir=checkpoints["llama"] / "tokenizer")
    moe_dir = tmp_path / "moe"
    save_model(build_model(model.config.replace(moe=dict(experts=4, expert_size=64, top_k=1, router="mlp", permuted=True))), moe_dir,
               tokenizer_dir=checkpoints["llama"] / "tokenizer")
    cases = [
        ((relu_dir, tmp_path / "o", "--data", stdlib_text), "already a ReLU model"),
        ((moe_dir, tmp_path / "o", "--data", stdlib_text), "is a MoE model"),
        ((checkpoints["bert"], tmp_path / "o", "--data", stdlib_text, "--activation", "drelu"), "plain FFNs"),
        ((checkpoints["llama"], tmp_path / "o"), "give --data"),
        ((checkpoints["llama"], tmp_path / "o", "--data", tmp_path / "missing.txt"), "not a text or JSONL file"),
        ((checkpoints["llama"], tmp_path / "o", "--data", stdlib_text, "--kd", "2"), "--kd must be in [0, 1]"),
    ]
    for args, message in cases:
        result = _cli("relufy", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "o").exists()


def test_a_relufied_llama_exports_to_hugging_face_and_matches_transformers(tmp_path):
    """ReLU-fied gated FFNs are Llama's `hidden_act: relu`: the export keeps the family, and
    transformers computes the same logits; dReLU has no HF equivalent and is refused by name."""
    transformers = pytest.importorskip("transformers")
    from cpmctl import hf

    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", activation="relu", vocab_size=128)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    save_model(model, tmp_path / "relu")
    hf.export_hf(tmp_path / "relu", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "relu"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids), theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    save_model(build_model(config.replace(activation="drelu")), tmp_path / "drelu")
    with pytest.raises(UserError, match="dReLU"):
        hf.export_hf(tmp_path / "drelu", tmp_path / "hf2")


# -- dReLU end to end: relufy -> moefy -> infer -> export --------------------------------------------
def test_a_drelu_model_moefies_on_both_branches_zeros_infers_and_is_refused_by_hf_export(tmp_path, checkpoints, stdlib_text,
                                                                                            one_torch_thread):
    from cpmctl.stages.moefy import MoefyConfig
    from cpmctl.stages.moefy import run as moefy

    report = run(_cfg(checkpoints["llama"], tmp_path / "drelu", stdlib_text, activation="drelu", steps=3))
    assert report["activation"] == "silu -> drelu"
    # relu(gate) * relu(up) is zero unless both are positive: about 3 in 4 on a random model
    assert all(0.65 < v < 0.85 for v in report["swapped"]["sparsity"].values())
    moefy(MoefyConfig(checkpoint=tmp_path / "drelu", out=tmp_path / "moe", expert_size=16, ratio=0.5, split="coactivation",
                      router="mlp", data=stdlib_text, max_docs=150, eval_docs=30, max_tokens=2048, epochs=2))
    dense, c1 = load_model(tmp_path / "drelu")
    moe_model, c2 = load_model(tmp_path / "moe")
    c1.close()
    c2.close()
    assert moe_model.config.activation == "drelu"
    torch.manual_seed(1)
    x = torch.randn(7, dense.config.d_model)
    with torch.no_grad():
        for (_, _, ffn), (_, _, moe) in zip(dense.ffn_modules(), moe_model.ffn_modules()):
            e, de = moe.num_experts, moe.expert_size
            hidden = F.relu(ffn.w_gate(x)) * F.relu(ffn.w_in(x))  # both branches' zeros
            # the experts hold the dense neurons in the split's order; their activations are dReLU's
            torch.testing.assert_close(moe.expert_activations(x), hidden[:, moe.perm].view(-1, e, de), rtol=0, atol=1e-6)
            # the layer is the dense dReLU FFN on the chosen experts' neurons, the others held at their fill
            experts, _ = moe.route(x)
            chosen = torch.zeros(x.shape[0], e).scatter_(1, experts, 1.0)
            mask = torch.zeros_like(hidden)
            mask[:, moe.perm] = chosen.repeat_interleave(de, dim=1)
            want = ffn.w_out(hidden * mask) + moe.skipped_fill(experts)
            torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5)
    result = _cli("infer", tmp_path / "moe", "def f", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    result = _cli("infer", tmp_path / "moe", "def f", "--kernels", "triton")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "do not compute the drelu" in result.output, result.output
    for src in ("drelu", "moe"):
        result = _cli("convert", "hf", tmp_path / src, tmp_path / f"hf-{src}", "--export")
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert not (tmp_path / f"hf-{src}").exists()
    assert "dReLU" in _cli("convert", "hf", tmp_path / "drelu", tmp_path / "hf-drelu", "--export").output


def test_the_cluster_split_of_a_drelu_ffn_groups_gate_and_up_rows_together():
    from cpmctl.moefication.split import cluster_points, split_layer

    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", activation="drelu")
    ffn = FeedForward(config)
    d_ff, d = ffn.w_in.weight.shape
    group = torch.randperm(d_ff) < d_ff // 2  # two groups of up rows pointing opposite ways
    u, v = torch.randn(d), torch.randn(d)
    with torch.no_grad():
        ffn.w_gate.weight.copy_(u + 0.05 * torch.randn(d_ff, d))  # the gate rows tell the neurons apart by noise only
        ffn.w_in.weight.copy_(torch.where(group[:, None], v, -v) + 0.05 * torch.randn(d_ff, d))
    perm = split_layer(ffn, None, 2, d_ff // 2, "cluster", seed=0)
    first = group[perm[: d_ff // 2]]
    assert bool(first.all()) or not bool(first.any())  # each expert is one group of up rows
    # with a ReLU on the gate only, the up rows do not decide firing: the points are the gate rows, as before
    relu = FeedForward(config.replace(activation="relu"))
    assert torch.equal(cluster_points(relu), relu.w_gate.weight)
    points = cluster_points(ffn)
    assert points.shape == (d_ff, 2 * d)
    torch.testing.assert_close(points[:, d:], F.normalize(ffn.w_in.weight, dim=-1), rtol=0, atol=0)


def test_drelu_moe_layers_run_the_torch_kernels():
    """...on CUDA: the Triton kernels have no dReLU; the C++ CPU kernels compute it."""
    from cpmctl.moe import resolve_kernels
    from cpmctl_cpu import build_problem

    assert resolve_kernels("auto", "cuda", "drelu") == "torch"
    assert resolve_kernels("auto", "cpu", "drelu") == ("cpu" if build_problem() is None else "torch")
    assert resolve_kernels("torch", "cuda", "drelu") == "torch"
    with pytest.raises(UserError, match="do not compute the drelu"):
        resolve_kernels("triton", "cuda", "drelu")
