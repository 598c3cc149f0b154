"""cpmctl's stages on imported current-family models (small and fast): moefy on Gemma's gated
GELU FFNs, prompt-tune, distill, `inherit --to-moe` and `infer --offload` on a Qwen2- or
Gemma-style import, each checked for its result, not just that it ran."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

from cpmctl import hf  # noqa: E402
from cpmctl.checkpoint import load_model, open_checkpoint  # noqa: E402
from cpmctl.cli import app  # noqa: E402
from test_hf_families import WORDS, save_hf  # noqa: E402

transformers.logging.set_verbosity_error()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-stages")
    return {name: hf.import_hf(save_hf(name, root, seed=11)[1], root / f"{name}-ck") for name in ("qwen2", "gemma")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) + "\n" for _ in range(200)))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """Label is whether the text holds w5: learnable from the words alone."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("task") / "train.jsonl"
    rows = []
    for i in range(32):
        words = [rng.choice(WORDS[8:]) for _ in range(6)]
        if i % 2:
            words[rng.randrange(6)] = "w5"
        rows.append({"text": " ".join(words), "label": "w1" if i % 2 else "w2"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_moefy_gated_gelu_gemma(imported, corpus, tmp_path):
    out = tmp_path / "moe"
    result = cli("moefy", imported["gemma"], out, "--experts", "4", "--data", corpus, "--max-docs", "150", "--eval-docs", "50")
    assert result.exit_code == 0, result.output
    with open_checkpoint(out) as ck:
        assert ck.config.moe.experts == 4 and ck.config.norm_offset == 1.0 and ck.config.scale_embeddings
    # with every expert active the MoE model computes the dense one exactly (up to float order)
    dense, h = load_model(imported["gemma"])
    h.close()
    moe, h = load_model(out)
    h.close()
    for module in moe.modules():
        if hasattr(module, "top_k"):
            module.top_k = 4
    ids = torch.randint(4, 96, (2, 12))
    with torch.inference_mode():
        assert float((dense(ids) - moe(ids)).abs().max()) < 1e-4
    back = tmp_path / "back"
    assert cli("moefy", out, back, "--restore").exit_code == 0
    assert hf.export_family(open_checkpoint(back).config) == "gemma"


def test_inherit_to_moe_qwen2(imported, tmp_path):
    out = tmp_path / "up"
    result = cli("inherit", imported["qwen2"], out, "--to", "n_layers=3", "--to-moe", "2")
    assert result.exit_code == 0, result.output
    dense, h = load_model(imported["qwen2"])
    h.close()
    moe, h = load_model(out)
    h.close()
    assert moe.config.moe.experts == 2 and moe.config.qkv_bias
    ids = torch.randint(4, 96, (2, 9))
    with torch.inference_mode():  # upcycled copies of the dense FFN: the same function
        assert float((dense(ids) - moe(ids)).abs().max()) < 1e-4


def test_infer_offload_qwen2(imported, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "w5 w6 w7"}\n{"text": "w9"}\n')
    base = ["infer", imported["qwen2"], "--input", prompts, "--max-new-tokens", "6", "--json"]
    plain = cli(*base)
    off = cli(*base, "--offload", "disk", "--memory-budget", "60%")
    assert plain.exit_code == 0 and off.exit_code == 0, (plain.output, off.output)
    assert [o["generated"] for o in json.loads(off.stdout)["result"]["outputs"]] == [o["generated"] for o in json.loads(plain.stdout)["result"]["outputs"]]
    assert json.loads(off.stdout)["result"]["stats"]["offload"]["bytes_moved"] > 0


def test_prompt_tune_qwen2(imported, task, tmp_path):
    out = tmp_path / "prompt"
    result = cli("prompt-tune", imported["qwen2"], out, "--train", task, "--prompt-length", "4", "--max-steps", "4", "--json")
    assert result.exit_code == 0, result.output
    with open_checkpoint(imported["qwen2"]) as ck:
        d = ck.config.d_model
    from safetensors.torch import load_file

    assert load_file(out / "adapter_model.safetensors")["prompt_embeddings"].shape == (4, d)
    classified = cli("infer", imported["qwen2"], "--prompt", out, "--input", task, "--json")
    assert classified.exit_code == 0, classified.output
    assert json.loads(classified.stdout)["result"]["stats"]["examples"] == 32


def test_distill_gemma(imported, task, tmp_path):
    out = tmp_path / "student"
    result = cli("distill", out, "--teacher", imported["gemma"], "--train", task, "--head", "lm", "--student-layers", 1,
                 "--max-steps", 2, "--batch-size", 8, "--max-length", 16)
    assert result.exit_code == 0, result.output
    student = next(p for p in out.rglob("config.json") if (p.parent / "cpmctl.json").exists()).parent
    with open_checkpoint(student) as ck:
        assert ck.config.n_layers == 1 and ck.config.norm_offset == 1.0 and ck.config.scale_embeddings


def test_peft_loads_the_adapter_of_an_imported_model(imported, task, tmp_path, caplog, recwarn):
    """AutoPeftModelForCausalLM.from_pretrained(ADAPTER) finds the base model by itself, warns about
    nothing in adapter_config.json, and predicts the labels cpmctl predicts."""
    peft = pytest.importorskip("peft")
    out = tmp_path / "prompt"
    assert cli("prompt-tune", imported["qwen2"], out, "--train", task, "--prompt-length", "4", "--max-steps", "4").exit_code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert "cpmctl" not in config and (out / "cpmctl_adapter.json").is_file()
    assert (Path(config["base_model_name_or_path"]) / "config.json").is_file()
    import logging

    with caplog.at_level(logging.WARNING):
        model = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
    assert "Unexpected keyword" not in caplog.text and not [w for w in recwarn if "Unexpected" in str(w.message)]
    ours = json.loads(cli("infer", imported["qwen2"], "--prompt", out, "--input", task, "--json").stdout)["result"]["outputs"]
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(imported["qwen2"] / "tokenizer")
    labels = {"w1": tok.token_to_id("w1"), "w2": tok.token_to_id("w2")}
    rows = [json.loads(line) for line in task.read_text().splitlines()]
    with torch.inference_mode():
        for row, o in zip(rows, ours):
            ids = torch.tensor([[1, *tok.encode(row["text"])]])
            last = model(input_ids=ids).logits[0, -1]
            assert max(labels, key=lambda k: float(last[labels[k]])) == o["label"], (row, o)
