"""cpmctl's own MoEs exported to the nearest Hugging Face family that computes the same function:
a random top-2 MoE and `inherit --to-moe` output as Mixtral, one with q/k norms and dense layers
as Qwen3-MoE,
logits within 1e-5 of transformers' on the export; a model no family can express (a MoEfied
router, Qwen2's biased attention without a shared expert) is exit 2 with the reason, nothing
written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_hf_families import VOCAB, save_hf  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cpmctl import hf  # noqa: E402
from cpmctl.checkpoint import load_model, open_checkpoint, save_model  # noqa: E402
from cpmctl.cli import app  # noqa: E402
from cpmctl.config import ModelConfig  # noqa: E402
from cpmctl.model import build_model  # noqa: E402

transformers.logging.set_verbosity_error()
TOL = 1e-5


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@torch.no_grad()
def randomize_ours(model):
    gen = torch.Generator().manual_seed(11)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.2 * noise if "norm" in name else noise / p.shape[-1] ** 0.5)
    return model.eval()


def assert_exports_as(ck: Path, out: Path, family: str) -> None:
    result = cli("convert", "hf", ck, out, "--export")
    assert result.exit_code == 0, result.output
    ours, handle = load_model(ck)
    handle.close()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.model_type == family
    ids = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert float((back(input_ids=ids).logits - ours(ids)).abs().max()) <= TOL


def test_own_top2_moe_exports_as_mixtral(tmp_path):
    config = ModelConfig.from_preset("llama-tiny", moe=dict(experts=4, expert_size=40, top_k=2))
    torch.manual_seed(0)
    ck = tmp_path / "moe"
    save_model(randomize_ours(build_model(config)), ck)
    assert_exports_as(ck, tmp_path / "hf", "mixtral")


def test_own_moe_with_qk_norm_and_dense_layers_exports_as_qwen3_moe(tmp_path):
    # Mixtral has no q/k norm and no dense layers; Qwen3-MoE has both (mlp_only_layers)
    config = ModelConfig.from_preset("llama-tiny", n_layers=3, qk_norm=True, norm_eps=1e-6,
                                     moe=dict(experts=6, expert_size=24, top_k=3, layers=["decoder.0", "decoder.2"]))
    torch.manual_seed(0)
    ck = tmp_path / "moe"
    save_model(randomize_ours(build_model(config)), ck)
    assert_exports_as(ck, tmp_path / "hf", "qwen3_moe")


def test_inherit_to_moe_exports_as_mixtral(tmp_path):
    _, src = save_hf("llama", tmp_path)
    dense = hf.import_hf(src, tmp_path / "dense")
    up = tmp_path / "up"
    result = cli("inherit", dense, up, "--to", "n_layers=3", "--to-moe", "4")
    assert result.exit_code == 0, result.output
    # the upcycled experts are copies: make them differ, so the routing decides the output
    model, handle = load_model(up)
    handle.close()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if ".ffn." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    save_model(model, tmp_path / "up2")
    assert_exports_as(tmp_path / "up2", tmp_path / "hf", "mixtral")


def refused(ck: Path, out: Path, message: str) -> None:
    result = cli("convert", "hf", ck, out, "--export")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def test_moefied_model_is_refused_with_the_reason(tmp_path):
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    save_model(build_model(ModelConfig.from_preset("llama-tiny", vocab_size=VOCAB)), dense)
    moe = tmp_path / "moefied"
    result = cli("moefy", dense, moe, "--experts", "4", "--router", "center", "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert open_checkpoint(moe).config.moe.router == "center"
    refused(moe, tmp_path / "hf", "its center router scores the normalised input against expert centres and sums the chosen experts with weight 1")


def test_upcycled_qwen2_has_no_family(tmp_path):
    _, src = save_hf("qwen2", tmp_path)
    dense = hf.import_hf(src, tmp_path / "dense")
    up = tmp_path / "up"
    assert cli("inherit", dense, up, "--to", "n_layers=3", "--to-moe", "2").exit_code == 0
    refused(up, tmp_path / "hf", "cannot export this model as Hugging Face mixtral: it cannot represent qkv_bias=True")
