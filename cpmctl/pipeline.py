"""Pipeline recipes: several cpmctl commands in a row, run by cpmctl itself.

    cpmctl run recipes/demo.toml runs/demo            # what `make demo` runs
    cpmctl run recipes/demo.toml runs/demo --dry-run  # each step's command line and plan, no weights

A pipeline recipe is TOML. Each `[[step]]` names a cpmctl command (`run = "pretrain"`, or
`run = "data prepare"` for a sub-command), its positional arguments (`args`) and its options by
their option names (`max_steps = 300`, or `"max-steps" = 300`). A command whose first argument is
a RECIPE file (pretrain) takes its recipe as the step's `[step.recipe]` table; the runner writes
it to OUT/recipes/NAME.toml, so the run keeps the exact recipe of every step. `{out}` in any
string is the pipeline's output directory. `output` names what the step produces (default: its
last argument); the summary table reports its size.

`[inputs]` maps checkpoints the pipeline needs from outside to the preset whose shape they have:
a real run checks each one against its preset before the first step, and a dry run stands the
preset in (on the meta device) for an input that is not there yet; a later step's input written
by an earlier step stands in as the config the earlier step's dry run says it would write.

Steps run through the command table (cpmctl.commands): each step's options become the command's
config (checked against its fields, as the command line's are) before anything runs, then the
command's own `run` or `plan`. The command line each step corresponds to is shown, and is what a
launched (multi-process) step executes.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cpmctl.command_configs import RunConfig
from cpmctl.commands import Command, find, show
from cpmctl.errors import UserError
from cpmctl.options import OptionSpec, base_type, build_config, read_toml, spelling_map, specs

# Keys of a [[step]] table that are not the command's options.
STEP_KEYS = ("name", "run", "args", "recipe", "output", "launch")
# Model fields compared when an [inputs] checkpoint is checked against its preset.
SHAPE_FIELDS = ("arch", "d_model", "d_ff", "n_heads", "n_layers", "n_decoder_layers")


@dataclass
class Step:
    name: str
    command: Command
    args: list[str]
    options: dict[str, Any]                   # {field name: value} as the recipe gives them
    config: Any                               # the command's config (checked when the recipe is read)
    recipe: dict[str, Any] | None = None
    output: str | None = None
    launch: dict[str, Any] | None = None      # {config = accelerate config file, processes = N}


@dataclass
class Pipeline:
    path: Path
    description: str
    inputs: dict[str, str]
    steps: list[Step] = field(default_factory=list)


def _substitute(value: Any, out: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{out}", str(out))
    if isinstance(value, list):
        return [_substitute(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, out) for k, v in value.items()}
    return value


def load_pipeline(path: str | Path, out: str | Path) -> Pipeline:
    """Read and check a pipeline recipe: every step's command, option names and values."""
    path, out = Path(path), Path(out)
    data = read_toml(path)
    raw_steps = data.get("step")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UserError(f"recipe {path} has no [[step]] tables (a pipeline recipe lists its steps; "
                        "a single-stage recipe goes to its command, e.g. `cpmctl pretrain RECIPE OUT`)")
    unknown_top = sorted(set(data) - {"description", "inputs", "step"})
    if unknown_top:
        raise UserError(f"recipe {path}: unknown key(s) {', '.join(unknown_top)} (known: description, inputs, step)")
    inputs = data.get("inputs", {})
    if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
        raise UserError(f"recipe {path}: [inputs] maps checkpoint paths to preset names")
    pipeline = Pipeline(path=path, description=str(data.get("description", "")),
                        inputs={str(_substitute(k, out)): v for k, v in inputs.items()})
    seen: set[str] = set()
    for i, raw in enumerate(raw_steps, 1):
        step = _parse_step(raw, i, out, path)
        if step.name in seen:
            raise UserError(f"recipe {path}: two steps are named {step.name!r}")
        seen.add(step.name)
        pipeline.steps.append(step)
    from cpmctl.config import PRESETS

    for preset in pipeline.inputs.values():
        if preset not in PRESETS:
            raise UserError(f"recipe {path}: [inputs] names unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    return pipeline


def find_command(name: tuple[str, ...] | str, where: str = "pipeline") -> Command:
    """The command behind `cpmctl NAME...` (a group name alone: which sub-commands it has)."""
    from cpmctl.commands import COMMANDS

    key = " ".join(name) if isinstance(name, tuple) else name
    subs = sorted(c.path[1] for c in COMMANDS if len(c.path) == 2 and c.path[0] == key)
    if subs:
        raise UserError(f"{where}: {key!r} needs a sub-command: {', '.join(subs)}")
    return find(key, where)


def positional_values(command: Command, args: list[Any], where: str) -> dict[str, Any]:
    """A step's `args` as the values of the command's argument fields, in order (a list-typed
    last argument takes the rest)."""
    arguments: list[OptionSpec] = [s for s in specs(command.config) if s.argument]
    values: dict[str, Any] = {}
    rest = list(args)
    for spec in arguments:
        if not rest:
            break
        if base_type(spec.type) is list:  # infer's TEXT...
            values[spec.name], rest = rest, []
        else:
            values[spec.name] = rest.pop(0)
    if rest:
        names = " ".join(s.name.upper() for s in arguments)
        raise UserError(f"{where}: `{command.name}` takes the arguments {names}; got {len(args)}")
    return values


def step_options(command: Command, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The step's option keys (any spelling: "max-new-tokens", "max_new_tokens", "input") by field name."""
    spelling = spelling_map(command.config)
    options = {}
    for key, value in raw.items():
        if key in STEP_KEYS:
            continue
        if key not in spelling:
            known = sorted(f.lstrip("-") for s in specs(command.config) if not s.argument for f in s.flags if f.startswith("--"))
            raise UserError(f"{where}: `{command.name}` has no option {key!r}; known: {', '.join(known)}")
        options[spelling[key][0].name] = value
    return options


def _parse_step(raw: Any, index: int, out: Path, path: Path) -> Step:
    where = f"recipe {path}, step {index}"
    if not isinstance(raw, dict) or "run" not in raw or "name" not in raw:
        raise UserError(f"{where}: a step needs `name` and `run` (the cpmctl command)")
    raw = _substitute(raw, out)
    name = str(raw["name"])
    command_name = " ".join(str(raw["run"]).split())
    if command_name == "run":
        raise UserError(f"{where}: a step cannot run another pipeline; list its steps here")
    command = find_command(command_name, where)
    where = f"{where} ({name})"
    args = raw.get("args", [])
    if not isinstance(args, list):
        raise UserError(f"{where}: `args` is a list of positional arguments")
    options = step_options(command, raw, where)
    recipe = raw.get("recipe")
    if command.recipe_argument != (recipe is not None):
        need = "needs a [step.recipe] table" if command.recipe_argument else "takes no [step.recipe] table"
        raise UserError(f"{where}: `{command.name}` {need}")
    launch = raw.get("launch")
    if launch is not None:
        if not isinstance(launch, dict) or set(launch) != {"config", "processes"} or not isinstance(launch["processes"], int) \
                or launch["processes"] < 1:
            raise UserError(f"{where}: `launch` is {{config = \"accelerate config file\", processes = N}}")
        if not Path(launch["config"]).is_file():
            raise UserError(f"{where}: accelerate config {launch['config']} does not exist")
    layers = [(f"{where} [step.recipe]", _flat(recipe))] if recipe is not None else []
    layers += [(where, options), (f"{where} args", positional_values(command, args, where))]
    config = build_config(command.config, *layers)
    return Step(name=name, command=command, args=[str(a) for a in args], options=options, config=config,
                recipe=recipe, output=raw.get("output"), launch=launch)


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A [step.recipe] table as a recipe file reads: nested tables as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def option_argv(command: Command, options: dict[str, Any]) -> list[str]:
    """Command-line options for `options` ({field name: value}) as the command spells them."""
    by_name = {s.name: s for s in specs(command.config)}
    argv: list[str] = []
    for key, value in options.items():
        spec = by_name[key]
        flag = spec.flags[0]
        if spec.is_flag:
            if value is True:
                argv.append(flag)
            elif spec.secondary:
                argv.append(spec.secondary)
        elif isinstance(value, list):
            argv += [flag, ",".join(_text(v) for v in value)]
        elif isinstance(value, dict):
            argv += [flag, "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"]
        else:
            argv += [flag, _text(value)]
    return argv


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise UserError(f"recipe value {v!r} cannot be written as TOML")


def toml_text(table: dict[str, Any]) -> str:
    """A flat-or-one-level-nested table as TOML (what [step.recipe] holds)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, sub in table.items():
        if isinstance(sub, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in sub.items()]
    return "\n".join(lines) + "\n"


def step_config(step: Step, *, force: bool = False):
    """The step's config; `force` sets the --force of commands that have one."""
    if force and any(s.name == "force" for s in specs(step.command.config)):
        return dataclasses.replace(step.config, force=True)
    return step.config


def step_argv(step: Step, recipe_file: Path | None, *, force: bool = False) -> list[str]:
    """The command line of the step (what a launched step runs, and what the run shows)."""
    options = dict(step.options)
    if force and any(s.name == "force" for s in specs(step.command.config)):
        options["force"] = True
    positional = ([str(recipe_file)] if recipe_file is not None else []) + step.args
    return list(step.command.path) + positional + option_argv(step.command, options)


def launch_argv(step: Step, argv: list[str]) -> list[str]:
    """`accelerate launch` of a step that runs on several processes (GPUs)."""
    return ["accelerate", "launch", "--config_file", str(step.launch["config"]),
            "--num_processes", str(step.launch["processes"]), "-m", "cpmctl", *argv]


def launch_plan_options(step: Step) -> dict[str, Any]:
    """What a dry run needs to know of a launched step: devices, and whether FSDP shards them."""
    import yaml  # accelerate's own dependency, as its configs are YAML

    config = yaml.safe_load(Path(step.launch["config"]).read_text()) or {}
    sharding = "fsdp" if str(config.get("distributed_type", "")).upper() == "FSDP" else "ddp"
    return {"devices": step.launch["processes"], "sharding": sharding}


def supports_dry_run(step: Step) -> bool:
    return step.command.plan is not None


def run_step(step: Step, cfg: Any) -> Any:
    """The step's command on its config, its result shown as the command line shows it. A
    failure prints the step's one-line error and becomes `StepFailed` with the command's exit code."""
    try:
        result = step.command.run(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise StepFailed(getattr(exc, "exit_code", 2)) from exc
    show(step.command, cfg, result)
    return result


def plan_step(step: Step, cfg: Any, stand_ins: dict[Path, Any]) -> Any:
    launch = launch_plan_options(step) if step.launch is not None and step.command.launch_config else {}
    try:
        return step.command.plan(cfg, stand_ins=stand_ins, **launch)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise StepFailed(getattr(exc, "exit_code", 2)) from exc


class StepFailed(Exception):
    def __init__(self, code: int):
        super().__init__(f"exit code {code}")
        self.code = code


def check_inputs(pipeline: Pipeline, *, dry_run: bool) -> dict[Path, Any]:
    """Check [inputs] against their presets; return stand-in configs for the missing ones (dry run)."""
    from cpmctl.config import ModelConfig

    stand_ins: dict[Path, Any] = {}
    for raw, preset in pipeline.inputs.items():
        path = Path(raw)
        expected = ModelConfig.from_preset(preset)
        config_file = path / "config.json"
        if not config_file.is_file():
            if dry_run:
                stand_ins[path] = expected
                continue
            raise UserError(f"input {path} is not a cpmctl checkpoint (no config.json); the recipe expects one shaped like preset {preset}")
        have = ModelConfig.from_dict(json.loads(config_file.read_text()))
        diffs = [f"{f} {getattr(have, f)} != {getattr(expected, f)}" for f in SHAPE_FIELDS
                 if getattr(have, f) != getattr(expected, f)]
        if diffs:
            raise UserError(f"input {path} does not have the shape of preset {preset}: {', '.join(diffs)}")
    return stand_ins


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# -- the quality figure of each command's result ---------------------------------------------------
def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _pretrain_figure(r: dict) -> str:
    text = f"eval loss {r['final_eval_loss']:.3f}"
    if r.get("ki_steps"):
        text += f" (KI for {r['ki_steps']} of {r['steps']} steps)"
    return text


def _inherit_figure(r: dict) -> str:
    text = f"{r['parameters_src']:,} -> {r['parameters_out']:,} parameters"
    if r.get("max_logit_diff") is not None:
        text += f", max logit diff {r['max_logit_diff']:.1e}"
        if r.get("exact_expected") is False:
            text += f" ({r['method']}: not function-preserving by design)"
    return text


def _moefy_figure(r: dict) -> str:
    layers = r["layers"].values()
    recall = _mean(layer["recall"] for layer in layers)
    text = f"router recall {recall:.2f} (chance {r['top_k'] / r['experts']:.2f}), {r['top_k']} of {r['experts']} experts"
    quality = r.get("quality") or {}
    if "perplexity_increase" in quality:
        text += f", perplexity {quality['perplexity_increase']:+.1%}"
    return text


def _prompt_tune_figure(r: dict) -> str:
    scored = r.get("test") or r.get("best", {}).get("metrics") or {}
    split = "test" if r.get("test") else "dev"
    return (f"{split} accuracy {scored['accuracy']:.1%}, {r['trainable_parameters']:,} trained parameters "
            f"({r['trainable_percent']:.2f}%)")


def _distill_figure(r: dict) -> str:
    if "dev" in r and r["dev"]:
        return f"dev accuracy {r['dev']['accuracy']:.1%} with {len(r['student_layers'])} layers"
    return f"train loss {r['train']['loss']:.3f}"


def _infer_figure(r: dict) -> str:
    stats = r["stats"]
    if r["mode"] == "classify":
        return f"accuracy {stats['accuracy']:.1%}"
    text = f"{stats['tokens_per_second']:.1f} tokens/s"
    offload = stats.get("offload")
    if offload:
        text += (f", {offload['slots']} {offload['unit']} slots in {offload['budget_bytes'] / 2**20:.1f} MiB, "
                 f"hit rate {offload['hit_rate']:.0%}")
    return text


FIGURES: dict[tuple[str, ...], Callable[[dict], str]] = {
    ("data", "stdlib"): lambda r: f"{r['documents']:,} documents, {len(r['classes'])}-class task",
    ("tokenizer", "train"): lambda r: f"vocabulary {r['vocab_size']:,}",
    ("data", "prepare"): lambda r: f"{r['total_tokens']:,} tokens",
    ("pretrain",): _pretrain_figure,
    ("inherit",): _inherit_figure,
    ("moefy",): _moefy_figure,
    ("prompt-tune",): _prompt_tune_figure,
    ("distill",): _distill_figure,
    ("infer",): _infer_figure,
}


def figure_of(step: Step, result: Any) -> str:
    describe = FIGURES.get(step.command.path)
    if describe is None or not isinstance(result, dict):
        return ""
    return describe(result)


# -- running ---------------------------------------------------------------------------------------
def run_pipeline(pipeline: Pipeline, out: Path, *, force: bool = False, start: str | None = None,
                 only: str | None = None, console=None) -> list[dict]:
    """Run the steps in order (from `start`, or just `only`); return the summary rows, also
    written to OUT/pipeline.json."""
    from rich.console import Console

    console = console or Console()
    names = [s.name for s in pipeline.steps]
    for wanted in (start, only):
        if wanted is not None and wanted not in names:
            raise UserError(f"no step named {wanted!r}; steps: {', '.join(names)}")
    check_inputs(pipeline, dry_run=False)
    first = names.index(start or only) if (start or only) else 0
    steps = pipeline.steps[first:first + 1] if only else pipeline.steps[first:]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, step in enumerate(steps, first + 1):
        recipe_file = _write_recipe(step, out / "recipes") if step.recipe is not None else None
        argv = step_argv(step, recipe_file, force=force)
        command = shown_command(step, argv)
        console.rule(f"[bold]{i}/{len(pipeline.steps)} {step.name}[/bold]")
        console.print(f"[dim]$ {command}[/dim]", soft_wrap=True)
        started = time.perf_counter()
        try:
            result = run_launched(step, argv) if step.launch else run_step(step, step_config(step, force=force))
        except StepFailed as exc:
            raise PipelineStopped(step.name, exc.code, out) from None
        output = Path(step.output or step.args[-1])
        rows.append({"step": step.name, "command": command, "output": str(output),
                     "bytes": dir_size(output), "seconds": round(time.perf_counter() - started, 2),
                     "figure": figure_of(step, result), "result": _jsonable(result)})
        if start or only:  # a partial run keeps the earlier run's rows of the other steps
            rows = _merge_rows(out / "pipeline.json", rows, names)
        (out / "pipeline.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    render_summary(rows, title=pipeline.description or str(pipeline.path), out=out, console=console)
    return rows


def _merge_rows(path: Path, rows: list[dict], order: list[str]) -> list[dict]:
    """This run's rows over an earlier run's (--from/--only), in the pipeline's step order."""
    by_name = {}
    if path.is_file():
        try:
            by_name = {r["step"]: r for r in json.loads(path.read_text()) if r.get("step") in order}
        except (json.JSONDecodeError, TypeError, KeyError):
            by_name = {}
    by_name.update({r["step"]: r for r in rows})
    return [by_name[name] for name in order if name in by_name]


def run_launched(step: Step, argv: list[str]) -> None:
    """A multi-process step: `accelerate launch ... -m cpmctl ARGV` in a child process."""
    import subprocess

    # `accelerate launch` through this interpreter, so the child sees the same environment
    code = subprocess.call([sys.executable, "-m", "accelerate.commands.launch", *launch_argv(step, argv)[2:]])
    if code != 0:
        raise StepFailed(code)
    return None


class PipelineStopped(UserError):
    """A step failed: the run stops with the step's exit code."""

    def __init__(self, step: str, code: int, out: Path):
        super().__init__(f"step {step!r} failed (exit {code}); outputs of the earlier steps are in {out} "
                         f"(rerun from this step with --from {step})")
        self.step, self.exit_code = step, code


def _write_recipe(step: Step, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{step.name}.toml"
    path.write_text(f"# step {step.name!r} of a cpmctl pipeline (written by `cpmctl run`)\n" + toml_text(step.recipe))
    return path


def _jsonable(result: Any) -> Any:
    if isinstance(result, dict):
        # generated texts and embeddings can be long; the summary keeps the figures
        return {k: v for k, v in result.items() if k != "outputs"}
    return None


def render_summary(rows: list[dict], *, title: str, out: Path, console) -> None:
    from rich.table import Table

    from cpmctl.report import human_bytes

    def shown(path: str) -> str:  # outputs inside OUT are shown relative to it
        try:
            return str(Path(path).relative_to(out))
        except ValueError:
            return path

    table = Table(title=f"{title}\n(outputs in {out})")
    for column in ("step", "output", "size", "time", "result"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["step"], shown(row["output"]), human_bytes(row["bytes"]), f"{row['seconds']:.1f} s", row["figure"])
    total = sum(row["seconds"] for row in rows)
    table.add_row("total", "", "", f"{total:.1f} s", "", style="bold")
    console.print(table)


def command_line(step: Step, out: Path, *, force: bool = False) -> str:
    """The command a real run of `step` executes (its recipe file as the run writes it)."""
    recipe_file = out / "recipes" / f"{step.name}.toml" if step.recipe is not None else None
    return shown_command(step, step_argv(step, recipe_file, force=force))


def shown_command(step: Step, argv: list[str]) -> str:
    return shlex.join(launch_argv(step, argv)) if step.launch else "cpmctl " + shlex.join(argv)


def dry_run_pipeline(pipeline: Pipeline, out: Path, *, force: bool = False, console=None,
                     stand_ins: dict[Path, Any] | None = None) -> list[dict]:
    """Each step's command line, and for stages the plan its --dry-run prints, with no weights
    read or written; checkpoints written by earlier steps stand in as the configs their plans
    give (as do `stand_ins`, e.g. what another recipe's dry run would write)."""
    from rich.console import Console

    from cpmctl import plan as planning

    console = console or Console()
    stand_ins = {**(stand_ins or {}), **check_inputs(pipeline, dry_run=True)}
    rows = []
    for i, step in enumerate(pipeline.steps, 1):
        command = command_line(step, out, force=force)
        console.rule(f"[bold]{i}/{len(pipeline.steps)} {step.name}[/bold]")
        console.print(f"$ {command}", soft_wrap=True)
        if not supports_dry_run(step):
            console.print(f"[dim]would write {step.output or step.args[-1]}[/dim]")
            rows.append({"step": step.name, "command": command, "plan": None})
            continue
        cfg = step_config(step, force=force)
        try:
            result = plan_step(step, cfg, stand_ins)
        except StepFailed as exc:
            raise PipelineStopped(step.name, exc.code, out) from None
        show(step.command, cfg, result, dry_run=True)  # the plan, as the step's own --dry-run shows it
        if result.output is not None and result.output_config is not None:
            stand_ins[Path(result.output)] = result.output_config
        rows.append({"step": step.name, "command": command, "plan": planning.plan_to_dict(result)})
    render_plan_summary(rows, title=pipeline.description or str(pipeline.path), console=console)
    return rows


def render_plan_summary(rows: list[dict], *, title: str, console) -> None:
    """One line per step of a dry run: what each stage would run and need."""
    from rich.table import Table

    from cpmctl.report import human_bytes, human_count

    table = Table(title=f"{title}\n(dry run: nothing loaded or written)")
    for column in ("step", "parameters", "trainable", "devices", "memory per device", "steps", "tokens", "output"):
        table.add_column(column, overflow="fold")
    for row in rows:
        plan = row["plan"]
        if plan is None:
            table.add_row(row["step"], "", "", "", "", "", "", "(this command has no dry run)")
            continue
        table.add_row(row["step"], human_count(plan["parameters"]), human_count(plan["trainable"]), str(plan["devices"]),
                      human_bytes(plan["memory_per_device"]), "-" if plan["steps"] is None else f"{plan['steps']:,}",
                      "-" if plan["tokens"] is None else human_count(plan["tokens"]), plan["output"] or "-")
    console.print(table)


# -- `cpmctl run` ------------------------------------------------------------------------------------
def run_recipe(cfg: RunConfig) -> list[dict]:
    """`cpmctl run RECIPE OUT`: the summary rows (also in OUT/pipeline.json)."""
    return run_pipeline(load_pipeline(cfg.recipe, cfg.out), cfg.out, force=cfg.force, start=cfg.start, only=cfg.only)


def dry_run_recipe(cfg: RunConfig, *, stand_ins: dict[Path, Any] | None = None) -> list[dict]:
    """`cpmctl run RECIPE OUT --dry-run`: each step's command line and plan."""
    if cfg.start or cfg.only:
        raise UserError("--dry-run plans the whole pipeline; --from/--only apply to real runs")
    return dry_run_pipeline(load_pipeline(cfg.recipe, cfg.out), cfg.out, force=cfg.force, stand_ins=stand_ins)
