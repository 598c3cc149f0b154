"""`cpmctl infer --dry-run --offload` from a Hugging Face config.json alone (meta device, no
weights) for the released Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 configs (test fixtures,
copied from the published config.json files; DeepSeek-V3's without its fp8 quantization_config,
i.e. as dequantized to bfloat16). Checked against arithmetic done here: the published parameter
counts, one expert's bytes, the expected expert bytes per token at the budget and the
transfer-bound tokens/s at --bandwidth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpmctl.cli import app

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
GB = 10**9

# fixture -> (parameters, hidden size, expert width, experts per layer, top-k, MoE layers)
MODELS = {
    "mixtral-8x7b": (46_702_792_704, 4096, 14336, 8, 2, 32),
    "qwen3-30b-a3b": (30_532_122_624, 2048, 768, 128, 8, 48),
    "deepseek-v3-bf16": (671_026_404_352, 7168, 2048, 256, 8, 58),
}


def dry_run(path: Path, *extra: str):
    return CliRunner().invoke(app, ["infer", str(path), "hello", "--dry-run", "--device", "cpu", "--json", *extra])


@pytest.mark.parametrize("name", list(MODELS))
def test_dry_run_offload_from_config_json_alone(name):
    parameters, d, d_e, experts, k, layers = MODELS[name]
    result = dry_run(FIXTURES / name, "--offload", "disk", "--memory-budget", "25%", "--bandwidth", "3GB/s")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["result"]
    assert plan["parameters"] == parameters
    slots = plan["details"]["slot_arithmetic"]
    expert_bytes = 3 * d * d_e * 2  # gate, up and down in bfloat16, a whole number of 64-byte lines already
    assert slots["slot_bytes"] == expert_bytes and slots["units"] == experts * layers
    budget = parameters * 2 // 4
    assert slots["slots"] == (budget - slots["resident_bytes"]) // expert_bytes
    assert plan["memory_breakdown"]["resident"] == slots["resident_bytes"]
    expected = round(k * layers * expert_bytes * (1 - slots["slots"] / slots["units"]))
    assert plan["details"]["expert_bytes_per_token"] == expected
    assert plan["details"]["transfer_bound_tokens_per_s"] == round(3 * GB / expected, 4)


def test_deepseek_latent_cache_is_counted_as_latent():
    plain = json.loads(dry_run(FIXTURES / "deepseek-v3-bf16", "--max-new-tokens", "0").stdout)["result"]
    with_tokens = json.loads(dry_run(FIXTURES / "deepseek-v3-bf16", "--max-new-tokens", "16").stdout)["result"]
    # (kv_lora_rank 512 + rope 64) x 2 bytes x 61 layers per position, 163840 + 16 positions
    assert plain["memory_breakdown"].get("kv_cache", 0) == 0
    assert with_tokens["memory_breakdown"]["kv_cache"] == (512 + 64) * 2 * 61 * (163840 + 16)


def test_fp8_deepseek_and_bad_bandwidth_are_one_line_errors(tmp_path):
    fp8 = tmp_path / "deepseek-v3"
    shutil.copytree(FIXTURES / "deepseek-v3-bf16", fp8)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    for path, extra, needle in [
        (fp8, ["--offload", "disk", "--memory-budget", "25%"], "quantization_config (quant_method='fp8')"),
        (FIXTURES / "mixtral-8x7b", ["--offload", "disk", "--memory-budget", "25%", "--bandwidth", "fast"], "--bandwidth fast"),
        (FIXTURES / "mixtral-8x7b", ["--bandwidth", "3GB/s"], "--bandwidth needs --offload"),
    ]:
        result = dry_run(path, *extra)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
