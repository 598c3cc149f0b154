"""Dry runs: what a stage command would run, computed from configs alone (no weights loaded,
nothing written).

Every stage module has `plan(cfg) -> Plan` beside `run(cfg)`; both share the stage's validation
and config-building functions, so a dry run refuses what the run would refuse and predicts the
ModelConfig the run writes. Input models are read through `checkpoint_config` (config.json only),
and a pipeline planning several steps ahead passes `plan(cfg, stand_ins={path: ModelConfig})` for
checkpoints an earlier step has not written yet.

Memory estimates (bytes per device), the formulas the tests check:

    weights      parameters x bytes per value (fp32 while training; the stored or requested dtype
                 for inference and inherit)
    gradients    trainable parameters x 4 (fp32)
    optimizer    AdamW: 2 fp32 moments per trainable value (8 bytes); Adafactor (torch's): fp32
                 factored second moments, rows + columns of each matrix (prod(shape[:-1]) +
                 prod(shape[:-2]) * shape[-1] values), the full second moment of vectors
    FSDP         divides weights, gradients and optimizer state by the number of devices
                 (rounded up); DDP keeps a full copy of each per device
    activations  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
                 Models", eq. 2, no recomputation): s * b * h * (34 + 5 * a * s / h) bytes per
                 layer application at 16-bit (s sequence, b micro-batch rows, h d_model, a heads),
                 doubled for fp32 training; summed over the layer applications of each stack.
                 The paper derives it for a 4h-wide FFN and attention width h: an estimate for
                 other shapes (gated FFNs, d_ff != 4h), not a measurement. With activation
                 checkpointing (prompt-tune --gradient-checkpointing): each layer application
                 keeps its input (s * b * h values) and one layer at a time holds the above
    logits       b * s_out * vocab x 4 (the fp32 logits the loss reads)
    teacher      a full fp32 copy of the teacher's weights per device (inference only)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cpmctl.checkpoint import read_config
from cpmctl.config import ModelConfig
from cpmctl.devices import DTYPES
from cpmctl.errors import UserError
from cpmctl.hf import config_from_hf
from cpmctl.model import build_model
from cpmctl.report import human_bytes, human_count

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "cpmctl.json"
OPTIMIZERS = ("adamw", "adafactor")
SHARDINGS = ("ddp", "fsdp")
ACTIVATION_FORMULA = "Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer at 16-bit (x2 at fp32)"


@dataclass
class Plan:
    stage: str                          # "pretrain", "inherit", ...
    output: Path | None                 # where the result would be written (None for infer)
    output_config: ModelConfig | None   # the ModelConfig the stage would write (None: infer, prompt-tune)
    parameters: int                     # of the model the stage runs (the student for distill / KI)
    trainable: int                      # 0 for infer / inherit
    parameter_bytes: int
    devices: int
    memory_per_device: int              # bytes, estimate
    memory_breakdown: dict[str, int]    # weights, gradients, optimizer, activations, teacher, kv_cache, ...
    steps: int | None
    tokens: int | None                  # tokens processed (training: per run; infer: prompts x new tokens)
    notes: list[str] = field(default_factory=list)
    # Extra rows the table prints (e.g. the offload arithmetic); not part of the estimate.
    details: dict[str, Any] = field(default_factory=dict)


# -- input checkpoints ------------------------------------------------------------------------------
# A plan's stand-ins: {checkpoint path: the ModelConfig it will have}, for checkpoints that are not
# there yet (dry runs only: what an earlier pipeline step will write, or a real-scale recipe's
# external inputs). Every stage's plan(cfg, stand_ins=...) passes them down to these functions.
StandIns = Mapping[Any, ModelConfig]


def _stand_in(path: Path, stand_ins: StandIns | None) -> ModelConfig | None:
    if not stand_ins:
        return None
    wanted = path.resolve()
    return next((config for p, config in stand_ins.items() if Path(p).resolve() == wanted), None)


def is_assumed(path: Any, stand_ins: StandIns | None = None) -> bool:
    """Whether `path` is served by a stand-in (it has no config.json of its own)."""
    path = Path(path)
    return not (path / CONFIG_FILE).is_file() and _stand_in(path, stand_ins) is not None


def hf_model_config(path: Any) -> dict[str, Any] | None:
    """The config.json of a Hugging Face model directory (one naming a model_type), else None."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "model_type" in data and "arch" not in data else None


def checkpoint_config(path: Any, stand_ins: StandIns | None = None) -> ModelConfig:
    """The ModelConfig of the checkpoint at `path` from its config.json alone (no weights), or
    its stand-in. A Hugging Face model directory's config.json is translated as import would."""
    path = Path(path)
    hf_config = hf_model_config(path)
    if hf_config is not None:
        return config_from_hf(hf_config)
    if (path / CONFIG_FILE).is_file():
        return read_config(path)
    stand_in = _stand_in(path, stand_ins)
    if stand_in is not None:
        return stand_in
    raise UserError(f"{path} is not a cpmctl checkpoint (no config.json)")


def source_note(path: Any, what: str, stand_ins: StandIns | None = None) -> str | None:
    """A note for a stand-in input: "teacher runs/x: not there yet (assumed d_model 4096, ...)"."""
    if not is_assumed(path, stand_ins):
        return None
    c = checkpoint_config(path, stand_ins)
    return f"{what} {path}: not there yet (assumed {c.arch}, d_model {c.d_model}, {c.n_layers} layers" + \
        (f", {c.moe.experts} experts" if c.moe else "") + ")"


def stored_dtype(path: Any) -> str | None:
    """The dominant dtype the checkpoint writer recorded in cpmctl.json, or a Hugging Face
    config.json's torch_dtype (None: unknown)."""
    hf_config = hf_model_config(path)
    if hf_config is not None:
        value = hf_config.get("dtype", hf_config.get("torch_dtype"))
        return value if value in DTYPES else None
    provenance = Path(path) / PROVENANCE_FILE
    if not provenance.is_file():
        return None
    try:
        value = json.loads(provenance.read_text(encoding="utf-8")).get("dtype")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None
    return value if value in DTYPES else None


def dtype_bytes(name: str | None) -> int:
    """Bytes per value of a dtype name (float32 when unknown or not given)."""
    dtype = DTYPES.get(name or "float32")
    return dtype.itemsize if dtype is not None else 4


# -- counting on the meta device ----------------------------------------------------------------------
def meta_model(config: ModelConfig):
    """The model of `config` with shapes only (no memory, no init)."""
    return build_model(config, device="meta")


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_shapes(model, trainable: Any = None) -> list[tuple[int, ...]]:
    """Shapes of the parameters (only those whose name passes `trainable`, a predicate)."""
    return [tuple(p.shape) for name, p in model.named_parameters() if trainable is None or trainable(name)]


# -- memory formulas (module docstring) ------------------------------------------------------------
def optimizer_state_bytes(shapes: Iterable[tuple[int, ...]], optimizer: str) -> int:
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        if optimizer == "adamw":
            total += 2 * 4 * numel
        elif len(shape) >= 2:
            total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
        else:
            total += 4 * numel
    return total


def layer_activation_bytes(seq: int, batch: int, d_model: int, n_heads: int, bytes_per_value: int = 2) -> int:
    """Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes at 16-bit = s*b*(34h + 5as); scaled
    by bytes_per_value / 2 for other widths."""
    return seq * batch * (34 * d_model + 5 * n_heads * seq) * bytes_per_value // 2


def activation_bytes(config: ModelConfig, batch: int, seq_by_stack: Mapping[str, int], bytes_per_value: int) -> int:
    """Activations of one micro-batch summed over every layer application of each stack."""
    return sum(depth * layer_activation_bytes(seq_by_stack[stack], batch, config.d_model, config.n_heads, bytes_per_value)
               for stack, depth in config.stack_depths().items())


def checkpointed_activation_bytes(config: ModelConfig, batch: int, seq_by_stack: Mapping[str, int],
                                  bytes_per_value: int) -> int:
    """Activations under activation checkpointing: each layer keeps only its input (s*b*h values)
    and one layer at a time recomputes its full activations in the backward pass."""
    inputs = sum(depth * seq_by_stack[stack] * batch * config.d_model * bytes_per_value
                 for stack, depth in config.stack_depths().items())
    one_layer = max(layer_activation_bytes(seq_by_stack[stack], batch, config.d_model, config.n_heads, bytes_per_value)
                    for stack in config.stack_depths())
    return inputs + one_layer


def logits_bytes(batch: int, seq: int, vocab: int) -> int:
    return batch * seq * vocab * 4


def shard(value: int, devices: int, sharded: bool) -> int:
    """Per-device share: FSDP splits `value` over the devices (rounded up), DDP copies it."""
    return -(-value // devices) if sharded else value


def training_memory(*, weights: int, trainable_shapes: list[tuple[int, ...]], optimizer: str, devices: int = 1,
                    sharding: str = "ddp", activations: int = 0, logits: int = 0, teacher: int = 0) -> dict[str, int]:
    """The breakdown of a training run's memory per device (module docstring)."""
    if sharding not in SHARDINGS:
        raise UserError(f"unknown sharding {sharding!r}; expected ddp or fsdp", option="sharding")
    sharded = sharding == "fsdp"
    trainable = sum(math.prod(s) for s in trainable_shapes)
    out = {
        "weights": shard(weights, devices, sharded),
        "gradients": shard(4 * trainable, devices, sharded),
        "optimizer": shard(optimizer_state_bytes(trainable_shapes, optimizer), devices, sharded),
        "activations": activations,
        "logits": logits,
    }
    if teacher:
        out["teacher"] = teacher
    return out


def make_plan(stage: str, *, output: Path | None, output_config: ModelConfig | None, parameters: int, trainable: int,
              parameter_bytes: int, devices: int, breakdown: dict[str, int], steps: int | None, tokens: int | None,
              notes: list[str | None], details: dict[str, Any] | None = None) -> Plan:
    return Plan(stage=stage, output=output, output_config=output_config, parameters=parameters, trainable=trainable,
                parameter_bytes=parameter_bytes, devices=devices, memory_per_device=sum(breakdown.values()),
                memory_breakdown=dict(breakdown), steps=steps, tokens=tokens, notes=[n for n in notes if n],
                details=dict(details or {}))


# -- output ---------------------------------------------------------------------------------------
def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "stage": plan.stage, "output": None if plan.output is None else str(plan.output),
        "output_config": None if plan.output_config is None else plan.output_config.to_dict(),
        "parameters": plan.parameters, "trainable": plan.trainable, "parameter_bytes": plan.parameter_bytes,
        "devices": plan.devices, "memory_per_device": plan.memory_per_device,
        "memory_breakdown": dict(plan.memory_breakdown), "steps": plan.steps, "tokens": plan.tokens,
        "notes": list(plan.notes), "details": dict(plan.details),
    }


def render_plan(plan: Plan) -> None:
    table = Table(title=f"cpmctl {plan.stage}: dry run (nothing loaded or written)", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("output", "-" if plan.output is None else str(plan.output))
    if plan.output_config is not None:
        c = plan.output_config
        shape = f"{c.arch}, d_model {c.d_model}, {c.n_heads} heads, d_ff {c.d_ff}, layers {c.stack_depths()}, vocab {c.vocab_size}"
        if c.moe is not None:
            shape += f", MoE {c.moe.experts} x {c.moe.expert_size} top-{c.moe.top_k} ({c.moe.router})"
        table.add_row("output config", shape)
    table.add_row("parameters", f"{human_count(plan.parameters)} = {plan.parameters:,}")
    table.add_row("trainable", f"{human_count(plan.trainable)} = {plan.trainable:,}")
    table.add_row("parameter bytes", human_bytes(plan.parameter_bytes))
    table.add_row("devices", str(plan.devices))
    table.add_section()
    table.add_row("memory per device", human_bytes(plan.memory_per_device))
    for key, value in plan.memory_breakdown.items():
        table.add_row(f"  {key}", human_bytes(value))
    table.add_section()
    table.add_row("steps", "-" if plan.steps is None else f"{plan.steps:,}")
    table.add_row("tokens", "-" if plan.tokens is None else f"{human_count(plan.tokens)} = {plan.tokens:,}")
    rows = {k: v for k, v in plan.details.items() if not isinstance(v, (dict, list))}  # nested ones are for JSON
    if rows:
        table.add_section()
        for key, value in rows.items():
            table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    if plan.notes:
        table.add_section()
        for note in plan.notes:
            table.add_row("note", note)
    Console().print(table)
