"""Bad Hugging Face input through the CLI: exit 2, one line naming the problem, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cpmctl.cli import app  # noqa: E402
from test_hf_families import build  # noqa: E402

transformers.logging.set_verbosity_error()


def convert(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["convert", "hf", *map(str, args)])
    return result.exit_code, result.output


def assert_refused(tmp_path: Path, src: Path, message: str, *extra) -> None:
    out = tmp_path / "out"
    code, output = convert(src, out, *extra)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], output
    assert not out.exists() and not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


@pytest.fixture
def sharded(tmp_path) -> Path:
    model, _ = build("qwen2", seed=5)
    src = tmp_path / "qwen2-sharded"
    model.save_pretrained(src, max_shard_size="40KB")
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return src


def edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_sharded_import_works(tmp_path, sharded):
    code, output = convert(sharded, tmp_path / "ck")
    assert code == 0, output


def test_unknown_model_type_lists_families(tmp_path, sharded):
    edit_config(sharded, model_type="falcon")
    assert_refused(tmp_path, sharded, "unsupported model_type 'falcon'; supported model types: bert, deepseek_v3, gemma, gemma2, gpt2, llama, mistral, mixtral, mt5, olmoe, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, t5")


def test_missing_shard(tmp_path, sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_refused(tmp_path, sharded, f"names shard {shard.name}, which is missing")


def test_index_names_a_tensor_the_shard_lacks(tmp_path, sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    tensors = load_file(sharded / shard)
    del tensors[name]
    save_file(tensors, sharded / shard, metadata={"format": "pt"})
    assert_refused(tmp_path, sharded, f"places tensor {name} in {shard}, which lacks it")


def test_tensor_of_the_wrong_shape(tmp_path, sharded):
    edit_config(sharded, intermediate_size=80)
    assert_refused(tmp_path, sharded, "model.layers.0.mlp.gate_proj.weight has shape [96, 64], but config.json implies [80, 64]")


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "unsupported rope scaling 'dynamic'"),
    ({"layer_types": ["full_attention", "chunked_attention", "full_attention"]}, "layer type(s) 'chunked_attention'"),
])
def test_unimplemented_config_feature(tmp_path, sharded, changes, message):
    edit_config(sharded, **changes)
    assert_refused(tmp_path, sharded, message)


def test_tensors_the_family_has_no_place_for_are_refused(tmp_path):
    """Qwen3 relabelled as Llama: its q/k norms would be dropped, so nothing is imported."""
    model, _ = build("qwen3", seed=6)
    src = tmp_path / "qwen3-as-llama"
    model.save_pretrained(src)
    edit_config(src, model_type="llama", architectures=["LlamaForCausalLM"])
    assert_refused(tmp_path, src, "HF tensor(s) that cpmctl's llama has no place for: model.layers.0.self_attn.k_norm.weight")
    model, _ = build("qwen2", seed=7)  # and Qwen2's q/k/v biases
    src = tmp_path / "qwen2-as-llama"
    model.save_pretrained(src)
    edit_config(src, model_type="llama", architectures=["LlamaForCausalLM"])
    assert_refused(tmp_path, src, "model.layers.0.self_attn.k_proj.bias")


def test_export_of_a_model_without_hf_form(tmp_path):
    from cpmctl.checkpoint import save_model
    from cpmctl.config import ModelConfig
    from cpmctl.model import build_model

    ck = tmp_path / "moe"
    # a MoEfied router (experts summed with weight 1) is in no Hugging Face MoE family
    save_model(build_model(ModelConfig.from_preset("llama-tiny", moe=dict(experts=4, expert_size=40, router="center"))), ck)
    assert_refused(tmp_path, ck, "cannot export this mixture-of-experts model to Hugging Face: its center router", "--export")
