"""Options declared once: the config dataclasses, the CLI generated from them, and the one place
where values from the command line, --config files, --set and recipes are checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from cpmctl import command_configs as configs
from cpmctl.cli import COMMON, app, parse_command_line
from cpmctl.commands import BY_NAME, COMMANDS
from cpmctl.errors import UserError
from cpmctl.options import build_config, check_value, parse_override, specs

ROOT = Path(__file__).resolve().parents[1]


def click_command(command):
    node = typer.main.get_command(app)
    for part in command.path:
        node = node.commands[part]
    return node


# -- the generated commands ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_every_field_is_an_option_and_every_option_a_field(name):
    command = BY_NAME[name]
    fields = {s.name: s for s in specs(command.config)}
    if command.launch_config is not None:
        fields.update({s.name: s for s in specs(command.launch_config)})
    params = {p.name: p for p in click_command(command).params if p.name not in COMMON}
    assert set(params) == set(fields), (name, set(params) ^ set(fields))
    for pname, param in params.items():
        spec = fields[pname]
        assert (param.param_type_name == "argument") == spec.argument, pname
        if spec.argument:
            continue
        assert param.opts[0] == spec.flags[0] and list(param.opts) == list(spec.flags), pname
        assert param.help.startswith(spec.help), pname
        if spec.is_flag:
            assert param.default is spec.default and list(param.secondary_opts) == ([spec.secondary] if spec.secondary else []), pname
        elif not spec.required and not isinstance(spec.default, dict):
            assert param.default == spec.default, (pname, param.default, spec.default)  # what --help shows
    # every command has the shared options too
    shared = {p.name for p in click_command(command).params} - set(fields)
    assert {"cpmctl_config", "cpmctl_set", "cpmctl_json"} <= shared
    assert ("cpmctl_dry_run" in shared) == (command.plan is not None)


REQUIRED_ARGV = {  # the fewest arguments each command parses with
    "convert hf": ["s", "o"], "convert cpm2": ["s", "o"], "info": [], "tokenizer train": ["c", "o", "--vocab-size", "9"], "tokenizer encode": ["t", "x"],
    "data prepare": ["c", "o", "--tokenizer", "t"], "data stdlib": ["o"], "infer": ["m"], "distill": ["o", "--teacher", "t"],
    "prompt-tune": ["m", "o", "--train", "t"], "moefy": ["m", "o"], "relufy": ["m", "o"], "inherit": ["s", "o", "--to", "x"], "run": ["r", "o"],
    "quantize": ["c", "o"],  # --experts or --linear: checked by QuantizeConfig.validate when the command runs
    "pretrain": ["RECIPE", "o", "--data", "d"],
}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_command_line_defaults_are_the_dataclass_defaults(name, tmp_path):
    assert set(REQUIRED_ARGV) == set(BY_NAME)  # a new command needs its line here
    command = BY_NAME[name]
    argv = list(command.path) + REQUIRED_ARGV[name]
    if command.recipe_argument:  # an empty recipe
        (tmp_path / "empty.toml").write_text("# nothing\n")
        argv[argv.index("RECIPE")] = str(tmp_path / "empty.toml")
    _, cfg, _, _ = parse_command_line(argv)
    for spec in specs(command.config):
        if spec.required:
            continue
        assert getattr(cfg, spec.name) == spec.default, (name, spec.name)


def test_pretrain_defaults_come_from_the_dataclass_then_the_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "shards"\npreset = "llama-tiny"\nlr = 0.5\n[model]\nd_model = 32\n')
    _, cfg, launch, dry = parse_command_line(["pretrain", str(recipe), str(tmp_path / "o")])
    expected = configs.PretrainConfig(out=tmp_path / "o", data=Path("shards"), preset="llama-tiny", lr=0.5, model={"d_model": 32})
    assert cfg == expected and launch == configs.LaunchPlanConfig() and dry is False


def test_help_lists_each_option_once_and_imports_no_torch():
    code = ("import sys, contextlib, io\nfrom cpmctl.cli import app\nimport typer\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n        app(['distill', '--help'], prog_name='cpmctl')\n"
            "    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)\nprint(out.getvalue())")
    env = {**os.environ, "COLUMNS": "250"}  # rich folds long flags into narrower terminals
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    first, _, text = done.stdout.partition("\n")
    assert first == "False"
    for spec in specs(configs.DistillConfig):
        if not spec.argument:
            # "--data <path>", or "--data, --corpus <path>" with an earlier spelling still accepted
            assert sum(text.count(spec.flags[0] + end) for end in (" ", "\n", ",")) >= 1, spec.flags[0]


# -- the one check of values ------------------------------------------------------------------------
@pytest.mark.parametrize("name, value, expected", [
    ("max_steps", "12", 12), ("max_steps", 12, 12), ("lr", "3e-4", 3e-4), ("lr", 1, 1.0), ("force", "true", True),
    ("force", False, False), ("tokenizer", "runs/tok", Path("runs/tok")), ("tokenizer", None, None),
    ("model", "{d_model = 64, norm = \"rms\"}", {"d_model": 64, "norm": "rms"}), ("model", {"n_layers": 2}, {"n_layers": 2}),
    ("robust_iterations", "12,9", [12, 9]), ("robust_iterations", 12, [12]), ("max_grad_norm", None, None),
])
def test_values_are_converted_to_the_field_types(name, value, expected):
    spec = next(s for s in specs(configs.PretrainConfig) if s.name == name)
    got = check_value(spec, value, "test")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("name, value, kind", [
    ("max_steps", "many", "an integer"), ("max_steps", 1.5, "an integer"), ("max_steps", True, "an integer"),
    ("lr", "abc", "a number"), ("force", "maybe", "a boolean (true or false)"), ("data", 3, "a path"), ("model", "[1, 2]", "a table"),
    ("seq_len", None, "an integer"),
])
def test_a_wrong_value_names_the_field_the_type_and_the_value(name, value, kind):
    spec = next(s for s in specs(configs.PretrainConfig) if s.name == name)
    with pytest.raises(UserError) as info:
        check_value(spec, value, "--set")
    assert str(info.value) == f"option {name} (--set) expects {kind}, got {value!r}"


def test_list_fields_take_lists_or_comma_separated_text():
    spec = next(s for s in specs(configs.MoefyConfig) if s.name == "layers")
    assert check_value(spec, "encoder.0, encoder.3", "x") == ["encoder.0", "encoder.3"]
    assert check_value(spec, ["decoder.1"], "x") == ["decoder.1"]
    with pytest.raises(UserError, match="expects a list of strings or nothing, got 3"):
        check_value(spec, 3, "x")


def test_layers_of_values_later_wins_and_tables_merge():
    cfg = build_config(configs.PretrainConfig,
                       ("file", {"out": "o", "data": "d", "preset": "llama-tiny", "lr": 0.1, "model.d_model": 32, "model.n_layers": 2}),
                       ("--set", {"lr": 0.2, "model.n_layers": 4}),
                       ("command line", {"max_steps": "7"}))
    assert (cfg.lr, cfg.max_steps, cfg.model) == (0.2, 7, {"d_model": 32, "n_layers": 4})
    with pytest.raises(UserError, match=r"^unknown option\(s\) wings \(--set\); known: batch_size, checkpoint_every"):
        build_config(configs.PretrainConfig, ("--set", {"wings": 2}))
    with pytest.raises(UserError, match=r"missing option\(s\) OUT, --data"):
        build_config(configs.PretrainConfig, ("--set", {"lr": 1}))


def test_spellings_and_earlier_names_are_accepted():
    cfg = build_config(configs.InferConfig, ("x", {"checkpoint": "m", "max-new-tokens": 3, "input": "p.jsonl"}))
    assert cfg.max_new_tokens == 3 and cfg.input_file == Path("p.jsonl")
    moefy = build_config(configs.MoefyConfig, ("x", {"checkpoint": "m", "out": "o", "overwrite": True}))
    assert moefy.force is True and moefy.overwrite is True  # moefy's old `overwrite` is --force, as everywhere
    pretrain = build_config(configs.PretrainConfig, ("x", {"out": "o", "data": "d", "cpu": True}))
    assert pretrain.device == "cpu" and pretrain.cpu is True  # pretrain's old `cpu = true` is --device cpu


def test_overrides_parse_as_toml_values():
    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override("model={d_model = 8}") == ("model", {"d_model": 8})
    assert parse_override("to=d_model=512,n_layers=8") == ("to", "d_model=512,n_layers=8")


def test_config_modules_import_no_torch():
    code = "import sys, cpmctl.command_configs, cpmctl.commands, cpmctl.options, cpmctl.pipeline; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_every_stage_config_is_the_one_its_module_runs():
    from cpmctl.stages import distill, infer, inherit, moefy, pretrain, prompt_tune

    assert (pretrain.PretrainConfig, inherit.InheritConfig, moefy.MoefyConfig, prompt_tune.PromptTuneConfig,
            distill.DistillConfig, infer.InferConfig) == (configs.PretrainConfig, configs.InheritConfig, configs.MoefyConfig,
                                                          configs.PromptTuneConfig, configs.DistillConfig, configs.InferConfig)
    assert {c.config for c in COMMANDS if len(c.path) == 1 and c.name != "info" and c.name != "run"} >= {
        configs.PretrainConfig, configs.InheritConfig, configs.MoefyConfig, configs.PromptTuneConfig,
        configs.DistillConfig, configs.InferConfig}



def test_iteration_lists_are_parsed_once_by_the_config():
    """pretrain's iteration counts arrive as text, a number or a list; the config holds distinct ints."""
    make = lambda **kw: configs.PretrainConfig(out=Path("o"), data=Path("d"), **kw)  # noqa: E731
    assert make(robust_iterations="12,9,12", eval_iterations=6).robust_iterations == [12, 9]
    assert make(eval_iterations=6).eval_iterations == [6] and make().robust_iterations is None
    assert build_config(configs.PretrainConfig, ("--set", {"out": "o", "data": "d", "eval_iterations": "4, 2,4"})).eval_iterations == [4, 2]
    with pytest.raises(UserError, match=r"robust_iterations must be integers \(e.g. 12,9,6\), got '4,x'"):
        make(robust_iterations="4,x")
    with pytest.raises(UserError, match="eval_iterations is empty"):
        make(eval_iterations=[])
