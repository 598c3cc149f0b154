"""`cpmctl inherit`: width/depth growth, vocabulary expansion and MoE upcycling (cpmctl.growth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from typer.testing import CliRunner

from cpmctl import growth
from cpmctl.cli import app
from cpmctl.checkpoint import load_model, save_model
from cpmctl.config import ModelConfig
from cpmctl.model import build_model
from cpmctl.stages.inherit import InheritConfig, run



# One torch thread: on a small shared machine two spinning OpenMP threads are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb norms and biases away from their init so exactness is not an accident of ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory, sp_tokenizer) -> Path:
    torch.manual_seed(0)
    model = _trained_like(build_model(ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size)))
    root = tmp_path_factory.mktemp("inherit")
    sp_tokenizer.save(root / "tok")
    out = root / "llama"
    save_model(model, out, tokenizer_dir=root / "tok")
    return out


LLAMA_2X = "d_model=128,n_heads=8,n_kv_heads=4,d_ff=320,n_layers=4"


def _logits(path: Path, ids: torch.Tensor, **extra) -> torch.Tensor:
    model, ckpt = load_model(path)
    with torch.no_grad():
        out = model(ids, **extra)
    ckpt.close()
    return out


@pytest.mark.parametrize("method", ["fpi", "tile"])
def test_fpi_and_tile_preserve_the_function_of_an_rms_norm_decoder(llama_ckpt, tmp_path, method):
    out = tmp_path / method
    result = run(InheritConfig(src=llama_ckpt, to=LLAMA_2X, out=out, method=method, verify=True))
    assert result["shape_out"]["d_model"] == 128 and result["shape_out"]["n_layers"] == 4
    assert result["max_logit_diff"] < 1e-5 * max(1.0, result["max_logit"])
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    a, b = _logits(llama_ckpt, ids), _logits(out, ids)
    assert b.shape == a.shape
    torch.testing.assert_close(b, a, atol=2e-5 * float(a.abs().max()), rtol=0)


def test_tile_preserves_an_encoder_decoder_with_relative_bias(tmp_path):
    torch.manual_seed(0)
    src = _trained_like(build_model(ModelConfig.from_preset("t5-tiny")))
    save_model(src, tmp_path / "t5")
    run(InheritConfig(src=tmp_path / "t5", to="d_model=128,n_heads=8,d_ff=256,n_layers=4,n_decoder_layers=4",
                      out=tmp_path / "t5-2x", method="tile"))
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    dec = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(3))
    a, b = _logits(tmp_path / "t5", ids, decoder_input_ids=dec), _logits(tmp_path / "t5-2x", ids, decoder_input_ids=dec)
    torch.testing.assert_close(b, a, atol=2e-5 * float(a.abs().max()), rtol=0)


def test_fpi_copies_heads_and_neurons_at_random_and_divides_inputs(llama_ckpt):
    model, ckpt = load_model(llama_ckpt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.close()
    src = model.config
    new = src.replace(d_model=128, n_heads=8, n_kv_heads=4, d_ff=200)
    grown = growth.grow_state(state, src, new, "fpi", seed=3)
    w_in, w_out = state["decoder.blocks.0.ffn.w_in.weight"], state["decoder.blocks.0.ffn.w_out.weight"]
    g_in, g_out = grown["decoder.blocks.0.ffn.w_in.weight"], grown["decoder.blocks.0.ffn.w_out.weight"]
    # Old neurons keep their index; the residual stream is tiled (128 = 2 x 64).
    torch.testing.assert_close(g_in[:160, :64] * 2, w_in, rtol=0, atol=1e-6)  # input axis d divided by 2 copies
    torch.testing.assert_close(g_in[:160, 64:], g_in[:160, :64], rtol=0, atol=0)
    # Every new neuron j >= 160 copies some old neuron i, and w_out's columns of i's copies sum to the old column.
    for j in range(160, 200):
        matches = [i for i in range(160) if torch.equal(g_in[j], g_in[i])]
        assert matches, f"new neuron {j} is not a copy"
    for i in range(160):
        copies = [j for j in range(200) if torch.equal(g_in[j], g_in[i])]
        torch.testing.assert_close(g_out[:64, copies].sum(1), w_out[:, i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["aki", "stack"])
def test_aki_and_stack_give_the_target_shapes_and_run(llama_ckpt, tmp_path, method):
    out = tmp_path / method
    result = run(InheritConfig(src=llama_ckpt, to=LLAMA_2X, out=out, method=method, verify=True))
    model, ckpt = load_model(out)
    target = ModelConfig.from_preset("llama-tiny", vocab_size=1000).replace(d_model=128, n_heads=8, n_kv_heads=4, d_ff=320, n_layers=4)
    expected = {k: tuple(v.shape) for k, v in build_model(target, device="meta").state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    logits = model(torch.randint(3, 1000, (1, 10)))
    assert torch.isfinite(logits).all()
    ckpt.close()
    assert result["max_logit_diff"] > 1e-3  # not function-preserving, and --verify says so
    src, c2 = load_model(llama_ckpt)
    grown, c3 = load_model(out)
    if method == "stack":  # layer i of the grown model is old layer i mod 2, widened
        for i in range(4):
            assert torch.equal(grown.state_dict()[f"decoder.blocks.{i}.ffn_norm.weight"][:64],
                               src.state_dict()[f"decoder.blocks.{i % 2}.ffn_norm.weight"])
    else:  # AKI: the new neurons of layer 0 come from layer 1
        g_in = grown.state_dict()["decoder.blocks.0.ffn.w_in.weight"]
        old_next = src.state_dict()["decoder.blocks.1.ffn.w_in.weight"]
        old_here = src.state_dict()["decoder.blocks.0.ffn.w_in.weight"]
        for j in range(160, 320):
            row = g_in[j, :64] * 2  # the input axis (d 64 -> 128) is split over 2 copies
            assert any(torch.allclose(row, r, atol=1e-6) for r in old_next)
            assert not any(torch.allclose(row, r, atol=1e-6) for r in old_here)
    c2.close(), c3.close()


def test_depth_growth_inserts_identity_layers_under_fpi(llama_ckpt):
    model, ckpt = load_model(llama_ckpt)
    state = dict(model.state_dict())
    ckpt.close()
    new = model.config.replace(n_layers=4)
    grown = growth.grow_state(state, model.config, new, "fpi")
    assert grown["decoder.blocks.1.attn.o.weight"].abs().max() == 0
    assert grown["decoder.blocks.1.ffn.w_out.weight"].abs().max() == 0
    assert torch.equal(grown["decoder.blocks.2.attn.qkv.weight"], state["decoder.blocks.1.attn.qkv.weight"])
    assert grown["decoder.blocks.2.attn.o.weight"].abs().max() > 0


class FakeTok:
    def __init__(self, pieces, specials=(0,)):
        self.pieces = list(pieces)
        self.vocab_size = len(pieces)
        self.special_ids = set(specials)

    def id_to_token(self, i):
        return self.pieces[i]

    def token_to_id(self, piece):
        return self.pieces.index(piece) if piece in self.pieces else None


def test_vocab_expansion_uses_the_longest_prefix_else_a_random_old_token():
    old = FakeTok(["<pad>", "▁the", "▁th", "ing", "▁a"])
    new = FakeTok(["<pad>", "▁the", "▁thing", "▁thx", "ings", "zzz", "▁a", "▁ab"])
    src, stats = growth.vocab_source_ids(old, new, np.random.default_rng(0))
    assert src[:5].tolist() == [0, 1, 2, 2, 3]  # same, same, "▁th" (longest prefix of "▁thing"), "▁th", "ing"
    assert src[5] in (1, 2, 3, 4)  # no prefix: a random ordinary old token (never a special one)
    assert src[6:].tolist() == [4, 4]
    assert stats == {"same": 3, "prefix": 4, "random": 1}
    emb = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
    out = growth.remap_vocab({"embed.tokens.weight": emb, "lm_head.proj.weight": emb * 2}, src)
    assert torch.equal(out["embed.tokens.weight"], emb[torch.as_tensor(src)])
    assert torch.equal(out["lm_head.proj.weight"], 2 * emb[torch.as_tensor(src)])


def test_vocab_cli_with_a_real_second_tokenizer(llama_ckpt, stdlib_text, tmp_path, sp_tokenizer):
    from cpmctl.tokenizer import load_tokenizer, train_sentencepiece

    new_tok = train_sentencepiece(stdlib_text, tmp_path / "tok1200", 1200)
    result = CliRunner().invoke(app, ["inherit", str(llama_ckpt), str(tmp_path / "v"), "--to", "n_layers=2", "--vocab",
                                      str(tmp_path / "tok1200"), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)["result"]
    assert summary["vocab"]["same"] > 900
    grown, c1 = load_model(tmp_path / "v")
    src, c2 = load_model(llama_ckpt)
    assert grown.config.vocab_size == 1200
    assert load_tokenizer(tmp_path / "v" / "tokenizer").content_hash() == new_tok.content_hash()
    old_emb, new_emb = src.embed.tokens.weight, grown.embed.tokens.weight
    for i in range(1200):  # pieces known to both keep their embedding
        j = sp_tokenizer.token_to_id(new_tok.id_to_token(i))
        if j is not None:
            assert torch.equal(new_emb[i], old_emb[j])
        else:
            assert any(torch.equal(new_emb[i], row) for row in old_emb)
    c1.close(), c2.close()


def test_to_moe_upcycling_equals_the_dense_model(llama_ckpt, tmp_path):
    from cpmctl.moe import MoEFeedForward

    out = tmp_path / "moe"
    result = run(InheritConfig(src=llama_ckpt, to="n_layers=2", out=out, method="fpi", to_moe=4, verify=True))
    assert result["max_logit_diff"] < 1e-5
    model, ckpt = load_model(out)
    assert model.config.moe.experts == 4 and model.config.moe.expert_size == model.config.d_ff and model.config.moe.top_k == 1
    ffn = model.decoder.blocks[0].ffn
    assert isinstance(ffn, MoEFeedForward)
    assert ffn.w_in.shape == (4, 160, 64) and ffn.w_out.shape == (4, 160, 64)
    assert all(torch.equal(ffn.w_in[e], ffn.w_in[0]) for e in range(4))
    router = ffn.router.weight.detach()
    torch.testing.assert_close(router @ router.T, 1e-4 * torch.eye(4), rtol=0, atol=1e-9)  # orthogonal, gain 0.01
    ids = torch.randint(3, 1000, (2, 16))
    torch.testing.assert_close(_logits(out, ids), _logits(llama_ckpt, ids), rtol=0, atol=1e-5)
    ckpt.close()


def test_verify_is_printed_by_the_cli(llama_ckpt, tmp_path):
    result = CliRunner().invoke(app, ["inherit", str(llama_ckpt), str(tmp_path / "g"), "--to", LLAMA_2X, "--method", "tile", "--verify"])
    assert result.exit_code == 0, result.stderr
    line = [l for l in result.stdout.splitlines() if l.startswith("max logit difference:")][0]
    assert float(line.split()[3]) < 1e-5


@pytest.mark.parametrize("args, message", [
    (["--to", "d_model=32"], "only grows"),
    (["--to", "d_model=96,n_heads=6,n_kv_heads=3", "--method", "tile"], "multiple"),
    (["--to", "llama-tiny", "--method", "nope"], "unknown method"),
    (["--to", "bert-tiny"], "cannot grow"),
    (["--to", "n_layers=4", "--to-moe", "0"], "at least 1 expert"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(llama_ckpt, tmp_path, args, message):
    out = tmp_path / "bad"
    result = CliRunner().invoke(app, ["inherit", str(llama_ckpt), str(out), *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not out.exists() and not any(p.name.startswith(".bad") for p in tmp_path.iterdir())
