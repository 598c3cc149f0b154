"""The `cpmctl` command line, generated from the command table (cpmctl.commands).

Every command is built by `add_command` from its config dataclass (cpmctl.command_configs): one
option or argument per field, plus the options every command shares:

    --config FILE.toml   options from a file (keys are the option names)
    --set KEY=VALUE      one option, the value read as TOML (repeatable)
    --json               print {"command": ..., "result": ...} on stdout, everything else on stderr
    --dry-run            commands with a plan: what would run, loading and writing nothing

Values are layered (field default < config file < --set < flags given on the command line) and
checked in one place, cpmctl.options.build_config. A user mistake (`UserError`) prints one line
and exits with code 2; `--debug` shows tracebacks. Under a multi-process launch only rank 0
prints the result. Nothing here imports torch: the commands' functions are imported when they
run, so `cpmctl --help` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from cpmctl.commands import COMMANDS, Command, show
from cpmctl.errors import UserError
from cpmctl.fsutil import verification
from cpmctl.options import OptionSpec, base_type, build_config, load_recipe, set_values, specs

app = typer.Typer(
    name="cpmctl",
    help="The CPM-2 pipeline as a tool: convert, inspect, tokenize, prepare data and run models.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[[step]]" and "[model]" are TOML, not markup
    context_settings={"help_option_names": ["-h", "--help"]},
)
GROUPS = {
    "convert": "Convert checkpoints between cpmctl and other formats.",
    "tokenizer": "Train and inspect tokenizers.",
    "data": "Turn corpora into memory-mapped token shards.",
}
_groups: dict[str, typer.Typer] = {}
_state = {"debug": False}


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handles_errors(fn):
    """User mistakes become one line and exit 2; bugs keep their traceback under --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if _state["debug"]:
                raise
            _fail(str(exc), getattr(exc, "exit_code", 2))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug, not a user mistake
            if _state["debug"]:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)

    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    import logging

    _state["debug"] = debug
    # Stages report what they did (e.g. parts of a checkpoint left out) through logging.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cpmctl")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


# -- generating a command's parameters from its config fields ---------------------------------------
METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", list: "A,B,...", dict: "TABLE"}
# Parameters every command has besides its fields (their Python names cannot clash with a field's).
COMMON = ("cpmctl_context", "cpmctl_recipe", "cpmctl_config", "cpmctl_set", "cpmctl_json", "cpmctl_dry_run", "cpmctl_no_verify")


def field_parameter(spec: OptionSpec) -> inspect.Parameter:
    """The Typer parameter of one config field. Values arrive as text (paths as Paths) and are
    checked against the field's type by build_config, like values from files and --set."""
    kind = base_type(spec.type)
    if spec.argument:
        annotation = Optional[list[str]] if kind is list else Optional[Path] if kind is Path else Optional[str]
        info = typer.Argument(... if spec.required else None, help=spec.help, show_default=False,
                              metavar=spec.metavar or spec.name.upper())
    elif kind is bool:
        annotation = bool
        decls = [f"{spec.flags[0]}/{spec.secondary}", *spec.flags[1:]] if spec.secondary else list(spec.flags)
        info = typer.Option(spec.default, *decls, help=spec.help)
    else:
        annotation = Optional[Path] if kind is Path else Optional[str]
        shown = None if spec.required or kind is dict else spec.default
        info = typer.Option(shown, *spec.flags, help=spec.help + (" Required (here, in --config or with --set)." if spec.required else ""),
                            metavar=spec.metavar or (None if kind is Path else METAVARS.get(kind, "VALUE")))
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def common_parameters(command: Command) -> list[inspect.Parameter]:
    def param(name, annotation, info):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)

    params = []
    if command.recipe_argument:
        params.append(param("cpmctl_recipe", Path, typer.Argument(..., metavar="RECIPE", show_default=False,
                            help="Recipe file (TOML, see recipes/): this command's options, as in --config.")))
    params += [
        param("cpmctl_config", Optional[Path], typer.Option(None, "--config", metavar="FILE.toml",
              help="Options from a TOML file (keys are the option names; flags given here win).")),
        param("cpmctl_set", list[str], typer.Option([], "--set", metavar="KEY=VALUE",
              help="Set an option, the value read as TOML (repeatable): --set lr=3e-4, --set model.d_model=512.")),
        param("cpmctl_json", bool, typer.Option(False, "--json", help='Print {"command": ..., "result": ...} as JSON (other output goes to stderr).')),
        param("cpmctl_no_verify", bool, typer.Option(False, "--no-verify",
              help="Skip checking the recorded CRC-32s (and NaN/infinity) of the weights, states and adapters read (faster loads; see RELIABILITY.md).")),
    ]
    if command.plan is not None:
        params.append(param("cpmctl_dry_run", bool, typer.Option(False, "--dry-run",
                            help="Print what would run (model size, memory per device, steps, tokens, output); load and write nothing.")))
    return params


def command_parameters(command: Command) -> list[inspect.Parameter]:
    """Recipe argument first, then the fields' arguments and options in field order, then the
    launch options of --dry-run, then the common options."""
    common = common_parameters(command)
    fields = [field_parameter(s) for s in specs(command.config)]
    launch = [field_parameter(s) for s in specs(command.launch_config)] if command.launch_config else []
    return common[:1] + fields + launch + common[1:] if command.recipe_argument else fields + launch + common


def config_from_command_line(command: Command, values: dict[str, Any], given: set[str]):
    """The command's config (and launch config) from its parameters' values; only flags given on
    the command line override the config file and --set."""
    layers = []
    if values.get("cpmctl_recipe") is not None:
        layers.append((f"recipe {values['cpmctl_recipe']}", load_recipe(values["cpmctl_recipe"])))
    if values.get("cpmctl_config") is not None:
        layers.append((f"--config {values['cpmctl_config']}", load_recipe(values["cpmctl_config"])))
    if values.get("cpmctl_set"):
        layers.append(("--set", set_values(values["cpmctl_set"])))
    field_names = {s.name for s in specs(command.config)}
    layers.append(("command line", {k: v for k, v in values.items() if k in field_names and k in given}))
    cfg = build_config(command.config, *layers)
    if values.get("cpmctl_json"):  # progress bars and streamed tokens would mix with the JSON
        cfg = dataclasses.replace(cfg, **{s.name: False for s in specs(command.config) if s.off_with_json})
    launch = None
    if command.launch_config is not None:
        launch_given = {s.name: values[s.name] for s in specs(command.launch_config) if s.name in given}
        if launch_given and not values.get("cpmctl_dry_run"):
            flags = " and ".join(s.flags[0] for s in specs(command.launch_config))
            raise UserError(f"{flags} describe a launch for --dry-run; the launcher (accelerate) sets them for a run")
        launch = build_config(command.launch_config, ("command line", launch_given))
    return cfg, launch


def _source(ctx: typer.Context, name: str) -> str | None:
    """Where a parameter's value came from: COMMANDLINE, DEFAULT, ..."""
    source = ctx.get_parameter_source(name)
    return None if source is None else source.name


def add_command(command: Command) -> None:
    """Register `command` on the app (under its group for two-word commands)."""
    parameters = command_parameters(command)

    @handles_errors
    def callback(cpmctl_context: typer.Context, **values: Any) -> None:
        given = {name for name in values if _source(cpmctl_context, name) == "COMMANDLINE"}
        cfg, launch = config_from_command_line(command, values, given)
        as_json, dry_run = bool(values.get("cpmctl_json")), bool(values.get("cpmctl_dry_run"))
        quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
        with quiet, verification(not values.get("cpmctl_no_verify")):  # with --json, stdout holds the JSON alone
            if dry_run:
                launch_options = dataclasses.asdict(launch) if launch is not None else {}
                result = command.plan(cfg, **launch_options)
            else:
                result = command.run(cfg)
        show(command, cfg, result, as_json=as_json, dry_run=dry_run)

    context = inspect.Parameter("cpmctl_context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    parameters = [context, *parameters]
    callback.__signature__ = inspect.Signature(parameters)
    callback.__annotations__ = {p.name: p.annotation for p in parameters}
    callback.__name__ = callback.__qualname__ = command.name.replace(" ", "_").replace("-", "_")
    callback.__doc__ = command.help
    group = app
    if len(command.path) == 2:
        if command.path[0] not in _groups:
            _groups[command.path[0]] = typer.Typer(help=GROUPS[command.path[0]], no_args_is_help=True)
            app.add_typer(_groups[command.path[0]], name=command.path[0])
        group = _groups[command.path[0]]
    group.command(command.path[-1], help=command.help)(callback)


for _command in COMMANDS:
    add_command(_command)


def parse_command_line(argv: list[str]):
    """`cpmctl ARGV...` parsed as the command line would, without running it: (the command, its
    config, its launch config or None, whether --dry-run was given). Recipe headers are checked with it."""
    from cpmctl.commands import BY_NAME

    depth = 2 if " ".join(argv[:2]) in BY_NAME else 1
    command = BY_NAME.get(" ".join(argv[:depth]))
    if command is None:
        raise UserError(f"unknown command {' '.join(argv[:2])!r}; known: {', '.join(sorted(BY_NAME))}")
    node = typer.main.get_command(app)
    for part in command.path:
        node = node.commands[part]
    ctx = node.make_context("cpmctl " + command.name, list(argv[depth:]))
    given = {name for name in ctx.params if _source(ctx, name) == "COMMANDLINE"}
    cfg, launch = config_from_command_line(command, ctx.params, given)
    return command, cfg, launch, bool(ctx.params.get("cpmctl_dry_run"))


def main() -> None:
    app(prog_name="cpmctl")  # the same name (and completion variable _CPMCTL_COMPLETE) under python -m cpmctl


if __name__ == "__main__":
    sys.exit(main())
