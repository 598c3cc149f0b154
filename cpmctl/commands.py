"""Every cpmctl command as data: its config class and where its run, plan and rendering live.

The CLI (cpmctl.cli) generates one command per entry of `COMMANDS`; pipeline recipes
(cpmctl.pipeline) run steps through the same entries, without going through the command line.
Functions are named by module and attribute and imported when called, so listing the commands
(`cpmctl --help`, reading a recipe) imports no torch: this table is where the CLI layer's lazy
imports are collected. A command's `run(cfg)` returns its result (a dict); `render(result, cfg)`
shows it to a person (without one, the result is printed as JSON); `plan(cfg, stand_ins, **launch)`
is its `--dry-run`. A user error from either that names the setting behind it (the library's
`UserError(..., option=...)`) leaves with the command's flag for that setting (`in_command_terms`).

The tool commands (convert, info, tokenizer, data) have their few lines of glue here; each stage
has a module in cpmctl.stages.

Adding an option: a field with `option(...)` in the command's config (cpmctl.command_configs);
the CLI, `--config`, `--set` and recipes take it from there. Adding a command: a config dataclass
there, a `run(cfg) -> dict` (here for a few lines of glue, else in its own module, named through
`lazy`), optionally `render(result, cfg)` and `plan(cfg, stand_ins=None)`, and one `Command` entry
below; a new two-word group also needs its help line in cpmctl.cli.GROUPS.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cpmctl.command_configs as configs
from cpmctl.errors import UserError, environment_error
from cpmctl.fsutil import any_of, check_output, holding, written_by
from cpmctl.options import base_type, spelling_map, specs


def lazy(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported on the first call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{name}"
    return call


# The library's names for settings whose option is named otherwise (errors.UserError.option).
LIBRARY_NAMES = {"overwrite": "force"}


def flag_for(configs: tuple[type, ...], setting: str) -> str | None:
    """The flag (or ARGUMENT) that sets the library's `setting` on a command with these option classes."""
    for config in configs:
        spell = spelling_map(config)
        found = spell.get(setting) or spell.get(LIBRARY_NAMES.get(setting, ""))
        if found is not None:
            spec = found[0]
            return spec.name.upper() if spec.argument else spec.flags[0]
    return None


def in_command_terms(exc: UserError, configs: tuple[type, ...]) -> UserError:
    """`exc` with the flag of the setting it names (exc.option) added, e.g. "... (--force)"; the
    library's errors name no flag (errors.UserError). Changed in place, so its type stays."""
    flag = flag_for(configs, exc.option) if exc.option else None
    if flag is not None and exc.args:
        exc.args = (f"{exc.args[0]} ({flag})", *exc.args[1:])
        exc.option = None  # said once, however many command layers it passes
    return exc


# What marks OUT as an earlier output of a command, which --force may replace (fsutil.check_output).
# A command not listed here is recognised by the stage its checkpoint's cpmctl.json records: its
# own name (a new checkpoint-writing command, `quantize`, `relufy`, needs no entry when it saves
# with stage="quantize"). A run directory (pretrain, distill) by what the training loop writes.
_RUN_DIRECTORY = any_of(holding("metrics.jsonl"), holding("state"), holding("checkpoint"))
OUTPUT_OF: dict[str, Callable[[Path], bool]] = {
    "convert hf": any_of(written_by("convert-hf"), holding("config.json", "model.safetensors"),
                         holding("config.json", "model.safetensors.index.json")),
    "convert cpm2": written_by("convert-cpm2"),
    "tokenizer train": holding("cpmctl_tokenizer.json"),
    "data prepare": holding("index.json"),
    "data stdlib": holding("corpus.txt", "task"),
    "moefy": written_by("moefy", "moefy-restore"),
    "prompt-tune": holding("adapter_config.json", "cpmctl_adapter.json"),
    "pretrain": _RUN_DIRECTORY,
    "distill": _RUN_DIRECTORY,
    "run": holding("pipeline.json"),
}
# Path options that are not inputs to keep OUT apart from: a cache the run may keep anywhere,
# the recipe of `run` (which writes copies of it into OUT and replaces nothing there).
NOT_INPUTS = {"teacher_cache", "recipe"}
# Commands that add to an existing OUT rather than replace it (a pipeline's steps each check
# their own outputs).
CONTINUES_OUT = {"run"}


def input_paths(cfg: Any) -> list[Any]:
    """The values of every path option of `cfg` but OUT (and NOT_INPUTS)."""
    paths = []
    for spec in specs(type(cfg)):
        if spec.name == "out" or spec.name in NOT_INPUTS or base_type(spec.type) is not Path:
            continue
        paths.append(getattr(cfg, spec.name))
    return paths


def guard_output(name: str, cfg: Any) -> None:
    """Before a command runs or plans: OUT is apart from every input, and an existing OUT is
    replaced only with --force and only when it is an earlier output of this command; --resume
    continues OUT and cannot be combined with --force."""
    if not dataclasses.is_dataclass(cfg) or not hasattr(cfg, "out") or not hasattr(cfg, "force"):
        return
    resume = bool(getattr(cfg, "resume", False))
    if resume and cfg.force:
        raise UserError("--resume continues OUT and --force deletes it: give one of them")
    if hasattr(cfg, "resume") and not resume and not cfg.force and Path(cfg.out).exists():
        raise UserError(f"output {cfg.out} already exists; pass --resume to continue it or --force to start over")
    ours = OUTPUT_OF.get(name) or written_by(name)
    check_output(cfg.out, overwrite=cfg.force, inputs=input_paths(cfg), ours=ours, keep=resume or name in CONTINUES_OUT)


def speaking_flags(fn: Callable[..., Any], configs: tuple[type, ...], name: str | None = None) -> Callable[..., Any]:
    """`fn` (a command's run or plan) whose user errors name the command's flags; with `name`,
    OUT is checked first (guard_output); a full disk, a read-only or forbidden path is a user
    error naming the path (errors.environment_error)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            if name is not None and args:
                guard_output(name, args[0])
            return fn(*args, **kwargs)
        except UserError as exc:
            in_command_terms(exc, configs)
            raise
        except OSError as exc:
            user = environment_error(exc)
            if user is None:
                raise
            raise user from exc

    call.__qualname__ = call.__name__ = getattr(fn, "__name__", "call")
    return call


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]                      # ("moefy",) or ("data", "prepare")
    config: type                               # its options (cpmctl.command_configs)
    help: str
    run: Callable[[Any], Any]
    plan: Callable[..., Any] | None = None     # plan(cfg, stand_ins) for --dry-run
    render: Callable[[Any, Any], None] | None = None
    render_plan: Callable[[Any, Any], None] | None = None  # default: the plan table
    recipe_argument: bool = False              # the first argument is a config file (pretrain RECIPE)
    launch_config: type | None = None          # --dry-run options describing a launch (pretrain)

    def __post_init__(self) -> None:
        configs = (self.config,) + ((self.launch_config,) if self.launch_config else ())
        object.__setattr__(self, "run", speaking_flags(self.run, configs, self.name))
        if self.plan is not None:
            object.__setattr__(self, "plan", speaking_flags(self.plan, configs, self.name))

    @property
    def name(self) -> str:
        return " ".join(self.path)


def echo(text: str) -> None:
    print(text, flush=True)


def print_json(data: Any) -> None:
    echo(json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=False))


def is_rank_zero() -> bool:
    """False in the other processes of a multi-process launch (accelerate, torchrun)."""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return rank.strip() == "0"


def show(command: Command, cfg: Any, result: Any, *, as_json: bool = False, dry_run: bool = False) -> None:
    """A command's result on stdout: `{"command": ..., "result": ...}` with --json, else as its
    render function shows it (JSON without one). Rank 0 alone prints."""
    if not is_rank_zero():
        return
    if dry_run:
        from cpmctl.plan import Plan, plan_to_dict

        if as_json:
            print_json({"command": command.name, "result": plan_to_dict(result) if isinstance(result, Plan) else result})
        else:
            (command.render_plan or render_plan)(result, cfg)
        return
    if as_json:
        print_json({"command": command.name, "result": result})
    elif command.render is not None:
        command.render(result, cfg)
    else:
        print_json(result)


# -- tool commands -----------------------------------------------------------------------------------
def tokenizer_path(path):
    """Accept a checkpoint directory wherever a tokenizer is expected."""
    return path / "tokenizer" if (path / "tokenizer").is_dir() else path


def convert_hf(cfg: configs.ConvertHfConfig) -> dict[str, Any]:
    from cpmctl import hf

    if cfg.export:
        hf.export_hf(cfg.src, cfg.out, overwrite=cfg.force)
    else:
        hf.import_hf(cfg.src, cfg.out, dtype=cfg.dtype, overwrite=cfg.force)
    return {"out": str(cfg.out), "direction": "export" if cfg.export else "import"}


def convert_cpm2(cfg: configs.ConvertCpm2Config) -> dict[str, Any]:
    from cpmctl.cpm2 import convert

    return convert.convert_cpm2(cfg.src, cfg.out, vocab=cfg.vocab, dtype=cfg.dtype, overwrite=cfg.force)


def plan_convert_cpm2(cfg: configs.ConvertCpm2Config, stand_ins=None) -> dict[str, Any]:
    from cpmctl.cpm2 import convert

    return convert.plan_conversion(cfg.src, vocab=cfg.vocab, dtype=cfg.dtype)[0].summary()


def _render_cpm2(summary, cfg, dry_run: bool = False) -> None:
    from cpmctl.cpm2 import convert

    echo(convert.render_summary(summary, cfg.out, dry_run))


def info(cfg: configs.InfoConfig) -> dict[str, Any]:
    from cpmctl import report

    if (cfg.checkpoint is None) == (cfg.preset is None):
        raise UserError("give either a CHECKPOINT directory or --preset NAME")
    return report.describe_preset(cfg.preset) if cfg.preset else report.describe_checkpoint(cfg.checkpoint)


def tokenizer_train(cfg: configs.TokenizerTrainConfig) -> dict[str, Any]:
    from cpmctl.tokenizer import train_sentencepiece

    tok = train_sentencepiece(cfg.corpus, cfg.out, vocab_size=cfg.vocab_size, model_type=cfg.model_type,
                              sentinels=cfg.sentinels, overwrite=cfg.force)
    return {"out": str(cfg.out), "vocab_size": tok.vocab_size, "sentinels": len(tok.sentinel_ids)}


def tokenizer_encode(cfg: configs.TokenizerEncodeConfig) -> dict[str, Any]:
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path(cfg.tokenizer))
    ids = tok.encode(cfg.text)
    return {"ids": ids, "decoded": tok.decode(ids), "round_trip": tok.decode(ids) == cfg.text}


def data_prepare(cfg: configs.DataPrepareConfig) -> dict[str, Any]:
    from cpmctl.data import prepare
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path(cfg.tokenizer))
    return prepare(cfg.corpus, tok, cfg.out, shard_tokens=cfg.shard_tokens, field=cfg.field, overwrite=cfg.force)


def data_stdlib(cfg: configs.DataStdlibConfig) -> dict[str, Any]:
    from cpmctl.corpus import write_stdlib_dataset

    return write_stdlib_dataset(cfg.out, num_classes=cfg.num_classes, min_per_class=cfg.min_per_class,
                                max_per_class=cfg.max_per_class, max_docs=cfg.max_docs, overwrite=cfg.force)


# -- how results read ----------------------------------------------------------------------------------
def _wrote(result: dict, cfg) -> None:
    echo(f"wrote {cfg.out}")


def _render_info(result: dict, cfg) -> None:
    from cpmctl import report

    report.render(result)


def _render_tokenizer(result: dict, cfg) -> None:
    echo(f"wrote {cfg.out} (vocabulary {result['vocab_size']}, {result['sentinels']} sentinels)")


def _render_prepare(result: dict, cfg) -> None:
    echo(f"wrote {cfg.out}: {result['total_docs']:,} documents, {result['total_tokens']:,} tokens in {len(result['shards'])} shard(s)")


def _render_stdlib(result: dict, cfg) -> None:
    splits = ", ".join(f"{k} {v}" for k, v in result["splits"].items())
    echo(f"wrote {cfg.out}: {result['documents']:,} documents; task of {len(result['classes'])} classes ({splits})")


def _render_infer(result: dict, cfg) -> None:
    from cpmctl.stages import infer

    infer.render(result, streamed=cfg.stream)


def _render_prompt_tune(result: dict, cfg) -> None:
    from cpmctl.stages import prompt_tune

    prompt_tune.render(result)


def _render_moefy(result: dict, cfg) -> None:
    from cpmctl.stages import moefy

    moefy.render(result)
    echo(f"wrote {cfg.out}")


def _render_relufy(result: dict, cfg) -> None:
    from cpmctl.stages import relufy

    relufy.render(result)
    echo(f"wrote {cfg.out}")


def _render_inherit(result: dict, cfg) -> None:
    echo(f"wrote {cfg.out}: {result['parameters_src']:,} -> {result['parameters_out']:,} parameters ({cfg.method})")
    if result.get("vocab"):
        echo("vocabulary: " + ", ".join(f"{k} {v}" for k, v in result["vocab"].items()))
    if cfg.verify:
        diff = result.get("max_logit_diff")
        echo(f"max logit difference: {diff:.3e} (largest logit {result['max_logit']:.3f})" if diff is not None
             else f"verify: {result['verify']}")


def _render_quantize(result: dict, cfg) -> None:
    group = "" if result["group_size"] is None else f", group size {result['group_size']}"
    what = "expert tensors" if result.get("weights", "experts") == "experts" else "linear layers"
    echo(f"wrote {cfg.out}: {result['tensors_quantized']} {what} as {result['scheme']}{group}; weights "
         f"{result['weight_bytes_before']:,} -> {result['weight_bytes_after']:,} bytes ({result['ratio']:.3f}x)")


def render_plan(plan, cfg) -> None:
    from cpmctl.plan import render_plan as render

    render(plan)


def _shown_already(result, cfg) -> None:
    """The pipeline prints its own progress and summary table as it goes."""


def _stage(name: str, config: type, help: str, *, render: Callable | None = None, **extra: Any) -> Command:
    module = f"cpmctl.stages.{name.replace('-', '_')}"
    return Command(path=(name,), config=config, help=help, run=lazy(module, "run"), plan=lazy(module, "plan"),
                   render=render, **extra)


COMMANDS: tuple[Command, ...] = (
    Command(("convert", "hf"), configs.ConvertHfConfig, "Import a Hugging Face BERT, T5/mT5, GPT-2, Llama, Mistral, Qwen2/3, Gemma/Gemma 2 or Phi-3 directory (or export one back).",
            convert_hf, render=_wrote),
    Command(("convert", "cpm2"), configs.ConvertCpm2Config,
            "Import the released CPM-2 weights (BMInf inference release or model-parallel training release) and tokenizer.",
            convert_cpm2, plan=plan_convert_cpm2, render=_render_cpm2,
            render_plan=lambda summary, cfg: _render_cpm2(summary, cfg, dry_run=True)),
    Command(("info",), configs.InfoConfig, "Config, parameter counts, dtype, size on disk and provenance of a checkpoint or preset.",
            info, render=_render_info),
    Command(("tokenizer", "train"), configs.TokenizerTrainConfig,
            "Train a sentencepiece tokenizer with pad/eos/unk, <mask> and span-corruption sentinels.",
            tokenizer_train, render=_render_tokenizer),
    Command(("tokenizer", "encode"), configs.TokenizerEncodeConfig,
            "Show the ids and pieces of TEXT, and check that decoding gives it back.", tokenizer_encode),
    Command(("data", "prepare"), configs.DataPrepareConfig,
            "Tokenize a corpus into memory-mapped shards with an index (streaming, bounded memory).",
            data_prepare, render=_render_prepare),
    Command(("data", "stdlib"), configs.DataStdlibConfig,
            "The embedded default data: a corpus of this Python's standard-library docstrings and a "
            "module-classification task built from it (no download).", data_stdlib, render=_render_stdlib),
    _stage("infer", configs.InferConfig,
           "Generate text (decoder-only, encoder-decoder), embed sentences (encoder-only), or classify with --prompt.",
           render=_render_infer),
    _stage("pretrain", configs.PretrainConfig,
           "Pre-train a checkpoint or preset (span corruption, MLM or causal LM), optionally with a KI teacher.",
           recipe_argument=True, launch_config=configs.LaunchPlanConfig),
    _stage("distill", configs.DistillConfig, "MixKD: distil a teacher into a smaller student, with mixup on word embeddings."),
    _stage("prompt-tune", configs.PromptTuneConfig,
           "Prompt-tune a frozen model on a classification task (or --full fine-tune it as the baseline).",
           render=_render_prompt_tune),
    _stage("moefy", configs.MoefyConfig, "Split dense FFNs into experts with routers (MoEfication); only the chosen experts run.",
           render=_render_moefy),
    _stage("relufy", configs.RelufyConfig,
           "ReLU-fy a GELU/SiLU model's FFNs and recover its quality with a short training run (sparse activations for MoEfication).",
           render=_render_relufy),
    _stage("inherit", configs.InheritConfig,
           "Grow a checkpoint wider/deeper (bert2BERT FPI/AKI, tiling, stacking), expand its vocabulary, upcycle to MoE.",
           render=_render_inherit),
    Command(("quantize",), configs.QuantizeConfig,
            "Store a MoE checkpoint's experts, or a model's attention and FFN linear layers, weight-only int8 or int4 (group scales); other weights stay as they are.",
            lazy("cpmctl.stages.quantize", "run"), render=_render_quantize),
    Command(("run",), configs.RunConfig, "Run a pipeline recipe: each step is a cpmctl command; ends with a summary table.",
            lazy("cpmctl.pipeline", "run_recipe"), plan=lazy("cpmctl.pipeline", "dry_run_recipe"),
            render=_shown_already, render_plan=_shown_already),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}


def find(name: str | tuple[str, ...], where: str = "pipeline") -> Command:
    """The command `cpmctl NAME...`, or a UserError listing the known ones."""
    key = name if isinstance(name, str) else " ".join(name)
    key = " ".join(key.split())
    if key not in BY_NAME:
        raise UserError(f"{where}: unknown command {key!r}; known: {', '.join(sorted(BY_NAME))}")
    return BY_NAME[key]
