"""`--dry-run`: plans against really built models, the configs real runs write, the documented
memory formulas and the offload engine's arithmetic; dry runs load and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpmctl.checkpoint import open_checkpoint, save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.model import build_model
from cpmctl.plan import (checkpoint_config, is_assumed, layer_activation_bytes, optimizer_state_bytes,
                         plan_to_dict, training_memory)
from cpmctl.stages import distill as distill_stage
from cpmctl.stages import infer as infer_stage
from cpmctl.stages import inherit as inherit_stage
from cpmctl.stages import moefy as moefy_stage
from cpmctl.stages import pretrain as pretrain_stage
from cpmctl.stages import prompt_tune as prompt_stage

RUNNER = CliRunner()
MOE = dict(experts=8, expert_size=16, top_k=2)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_moe() -> ModelConfig:
    return ModelConfig(arch="decoder", vocab_size=96, d_model=32, n_heads=4, d_ff=128, n_layers=3, norm="rms",
                       position="rotary", max_positions=64, activation="silu", gated=True, bias=False, eos_token_id=None,
                       moe=MOE, init_std=0.2)


def one_line_error(result, needle: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, sp_tokenizer) -> Path:
    return sp_tokenizer.save(tmp_path_factory.mktemp("plan") / "tok")


# -- parameters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [ModelConfig.from_preset("t5-tiny"), ModelConfig.from_preset("bert-tiny"),
                                    ModelConfig.from_preset("llama-tiny"), tiny_moe()],
                         ids=["encoder-decoder", "encoder", "decoder", "moe"])
def test_parameters_equal_a_really_built_model(tmp_path, config):
    torch.manual_seed(0)
    real = sum(p.numel() for p in build_model(config).parameters())
    plan = infer_stage.plan(infer_stage.InferConfig(checkpoint=tmp_path / "m", texts=["x"], dtype="bfloat16"), stand_ins={tmp_path / "m": config})
    assert plan.parameters == real and plan.parameter_bytes == 2 * real and plan.trainable == 0


def test_real_scale_matches_cpmctl_info(tmp_path):
    from cpmctl.report import describe_preset

    dense, moe = describe_preset("cpm2-11b"), describe_preset("cpm2-moe-198b")
    cfg = pretrain_stage.PretrainConfig(out=tmp_path / "run", data=tmp_path / "shards", preset="cpm2-11b",
                                        tokenizer=tmp_path / "tok")
    plan = pretrain_stage.plan(cfg)
    assert plan.parameters == dense["parameters"]["total"] and plan.parameter_bytes == dense["estimated_bytes"]["float32"]
    assert plan.output_config == ModelConfig.from_preset("cpm2-11b") and any("tok" in n for n in plan.notes)
    plan = infer_stage.plan(infer_stage.InferConfig(checkpoint=tmp_path / "moe", texts=["x"], dtype="bfloat16"), stand_ins={tmp_path / "moe": ModelConfig.from_preset("cpm2-moe-198b")})
    assert plan.parameters == moe["parameters"]["total"] and plan.parameter_bytes == moe["estimated_bytes"]["bfloat16"]
    assert not (tmp_path / "run").exists()


# -- memory formulas ------------------------------------------------------------------------------------
def test_memory_formulas_by_hand():
    shapes = [(3, 5), (7,), (2, 3, 5)]
    assert optimizer_state_bytes(shapes, "adamw") == 8 * (15 + 7 + 30)
    # Adafactor: rows + columns of matrices (per leading index), full vectors, fp32.
    assert optimizer_state_bytes(shapes, "adafactor") == 4 * ((3 + 5) + 7 + (6 + 10))
    # s=4, b=2, h=8, a=2: 4*2*8*(34 + 5*2*4/8) = 64 * 39 bytes at 16-bit, twice that at fp32.
    assert layer_activation_bytes(4, 2, 8, 2) == 2496 and layer_activation_bytes(4, 2, 8, 2, 4) == 4992
    ddp = training_memory(weights=1001, trainable_shapes=[(10, 10)], optimizer="adamw", devices=4, sharding="ddp")
    fsdp = training_memory(weights=1001, trainable_shapes=[(10, 10)], optimizer="adamw", devices=4, sharding="fsdp")
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (1001, 400, 800)
    assert (fsdp["weights"], fsdp["gradients"], fsdp["optimizer"]) == (251, 100, 200)


def test_checkpointed_activations_keep_layer_inputs_and_one_layer():
    from cpmctl.plan import activation_bytes, checkpointed_activation_bytes

    config = ModelConfig.from_preset("t5-tiny")  # 2 + 2 layers, d 64, 4 heads
    seq = {"encoder": 16, "decoder": 8}
    full = activation_bytes(config, 3, seq, 2)
    assert full == 2 * layer_activation_bytes(16, 3, 64, 4, 2) + 2 * layer_activation_bytes(8, 3, 64, 4, 2)
    kept = 2 * 16 * 3 * 64 * 2 + 2 * 8 * 3 * 64 * 2  # each layer application's input, 16-bit
    assert checkpointed_activation_bytes(config, 3, seq, 2) == kept + layer_activation_bytes(16, 3, 64, 4, 2)
    assert checkpointed_activation_bytes(config, 3, seq, 2) < full


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_pretrain_plan_breakdown_follows_the_formulas(tmp_path, optimizer):
    cfg = pretrain_stage.PretrainConfig(out=tmp_path / "run", data=tmp_path / "shards", preset="llama-tiny",
                                        tokenizer=tmp_path / "tok", optimizer=optimizer, batch_size=8, seq_len=16)
    ddp = pretrain_stage.plan(cfg, devices=2, sharding="ddp")
    fsdp = pretrain_stage.plan(cfg, devices=2, sharding="fsdp")
    model = build_model(ModelConfig.from_preset("llama-tiny"))
    n = sum(p.numel() for p in model.parameters())
    if optimizer == "adamw":
        opt = 8 * n
    else:
        opt = sum(4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else 4 * p.numel() for p in model.parameters())
    b = ddp.memory_breakdown
    assert (b["weights"], b["gradients"], b["optimizer"]) == (4 * n, 4 * n, opt)
    assert (fsdp.memory_breakdown["weights"], fsdp.memory_breakdown["optimizer"]) == (2 * n, opt // 2)
    c = model.config  # 4 rows per device of 16 tokens, fp32, every layer
    assert b["activations"] == c.n_layers * 16 * 4 * (34 * c.d_model + 5 * c.n_heads * 16) * 2
    assert b["logits"] == 4 * 16 * c.vocab_size * 4
    assert ddp.memory_per_device == sum(b.values()) and ddp.tokens == cfg.max_steps * 8 * 16 and ddp.devices == 2
    with pytest.raises(UserError, match="does not split over 3"):
        pretrain_stage.plan(cfg, devices=3)


# -- the configs real runs write ----------------------------------------------------------------------
def _config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_inherit_and_moefy_dry_runs_predict_the_written_config(tmp_path):
    torch.manual_seed(0)
    save_model(build_model(ModelConfig.from_preset("t5-tiny")), tmp_path / "src")
    grow = inherit_stage.InheritConfig(src=tmp_path / "src", to="d_model=128,n_heads=8,d_ff=256,n_layers=3", out=tmp_path / "big",
                                       to_moe=4)
    predicted = inherit_stage.plan(grow)
    inherit_stage.run(grow)
    assert predicted.output_config.to_dict() == _config_json(tmp_path / "big")
    assert predicted.parameters == open_checkpoint(tmp_path / "big").num_parameters()

    split = moefy_stage.MoefyConfig(checkpoint=tmp_path / "src", out=tmp_path / "moe", experts=4, router="center",
                                    top_k=2, layers=["encoder.1", "decoder.0"])
    predicted = moefy_stage.plan(split)
    moefy_stage.run(split)
    assert predicted.output_config.to_dict() == _config_json(tmp_path / "moe")
    back = moefy_stage.MoefyConfig(checkpoint=tmp_path / "moe", out=tmp_path / "dense", restore=True)
    predicted = moefy_stage.plan(back)
    moefy_stage.run(back)
    assert predicted.output_config.to_dict() == _config_json(tmp_path / "dense")


def test_pretrain_dry_run_predicts_the_written_config(tmp_path, tok_dir, stdlib_text, sp_tokenizer):
    from cpmctl.data import prepare

    prepare(stdlib_text, sp_tokenizer, tmp_path / "shards", progress=False)
    cfg = pretrain_stage.PretrainConfig(out=tmp_path / "run", data=tmp_path / "shards", preset="llama-tiny", tokenizer=tok_dir,
                                        model={"d_model": 32, "n_layers": 1}, seq_len=16, batch_size=4, max_steps=2,
                                        eval_batches=1, progress=False, share_layers=True)
    predicted = pretrain_stage.plan(cfg)
    summary = pretrain_stage.run(cfg)
    assert predicted.output_config.to_dict() == _config_json(tmp_path / "run" / "checkpoint")
    assert predicted.tokens == summary["tokens"] and predicted.steps == summary["steps"]


def test_distill_student_configs_match_the_builders():
    from cpmctl import distill

    teacher = ModelConfig.from_preset("bert-tiny", vocab_size=777)
    preset_cfg = distill_stage.DistillConfig(teacher=Path("tb"), out=Path("o"), train=Path("t.jsonl"), student_config="bert-tiny")
    preset_plan = distill_stage.plan(preset_cfg, stand_ins={Path("tb"): teacher})
    assert preset_plan.output_config.vocab_size == 777  # the teacher's vocabulary, not the preset's 512
    assert preset_plan.output_config == distill.student_from_preset("bert-tiny", teacher).config
    cfg = distill_stage.DistillConfig(teacher=Path("t"), out=Path("o"), data=Path("c"), student_layers="1")
    plan = distill_stage.plan(cfg, stand_ins={Path("t"): ModelConfig.from_preset("llama-tiny")})
    torch.manual_seed(0)
    real = distill.student_from_teacher(build_model(ModelConfig.from_preset("llama-tiny")), [1])
    assert plan.output_config == real.config and plan.parameters == sum(p.numel() for p in real.parameters())
    assert plan.memory_breakdown["teacher"] == 4 * sum(p.numel() for p in build_model(ModelConfig.from_preset("llama-tiny")).parameters())
    # A run directory an earlier step will write stands in through its OUT/checkpoint, as the real run resolves it.
    run_dir = {Path("run") / "checkpoint": ModelConfig.from_preset("llama-tiny")}
    assert distill_stage.plan(distill_stage.DistillConfig(teacher=Path("run"), out=Path("o"), data=Path("c"), student_layers="1"),
                              stand_ins=run_dir).output_config == real.config


def test_prompt_tune_trains_the_prompt_and_head_only(tmp_path):
    config = ModelConfig.from_preset("t5-tiny")
    cfg = prompt_stage.PromptTuneConfig(model=tmp_path / "m", train=tmp_path / "train.jsonl", out=tmp_path / "adapter",
                                        prompt_length=10, deep=True, head="linear", max_length=32)
    plan = prompt_stage.plan(cfg, stand_ins={tmp_path / "m": config})
    deep = 10 * config.d_model * config.n_layers  # the prompt and a delta at each later encoder layer
    assert plan.trainable == deep + (config.d_model * 2 + 2)  # + a linear head for the 2 assumed classes
    assert plan.memory_breakdown["optimizer"] == optimizer_state_bytes(
        [(10, config.d_model), (config.n_layers - 1, 10, config.d_model), (2, config.d_model), (2,)], "adafactor")


# -- offload arithmetic ----------------------------------------------------------------------------------
def test_infer_offload_dry_run_equals_plan_offload(tmp_path, tok_dir):
    from cpmctl.offload import plan_offload, stored_tensors

    torch.manual_seed(0)
    save_model(build_model(tiny_moe()), tmp_path / "m", tokenizer_dir=tok_dir)

    def engine_numbers(dtype):
        with open_checkpoint(tmp_path / "m") as ckpt:
            model = build_model(ckpt.config, device="meta")
            total = sum(t.numel() for t in model.state_dict().values()) * dtype.itemsize
            p = plan_offload(model, stored_tensors(ckpt, model.state_dict()), mode="disk", budget=int(total * 0.97), dtype=dtype, device=torch.device("cpu"))
        a = p.arithmetic
        return {"resident_bytes": a.resident_bytes, "slot_bytes": a.slot_bytes, "slots": p.slots, "units": len(p.units),
                "minimum": a.minimum, "unit": p.unit_kind}

    def dry(dtype=None):
        cfg = infer_stage.InferConfig(checkpoint=tmp_path / "m", texts=["x"], offload="disk", memory_budget="97%", dtype=dtype)
        return infer_stage.plan(cfg).details["slot_arithmetic"]

    fp32, bf16 = engine_numbers(torch.float32), engine_numbers(torch.bfloat16)
    assert dry() == fp32 and dry("bfloat16") == bf16 and 0 < fp32["slots"] < fp32["units"]
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()  # config only: the converted run (aligned slots, a staging buffer) is exact still
    assert dry("bfloat16") == bf16


# -- nothing loaded, nothing written; the CLI --------------------------------------------------------------
def test_dry_runs_through_the_cli_load_and_write_nothing(tmp_path, tok_dir):
    torch.manual_seed(0)
    save_model(build_model(ModelConfig.from_preset("t5-tiny", vocab_size=1000)), tmp_path / "m", tokenizer_dir=tok_dir)
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()  # only config.json (and the tokenizer) left: a dry run must not need the weights
    m, out = str(tmp_path / "m"), tmp_path / "out"
    span_recipe = tmp_path / "span.toml"
    span_recipe.write_text('seq_len = 64\nbatch_size = 8\noptimizer = "adafactor"\nlr = 1e-2\nmax_steps = 10\n')
    commands = [
        ["infer", m, "some text", "--dry-run"],
        ["inherit", m, str(out), "--to", "d_model=128,n_heads=8", "--to-moe", "2", "--dry-run", "--json"],
        ["moefy", m, str(out), "--experts", "8", "--router", "center", "--dry-run"],
        ["prompt-tune", m, str(out), "--train", str(tmp_path / "train.jsonl"), "--dry-run"],
        ["distill", str(out), "--teacher", m, "--train", str(tmp_path / "train.jsonl"), "--max-steps", "5", "--dry-run"],
        ["pretrain", str(span_recipe), str(out), "--init", m, "--data", str(tmp_path / "shards"), "--dry-run",
         "--devices", "2", "--sharding", "fsdp"],
    ]
    for args in commands:
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert "dry run (nothing loaded or written)" in result.stdout or '"stage"' in result.stdout
        assert not out.exists()
    data = json.loads(RUNNER.invoke(app, commands[1]).stdout)
    assert set(data) == {"command", "result"} and data["command"] == "inherit"
    data = data["result"]
    assert data["output_config"]["moe"]["experts"] == 2 and data["stage"] == "inherit"

    one_line_error(RUNNER.invoke(app, ["moefy", m, str(out), "--experts", "3", "--router", "center", "--dry-run"]), "does not split evenly")
    one_line_error(RUNNER.invoke(app, ["infer", m, "x", "--dry-run", "--offload", "disk", "--memory-budget", "1kB"]),
                   "below this model's minimum")
    one_line_error(RUNNER.invoke(app, ["infer", str(tmp_path / "nothing"), "x", "--dry-run"]), "not a cpmctl checkpoint")
    one_line_error(RUNNER.invoke(app, commands[-1][:-1] + ["zero"]), "unknown --sharding 'zero'")
    assert not out.exists()


def test_the_command_table_plans_with_stand_ins(tmp_path):
    from cpmctl.commands import find

    command = find("infer")
    cfg = infer_stage.InferConfig(checkpoint=tmp_path / "m", texts=["x"], max_new_tokens=4)
    plan = command.plan(cfg, stand_ins={tmp_path / "m": tiny_moe()})
    assert plan.stage == "infer" and plan.tokens == 4 and plan_to_dict(plan)["memory_breakdown"]["kv_cache"] > 0
    with pytest.raises(UserError, match="not a cpmctl checkpoint"):
        command.plan(cfg)  # no stand-in: the checkpoint is not there


def test_stand_ins_serve_only_the_plans_they_are_given_to(tmp_path, monkeypatch):
    config = ModelConfig.from_preset("llama-tiny")
    monkeypatch.chdir(tmp_path)
    stand_ins = {Path("later/ckpt"): config, tmp_path / "other": ModelConfig.from_preset("t5-tiny")}
    assert checkpoint_config(tmp_path / "later" / "ckpt", stand_ins) is config  # relative and absolute: one path
    assert checkpoint_config("other", stand_ins).arch == "encoder-decoder"
    assert is_assumed("later/ckpt", stand_ins) and not is_assumed("later/ckpt")
    with pytest.raises(UserError, match=r"ckpt is not a cpmctl checkpoint \(no config.json\)"):
        checkpoint_config("later/ckpt")
    save_model(build_model(config), tmp_path / "real")
    assert checkpoint_config(tmp_path / "real", {tmp_path / "real": ModelConfig.from_preset("t5-tiny")}) == config  # a real config.json wins
    assert not is_assumed(tmp_path / "real", {tmp_path / "real": config})
