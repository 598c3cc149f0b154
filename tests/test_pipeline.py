"""`cpmctl run`: pipeline recipes, every recipe in recipes/ checked by a dry run of the commands
its header gives, the real-scale plans' figures, and a launched (multi-process) step."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpmctl import pipeline
from cpmctl.checkpoint import save_model
from cpmctl.cli import app, parse_command_line
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.model import build_model
from cpmctl.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RUNNER = CliRunner()
GiB = 2**30
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_line_error(result, needle: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output


def header_commands(path: Path) -> list[list[str]]:
    """The cpmctl commands of a recipe's leading comment: the first runs the recipe, the others
    (if any) are what it needs first."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s+(cpmctl .*)$", line)
        if match:
            commands.append(shlex.split(match.group(1).split("  #")[0])[1:])
    return commands


# -- every recipe ------------------------------------------------------------------------------------
# Single-stage recipes that read what another recipe writes come after it.
ORDER = ["demo.toml", "pretrain-llama-small.toml", "ki-llama.toml"]


def recipe_files() -> list[Path]:
    files = sorted(RECIPES.glob("*.toml"), key=lambda p: (ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name))
    return files


def test_every_recipe_is_headed_by_its_command_and_dry_runs(tmp_path, monkeypatch):
    """Each recipe's header commands, prerequisites first, run with --dry-run: options valid, models
    built on the meta device, memory estimated; no weights anywhere. Outputs one recipe plans
    (runs/llama-small/checkpoint) stand in for the next recipe's inputs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(RECIPES)
    stand_ins: dict[Path, ModelConfig] = {}
    checked = []
    for recipe in recipe_files():
        commands = header_commands(recipe)
        assert commands, f"{recipe.name} does not start with the command that runs it"
        assert str(Path("recipes") / recipe.name) in commands[0], f"{recipe.name}: its first command must run it"
        for argv in commands[1:] + commands[:1]:
            command, cfg, launch, _ = parse_command_line(argv)  # options parsed and checked as the CLI does
            if command.plan is None:
                continue
            launch_options = dataclasses.asdict(launch) if launch is not None else {}
            result = command.plan(cfg, stand_ins=stand_ins, **launch_options)
            plans = [r["plan"] for r in result if r["plan"]] if isinstance(result, list) else [result]
            assert plans and all(plans), f"{recipe.name}: {argv} planned nothing"
            for plan in plans:
                if isinstance(plan, Plan) and plan.output is not None and plan.output_config is not None:
                    stand_ins[Path(plan.output)] = plan.output_config
            checked.append(recipe.name)
    assert not (tmp_path / "runs").exists(), "a dry run wrote something"
    assert set(checked) == {p.name for p in recipe_files()}


def dry_run_plans(recipe: str) -> dict[str, dict]:
    rows = pipeline.dry_run_pipeline(pipeline.load_pipeline(RECIPES / recipe, Path("runs/x")), Path("runs/x"))
    return {row["step"]: row["plan"] for row in rows}


def test_cpm2_11b_ki_fits_eight_80gb_gpus_with_fsdp():
    plans = dry_run_plans("cpm2-11b-ki.toml")
    grow, train = plans["grow"], plans["ki-pretrain"]
    assert grow["parameters"] == 11_087_097_856 and grow["output_config"]["d_model"] == 4096  # the grown model
    assert train["parameters"] == 11_087_097_856 and train["devices"] == 8
    assert train["memory_breakdown"]["teacher"] == 2_825_639_936 * 4  # a whole float32 teacher per GPU
    # FSDP: each GPU holds 1/8 of the float32 weights and gradients
    assert train["memory_breakdown"]["weights"] == math.ceil(11_087_097_856 * 4 / 8)
    assert train["memory_per_device"] < 80 * 10**9
    # 100k steps x 64 micro-batches x 16 rows x (512 encoder + 114 decoder positions)
    assert train["tokens"] == 100_000 * 64 * 16 * (512 + 114)


def test_cpm2_moe_upcycle_is_198b_and_fits_64_gpus():
    plans = dry_run_plans("cpm2-moe-upcycle.toml")
    moe = plans["upcycle"]["output_config"]["moe"]
    assert (moe["experts"], moe["top_k"]) == (32, 1)
    assert plans["moe-pretrain"]["parameters"] == 198_327_119_872
    assert plans["moe-pretrain"]["devices"] == 64 and plans["moe-pretrain"]["memory_per_device"] < 80 * 10**9


def test_prompt_tuning_11b_trains_0_0037_percent_on_one_gpu():
    plan = dry_run_plans("prompt-tune-cpm2-11b.toml")["prompt-tune"]
    assert plan["trainable"] == 100 * 4096  # 409.6K, as in the CPM-2 paper
    assert round(100 * plan["trainable"] / plan["parameters"], 4) == 0.0037
    assert plan["devices"] == 1 and plan["memory_per_device"] < 80 * 10**9


def test_moefy_llama2_7b_plan():
    plan = dry_run_plans("moefy-llama2-7b.toml")["moefy"]
    assert plan["parameters"] == 6_738_415_616
    moe = plan["output_config"]["moe"]
    assert (moe["experts"], moe["expert_size"], moe["top_k"]) == (344, 32, 69)


def test_198b_offload_memory_arithmetic():
    plan = dry_run_plans("infer-cpm2-moe-198b-offload.toml")["generate"]
    expert = 3 * 4096 * 10240 * 2
    experts = 48 * 32 * expert
    total = 198_327_119_872 * 2
    assert plan["parameter_bytes"] == total
    resident = plan["memory_breakdown"]["resident"]
    assert resident == total - experts  # all but the experts, bf16
    slots = plan["memory_breakdown"]["offload slots"] // expert
    assert slots == (60 * GiB - resident) // expert == 215  # the recipe's header says 215
    assert plan["memory_per_device"] < 80 * 10**9
    text = (RECIPES / "infer-cpm2-moe-198b-offload.toml").read_text()
    assert "215 expert slots" in text and "9.4 GiB" in text


# -- the recipe format ---------------------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, needle", [
    ('[[step]]\nname = "a"\nrun = "fly"\n', "unknown command 'fly'"),
    ('[[step]]\nname = "a"\nrun = "data"\n', "needs a sub-command"),
    ('[[step]]\nname = "a"\nrun = "moefy"\nargs = ["x", "y"]\nwings = 2\n', "has no option 'wings'"),
    ('[[step]]\nname = "a"\nrun = "pretrain"\nargs = ["y"]\n', "needs a [step.recipe] table"),
    ('[[step]]\nname = "a"\nrun = "moefy"\nargs = ["x", "y"]\n[step.recipe]\nlr = 1\n', "takes no [step.recipe]"),
    ('[[step]]\nname = "a"\nrun = "data stdlib"\nargs = ["x"]\n[[step]]\nname = "a"\nrun = "data stdlib"\nargs = ["y"]\n', "two steps are named 'a'"),
    ('[inputs]\n"ckpt" = "gpt-9"\n[[step]]\nname = "a"\nrun = "data stdlib"\nargs = ["x"]\n', "unknown preset 'gpt-9'"),
    ('colour = "red"\n[[step]]\nname = "a"\nrun = "data stdlib"\nargs = ["x"]\n', "unknown key(s) colour"),
    ('description = "no steps"\n', "has no [[step]] tables"),
    ('[[step]]\nname = "a"\nrun = "pretrain"\nargs = ["y"]\nlaunch = { config = "nope.yaml", processes = 2 }\n[step.recipe]\nlr = 1\n',
     "accelerate config nope.yaml does not exist"),
    ('[[step\n', "not valid TOML"),
    ('[[step]]\nname = "a"\nrun = "data stdlib"\nargs = ["x"]\nmax-docs = "many"\n', "expects an integer or nothing, got 'many'"),
    ('[[step]]\nname = "a"\nrun = "data stdlib"\nargs = ["x", "y"]\n', "takes the arguments OUT; got 2"),
    ('[[step]]\nname = "a"\nrun = "inherit"\nargs = ["x", "y"]\n', "missing option(s) --to"),
])
def test_bad_pipeline_recipes_are_one_line_and_exit_2(tmp_path, text, needle):
    result = RUNNER.invoke(app, ["run", str(write(tmp_path, text)), str(tmp_path / "out")])
    one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_options_become_the_commands_own_argv():
    moefy = pipeline.find_command(("moefy",))
    argv = pipeline.option_argv(moefy, {"experts": 8, "allow_uneven": True, "restore": False, "layers": ["decoder.0", "decoder.2"]})
    assert argv == ["--experts", "8", "--allow-uneven", "--layers", "decoder.0,decoder.2"]
    infer = pipeline.find_command(("infer",))
    assert pipeline.option_argv(infer, {"prefetch": False, "normalize": True}) == ["--no-prefetch", "--normalize"]
    pretrain = pipeline.find_command(("pretrain",))
    assert pipeline.option_argv(pretrain, {"model": {"d_model": 64, "norm": "rms"}, "robust_iterations": [4, 2]}) == \
        ["--model", '{d_model = 64, norm = "rms"}', "--robust-iterations", "4,2"]


def test_option_spellings_and_out_substitution(tmp_path):
    path = write(tmp_path, '[[step]]\nname = "gen"\nrun = "infer"\nargs = ["{out}/m", "hi"]\n'
                           '"max-new-tokens" = 3\ninput = "{out}/p.jsonl"\nmax_new_tokens = 4\n')
    step = pipeline.load_pipeline(path, tmp_path / "o").steps[0]
    assert step.args == [str(tmp_path / "o" / "m"), "hi"]
    assert step.options == {"max_new_tokens": 4, "input_file": str(tmp_path / "o" / "p.jsonl")}


def test_step_recipe_tables_round_trip_through_toml():
    table = {"preset": "llama-tiny", "lr": 0.003, "max_steps": 300, "share_layers": True, "robust_iterations": [12, 9],
             "path": 'runs/"x"\\y', "model": {"d_model": 64, "n_layers": 2}}
    assert tomllib.loads(pipeline.toml_text(table)) == table


def test_inputs_are_checked_against_their_presets(tmp_path):
    torch.manual_seed(0)
    save_model(build_model(ModelConfig.from_preset("llama-tiny")), tmp_path / "ckpt", stage="test")
    good = write(tmp_path, f'[inputs]\n"{tmp_path}/ckpt" = "llama-tiny"\n[[step]]\nname = "a"\nrun = "info"\nargs = ["{tmp_path}/ckpt"]\n')
    assert pipeline.check_inputs(pipeline.load_pipeline(good, tmp_path / "o"), dry_run=False) == {}
    bad = write(tmp_path, f'[inputs]\n"{tmp_path}/ckpt" = "t5-tiny"\n[[step]]\nname = "a"\nrun = "info"\nargs = ["{tmp_path}/ckpt"]\n')
    with pytest.raises(UserError, match=r"does not have the shape of preset t5-tiny: arch decoder != encoder-decoder"):
        pipeline.check_inputs(pipeline.load_pipeline(bad, tmp_path / "o"), dry_run=False)
    missing = write(tmp_path, '[inputs]\n"nowhere" = "t5-tiny"\n[[step]]\nname = "a"\nrun = "info"\nargs = ["nowhere"]\n')
    loaded = pipeline.load_pipeline(missing, tmp_path / "o")
    with pytest.raises(UserError, match="input nowhere is not a cpmctl checkpoint"):
        pipeline.check_inputs(loaded, dry_run=False)
    assert pipeline.check_inputs(loaded, dry_run=True) == {Path("nowhere"): ModelConfig.from_preset("t5-tiny")}


def test_a_failing_step_stops_the_pipeline_with_its_exit_code(tmp_path):
    path = write(tmp_path, '[[step]]\nname = "data"\nrun = "data stdlib"\nargs = ["{out}/data"]\nmax-docs = 800\n'
                           'num-classes = 2\nmin-per-class = 10\n'
                           '[[step]]\nname = "tok"\nrun = "tokenizer train"\nargs = ["{out}/nothing.txt", "{out}/tok"]\nvocab-size = 300\n')
    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["run", str(path), str(out)])
    assert result.exit_code == 2, result.output
    assert "step 'tok' failed (exit 2)" in result.stderr and "--from tok" in result.stderr
    rows = json.loads((out / "pipeline.json").read_text())
    assert [r["step"] for r in rows] == ["data"] and rows[0]["figure"].startswith("800 documents")
    assert (out / "data" / "corpus.txt").read_text().count("\n") == 800


def test_a_launched_step_runs_on_two_processes(tmp_path):
    """`launch` runs the step under `accelerate launch` (2 CPU processes here, gloo; the FSDP
    config runs as DDP on CPUs) and the result is the same checkpoint layout as a plain run."""
    pytest.importorskip("accelerate")
    text = f'''
[[step]]
name = "data"
run = "data stdlib"
args = ["{{out}}/data"]
max-docs = 800
num-classes = 2
min-per-class = 10
[[step]]
name = "tok"
run = "tokenizer train"
args = ["{{out}}/data/corpus.txt", "{{out}}/tok"]
vocab-size = 600
[[step]]
name = "shards"
run = "data prepare"
args = ["{{out}}/data/corpus.txt", "{{out}}/shards"]
tokenizer = "{{out}}/tok"
[[step]]
name = "train"
run = "pretrain"
args = ["{{out}}/run"]
output = "{{out}}/run/checkpoint"
launch = {{ config = "{RECIPES / 'accelerate-fsdp.yaml'}", processes = 2 }}
[step.recipe]
preset = "llama-tiny"
tokenizer = "{{out}}/tok"
data = "{{out}}/shards"
seq_len = 32
batch_size = 4
max_steps = 3
eval_batches = 1
'''
    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["run", str(write(tmp_path, text)), str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["step"]: r for r in json.loads((out / "pipeline.json").read_text())}
    assert rows["train"]["command"].startswith("accelerate launch --config_file") and "--num_processes 2" in rows["train"]["command"]
    assert (out / "run" / "checkpoint" / "config.json").is_file()
    train_records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in train_records) == 3
    assert (out / "recipes" / "train.toml").read_text().count("max_steps = 3") == 1


def test_only_reruns_one_step_and_keeps_the_other_rows(tmp_path):
    path = write(tmp_path, '[[step]]\nname = "data"\nrun = "data stdlib"\nargs = ["{out}/data"]\nmax-docs = 800\n'
                           'num-classes = 2\nmin-per-class = 10\n'
                           '[[step]]\nname = "tok"\nrun = "tokenizer train"\nargs = ["{out}/data/corpus.txt", "{out}/tok"]\n'
                           'vocab-size = 600\n')
    out = tmp_path / "out"
    assert RUNNER.invoke(app, ["run", str(path), str(out)]).exit_code == 0
    first = json.loads((out / "pipeline.json").read_text())
    again = RUNNER.invoke(app, ["run", str(path), str(out), "--only", "tok"])
    assert again.exit_code == 2 and "already exists" in again.stderr  # outputs are never replaced silently
    again = RUNNER.invoke(app, ["run", str(path), str(out), "--only", "tok", "--force"])
    assert again.exit_code == 0, again.output
    rows = json.loads((out / "pipeline.json").read_text())
    assert [r["step"] for r in rows] == ["data", "tok"] and rows[0] == first[0]
    assert rows[1]["command"].endswith("--vocab-size 600 --force") and rows[1]["figure"] == "vocabulary 600"
    one_line_error(RUNNER.invoke(app, ["run", str(path), str(out), "--only", "nope"]), "no step named 'nope'; steps: data, tok")


def test_data_stdlib_writes_the_corpus_and_its_task(tmp_path):
    out = tmp_path / "data"
    result = RUNNER.invoke(app, ["data", "stdlib", str(out), "--max-docs", "1500", "--num-classes", "3", "--min-per-class", "20"])
    assert result.exit_code == 0, result.output
    corpus = (out / "corpus.txt").read_text().splitlines()
    assert len(corpus) == 1500
    labels = json.loads((out / "task" / "labels.json").read_text())
    rows = [json.loads(line) for split in ("train", "dev", "test") for line in (out / "task" / f"{split}.jsonl").read_text().splitlines()]
    assert len(labels) == 3 and {r["label"] for r in rows} == set(labels)
    assert all(r["text"] in set(corpus) for r in rows)  # the task's texts are the corpus's documents
    one_line_error(RUNNER.invoke(app, ["data", "stdlib", str(out)]), "already exists")
    one_line_error(RUNNER.invoke(app, ["data", "stdlib", str(tmp_path / "d2"), "--max-docs", "50", "--num-classes", "9"]),
                   "classes with at least 100 documents")
    assert not (tmp_path / "d2").exists()


def test_dry_run_ends_with_a_plan_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(RECIPES)
    result = RUNNER.invoke(app, ["run", "recipes/cpm2-moe-upcycle.toml", "runs/m", "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = result.stdout[result.stdout.rindex("dry run: nothing loaded or written"):]
    upcycle = next(line for line in summary.splitlines() if "│ upcycle" in line)
    train = next(line for line in summary.splitlines() if "│ moe-pretrain" in line)
    assert "198.33B" in upcycle and "runs/m/init" in upcycle
    assert "│ 64 " in train and "50,000" in train and "runs/m/run/checkpoint" in train
    assert not (tmp_path / "runs").exists()


def test_pipelines_run_through_the_command_table_not_the_command_line():
    """A dry run of the demo plans every stage through cpmctl.commands: the CLI (and Typer) is
    never imported, so the pipeline and the CLI do not import each other."""
    code = ("import io, sys\nfrom pathlib import Path\nfrom rich.console import Console\nfrom cpmctl import pipeline\n"
            "p = pipeline.load_pipeline('recipes/demo.toml', Path('runs/x'))\n"
            "rows = pipeline.dry_run_pipeline(p, Path('runs/x'), console=Console(file=io.StringIO()))\n"
            "print(sum(r['plan'] is not None for r in rows), len(rows), 'cpmctl.cli' in sys.modules, 'typer' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    planned, steps, cli, typer_loaded = done.stdout.splitlines()[-1].split()  # after the plans it prints
    assert int(planned) == 8 and int(steps) == 11 and cli == "False" and typer_loaded == "False"


def test_step_options_are_the_commands_config():
    loaded = pipeline.load_pipeline(RECIPES / "demo.toml", Path("runs/x"))
    steps = {s.name: s for s in loaded.steps}
    moefy = steps["moefy"].config
    assert type(moefy).__name__ == "MoefyConfig" and moefy.expert_size == 32 and moefy.checkpoint == Path("runs/x/ki/checkpoint")
    teacher = steps["teacher"].config  # the [step.recipe] table, [model] included
    assert teacher.preset == "llama-tiny" and teacher.model["d_model"] == 64 and teacher.max_steps == 300
    assert pipeline.step_config(steps["moefy"], force=True).force is True and steps["moefy"].config.force is False
