"""The config of every cpmctl command: the one place each option is declared.

A field is an option: its name, type and default are the field's, its help and command-line
spelling are in `option(...)` (cpmctl.options). The CLI generates each command from its class
here, pipeline recipes and `--config`/`--set` are checked against the same fields, and each stage
module takes its class as the argument of `run(cfg)` and `plan(cfg)`. Adding an option is adding
a field.

They all live in this one module, which imports no torch, because `cpmctl --help` needs every
command's options at once: one cheap import instead of one per stage, and the stage modules (which
import torch at the top) stay out of start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpmctl.errors import UserError
from cpmctl.config import QUANT_SCHEMES
from cpmctl.options import check_value, option, specs

DEVICE_HELP = "cpu or cuda (default: cuda when present)."
FORCE_HELP = "Replace OUT if it exists."
RUN_FORCE_HELP = "Delete an existing run in OUT and start over."
RESUME_CHANGES_HELP = ("--resume: accept these changed settings (e.g. batch_size,lr), which alter the run's trajectory; "
                       "they are written to metrics.jsonl.")
KERNELS_HELP = "MoE and thresholded FFN kernels: auto (Triton on CUDA, the C++ sparse kernels at decode sizes on a CPU), torch or triton."
SEED_HELP = "Random seed."
MIXED_PRECISION_HELP = "no, bf16 or fp16 (GPU)."
PROGRESS_HELP = "Progress bars on a terminal (off with --json)."


def distinct_counts(config_cls: type, name: str, value: Any) -> list[int] | None:
    """A list-of-integers option's value without repeats (order kept); None stays None, an empty
    list is a UserError."""
    if value is None:
        return None
    spec = next(s for s in specs(config_cls) if s.name == name)
    try:
        counts = check_value(spec, value, "value")
    except UserError:
        raise UserError(f"{name} must be integers (e.g. 12,9,6), got {value!r}") from None
    if not counts:
        raise UserError(f"{name} is empty")
    return list(dict.fromkeys(counts))


def _cpu_flag(on: Any) -> Any:
    """`cpu = true` in older pretrain recipes: `device = "cpu"`."""
    return "cpu" if on is True else None if on is False else on


# -- stages ------------------------------------------------------------------------------------------
@dataclass
class PretrainConfig:
    out: Path = option(help="Run directory: metrics.jsonl, state/ (for --resume), checkpoint/ (the result).", argument=True)
    data: Path = option(help="Token shards (cpmctl data prepare).")
    init: Path | None = option(None, help="Start from this checkpoint.")
    preset: str | None = option(None, help="Start from this preset (random init).")
    tokenizer: Path | None = option(None, help="The tokenizer (default: the --init checkpoint's).")
    model: dict[str, Any] = option(default_factory=dict, metavar="TABLE",
                                   help="ModelConfig overrides for a preset: --set model.d_model=512, or a TOML table '{d_model = 512}'.")
    objective: str | None = option(None, help="span, mlm or causal (default: from the architecture).")
    seq_len: int = option(128, help="Tokens per sequence.")
    batch_size: int = option(8, help="Global micro-batch (rows), split over processes.")
    valid_fraction: float = option(0.01, help="Share of the shards held out for evaluation.")
    eval_batches: int = option(20, help="Batches per evaluation.")
    # training (see cpmctl.training.TrainConfig)
    max_steps: int = option(1000, help="Optimizer steps.")
    lr: float = option(1e-3, help="Peak learning rate.")
    optimizer: str = option("adamw", help="adamw or adafactor.")
    weight_decay: float = option(0.01, help="Weight decay.")
    schedule: str = option("linear", help="constant, linear or cosine decay.")
    warmup_steps: int = option(0, help="Steps of linear warm-up.")
    min_lr_ratio: float = option(0.0, help="Learning rate at the end of the decay, as a share of --lr.")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    max_grad_norm: float | None = option(1.0, help="Gradient clipping norm (nothing: no clipping).")
    mixed_precision: str = option("no", help=MIXED_PRECISION_HELP)
    seed: int = option(0, help=SEED_HELP)
    checkpoint_every: int = option(0, help="Steps between training states (0: at the end).")
    keep_checkpoints: int = option(2, help="Training states kept in OUT/state.")
    eval_every: int = option(0, help="Steps between evaluations (0: at the end).")
    log_every: int = option(10, help="Steps between train records in metrics.jsonl.")
    device: str | None = option(None, help=DEVICE_HELP, renamed_from={"cpu": _cpu_flag})
    progress: bool = option(True, help=PROGRESS_HELP, off_with_json=True)
    resume: bool = option(False, help="Continue OUT from its newest training state.")
    resume_with_changes: list[str] | None = option(None, metavar="NAME,NAME,...", help=RESUME_CHANGES_HELP)
    force: bool = option(False, help=RUN_FORCE_HELP)
    # knowledge inheritance
    teacher: Path | None = option(None, help="Knowledge inheritance from this checkpoint (same tokenizer).")
    # The KI defaults were chosen by benchmarks/ki.py (WordNet, 4 paired seeds, BENCHMARKS.md
    # "Knowledge inheritance"): T = 1 ended 0.046 [0.030, 0.062] nats below T = 2 and reached the
    # from-scratch final loss in every seed (T = 2 in one of four); N = half the run ended 0.014
    # [0.003, 0.025] nats below N = a quarter, so it stays.
    ki_steps: int | None = option(None, help="Teacher guidance length N: a_t = max(0, 1 - t/N) (default: max_steps // 2; "
                                              "it beat N = max_steps // 4 in BENCHMARKS.md).")
    ki_temperature: float = option(1.0, help="Distillation temperature T (1: it beat T = 2 in BENCHMARKS.md, "
                                             "0.046 nats lower final loss over 4 paired seeds).")
    ki_schedule: str = option("linear", help="linear, step or constant.")
    ki_alpha: float = option(0.5, help="a_t of the constant schedule.")
    teacher_cache: Path | None = option(None, help="Directory for the teacher's top-K logits (built once, then reused).")
    teacher_cache_k: int = option(10, help="K of the teacher cache.")
    # the Triton kernels are forward-only, so they serve the teacher and evaluation, the torch path the training
    kernels: str = option("auto", help="MoE FFN kernels: auto (Triton on CUDA for forward-only passes), torch or triton.")
    # parameter sharing and ODE steps (cpmctl.model.set_iterations)
    share_layers: bool = option(False, help="Preset: one block per stack applied n_layers times (ALBERT-style).")
    share_groups: int | None = option(None, help="Preset: G distinct blocks per stack, each applied n_layers / G times.")
    step_robust: bool = option(False, help="Shared model: sample the iterations n per batch with residual step n_layers / n.")
    robust_iterations: list[int] | None = option(None, metavar="N,N,...", help="--step-robust: the n to sample from, e.g. 12,9,6 (default L, 3L/4, L/2).")
    eval_iterations: list[int] | None = option(None, metavar="N,N,...", help="Also evaluate at these iteration counts (step L / n), e.g. 12,6.")

    def __post_init__(self) -> None:
        # "12,9,6", 12 or [12, 9, 12] (a config built in Python skips build_config's conversion):
        # distinct counts, order kept
        for name in ("robust_iterations", "eval_iterations"):
            setattr(self, name, distinct_counts(type(self), name, getattr(self, name)))

    @property
    def cpu(self) -> bool:
        """The training core's switch (cpmctl.training.TrainConfig.cpu)."""
        return self.device == "cpu"


@dataclass
class LaunchPlanConfig:
    """What a pretrain dry run needs to know of the launch; a real launch gets these from accelerate."""

    devices: int | None = option(None, help="--dry-run: processes of the launch (default: WORLD_SIZE, else 1).")
    sharding: str = option("ddp", help="--dry-run: ddp (a full copy per device) or fsdp (weights, gradients, optimizer split over the devices).")


@dataclass
class InheritConfig:
    src: Path = option(help="The checkpoint to grow.", argument=True)
    to: str = option(help="Target shape: a preset, a config.json / checkpoint, or KEY=VALUE pairs (d_model=512,n_layers=8).")
    out: Path = option(help="Output checkpoint directory.", argument=True)
    method: str = option("fpi", help="fpi (function-preserving), aki (new units from the next layer), tile (exact repetition), stack (depth by stacking).")
    vocab: Path | None = option(None, help="Expand to this tokenizer's vocabulary (longest-prefix init).")
    to_moe: int | None = option(None, help="Upcycle every FFN into this many experts (copies, top-1).")
    verify: bool = option(False, help="Print the largest logit difference between SRC and the result on sample text.")
    seed: int = option(0, help="Seed of the random unit copies, vocabulary fallbacks and router init.")
    force: bool = option(False, help=FORCE_HELP)


@dataclass
class QuantizeConfig:
    checkpoint: Path = option(help="A MoE checkpoint (float weights).", argument=True)
    out: Path = option(help="Output checkpoint directory.", argument=True)
    experts: str | None = option(None, help="Store the routed experts' weights as int8 (one scale per output row) or int4 (groups, with zeros).")
    linear: str | None = option(None, help="Store the linear layers of attention and dense FFNs as int8 or int4 (embeddings, norms, "
                                           "routers and the output projection stay float): dense models.")
    group_size: int | None = option(None, help="int4: inputs per scale and zero (32, 64, 128 or 256; default 64).")
    force: bool = option(False, help=FORCE_HELP)

    def validate(self) -> None:
        if (self.experts is None) == (self.linear is None):
            raise UserError("give one of --experts int8|int4 (MoE checkpoints) and --linear int8|int4")
        scheme = self.experts if self.experts is not None else self.linear
        if scheme not in QUANT_SCHEMES:
            flag = "--experts" if self.experts is not None else "--linear"
            raise UserError(f"{flag} must be one of {', '.join(QUANT_SCHEMES)}, got {scheme!r}")


# The value sets of choice options live here, at the bottom of the layers; the library modules that
# implement them (moefication, prompt, offload) import them from here.
SPLITS = ("cluster", "coactivation", "random")
ROUTERS = ("mlp", "center", "oracle")
PROMPT_POSITIONS = ("front", "back", "middle", "front+middle+back")
REPARAMS = ("none", "mlp")
OFFLOAD_MODES = ("none", "cpu", "disk")


METHODS = ("moe", "threshold")


@dataclass
class MoefyConfig:
    checkpoint: Path = option(help="A dense cpmctl checkpoint (or, with --restore, a MoEfied one).", argument=True)
    out: Path = option(help="Output checkpoint directory.", argument=True)
    method: str = option("moe", help="moe (experts and routers) or threshold (training-free activation sparsity, TEAL: per-layer magnitude thresholds).")
    sparsity: float = option(0.4, help="--method threshold: fraction of FFN input and hidden entries each layer's thresholds skip, in (0, 1).")
    experts: int | None = option(None, help="Experts per FFN (E).")
    expert_size: int | None = option(None, help="Neurons per expert (32 in the paper).")
    split: str = option("cluster", help="How neurons are grouped: cluster, coactivation or random.")
    router: str = option("mlp", help="mlp (trained), center (cluster centres) or oracle (evaluation bound).")
    top_k: int | None = option(None, help="Experts per token.")
    ratio: float | None = option(None, help="Fraction of experts per token (default 0.2 when neither --top-k nor --ratio).")
    ratios: list[float] | None = option(None, metavar="R,R,...", help="Also report held-out and --task quality, dense vs MoE, with each of these fractions of experts per token (same experts and routers; with --calibrate, each other ratio is calibrated for itself as a separate run would be; the checkpoint keeps --ratio / --top-k).")
    data: Path | None = option(None, help="Text/JSONL corpus or prepared shards: router training, co-activation, report.")
    eval_data: Path | None = option(None, help="Held-out text for the report (default: documents of --data kept out of training).")
    field: str = option("text", help="JSONL field holding the text.")
    max_docs: int = option(2000, help="Documents sampled from --data for statistics and router training.")
    eval_docs: int = option(300, help="Documents held out for the report (when no --eval-data).")
    max_tokens: int = option(32768, help="FFN inputs kept per layer (reservoir sample: bounded memory).")
    min_tokens: int = option(1024, help="Fewer training tokens than this: the data is too small.")
    seq_len: int = option(128, help="Tokens per document row.")
    batch_size: int = option(32, help="Rows per forward pass.")
    epochs: int = option(10, help="Router training epochs (Adam 1e-2, batch 512).")
    router_steps: int | None = option(None, help="Cap on router optimiser steps per layer.")
    calibrate: int = option(0, help="Steps of calibration with the routers active (tunes the MoE down projections).")
    calibrate_lr: float = option(1e-4, help="Learning rate of --calibrate.")
    kernels: str = option("auto", help=KERNELS_HELP)
    task: Path | None = option(None, help="JSONL task file ({text, text_pair?, label}): dense vs MoE accuracy in the report.")
    verbalizer: Path | None = option(None, help="JSON {label: word} for scoring --task by label words with the LM head.")
    max_task_examples: int | None = option(None, help="Score a random subset of --task of this size.")
    layers: list[str] | None = option(None, metavar="NAME,NAME,...", help="Comma-separated FFNs to MoEfy, e.g. encoder.0,encoder.3 (default all).")
    allow_uneven: bool = option(False, help="Allow d_ff not divisible by the expert size (zero-padded experts).")
    restore: bool = option(False, help="Turn a MoEfied checkpoint back into its exact dense checkpoint.")
    seed: int = option(0, help=SEED_HELP)
    force: bool = option(False, help=FORCE_HELP, renamed_from={"overwrite": None})

    @property
    def overwrite(self) -> bool:
        """The checkpoint writer's name for --force."""
        return self.force

    def validate(self) -> None:
        if self.restore:
            return
        if self.kernels not in ("auto", "torch", "triton"):
            raise UserError(f"unknown --kernels {self.kernels!r}; expected auto, torch or triton")
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "threshold":
            self._validate_threshold()
        else:
            self._validate_moe()
        for name in ("max_docs", "max_tokens", "seq_len", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.verbalizer is not None and self.task is None:
            raise UserError("--verbalizer names the label words of --task: give --task FILE.jsonl")
        if self.max_task_examples is not None and self.max_task_examples < 1:
            raise UserError(f"--max-task-examples must be >= 1, got {self.max_task_examples}")

    def _validate_threshold(self) -> None:
        if not 0 < self.sparsity < 1:
            raise UserError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if self.data is None:
            raise UserError("--method threshold calibrates its thresholds on activations: give --data FILE")
        if self.calibrate:
            raise UserError("--calibrate tunes MoE experts; --method threshold is training-free")
        if self.ratios:
            raise UserError("--ratios are fractions of MoE experts; --method threshold takes one --sparsity")

    def _validate_moe(self) -> None:
        if self.split not in SPLITS:
            raise UserError(f"unknown --split {self.split!r}; expected one of {', '.join(SPLITS)}")
        if self.router not in ROUTERS:
            raise UserError(f"unknown --router {self.router!r}; expected one of {', '.join(ROUTERS)}")
        if (self.experts is None) == (self.expert_size is None):
            raise UserError("give exactly one of --experts E and --expert-size N")
        if (self.experts is not None and self.experts < 1) or (self.expert_size is not None and self.expert_size < 1):
            raise UserError("--experts and --expert-size must be >= 1")
        if self.top_k is not None and self.ratio is not None:
            raise UserError("give either --top-k or --ratio, not both")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise UserError(f"--ratio must be in (0, 1], got {self.ratio}")
        for ratio in self.ratios or ():
            if not 0 < ratio <= 1:
                raise UserError(f"--ratios: each ratio must be in (0, 1], got {ratio}")
        if self.data is None and (self.router == "mlp" or self.split == "coactivation"):
            raise UserError(f"--router {self.router} / --split {self.split} learn from activations: give --data FILE")
        if self.calibrate < 0:
            raise UserError(f"--calibrate must be >= 0 steps, got {self.calibrate}")
        if self.calibrate and self.data is None:
            raise UserError("--calibrate trains on --data: give --data FILE")


RELU_KINDS = ("relu", "drelu")


@dataclass
class RelufyConfig:
    checkpoint: Path = option(help="A dense cpmctl checkpoint with GELU/SiLU FFNs (or a task model directory).", argument=True)
    out: Path = option(help="Output checkpoint directory.", argument=True)
    data: Path | None = option(None, help="Text/JSONL corpus for the recovery training and the report (required).")
    eval_data: Path | None = option(None, help="Held-out text for the report (default: documents of --data kept out of training).")
    field: str = option("text", help="JSONL field holding the text.")
    activation: str = option("relu", help="relu (on the gate branch of a gated FFN) or drelu (ReLU on both branches; gated FFNs).")
    steps: int = option(200, help="Recovery training steps (0: swap only).")
    lr: float = option(1e-4, help="Recovery learning rate (AdamW, warm-up then linear decay).")
    kd: float = option(0.5, help="Weight of KD from the original model in the LM loss, in [0, 1] (encoders always match its embeddings).")
    l1: float = option(0.0, help="Peak weight of the L1 activation-sparsity term (ProSparse); 0 turns it off.")
    l1_ramp: float = option(0.5, help="Fraction of the steps over which the L1 weight rises from 0 to its peak.")
    max_docs: int = option(4000, help="Documents sampled from --data for training.")
    eval_docs: int = option(200, help="Documents held out for the report (when no --eval-data).")
    min_tokens: int = option(1024, help="Fewer training tokens than this: the data is too small.")
    seq_len: int = option(128, help="Tokens per document row.")
    batch_size: int = option(16, help="Rows per step.")
    seed: int = option(0, help=SEED_HELP)
    force: bool = option(False, help=FORCE_HELP)

    def validate(self) -> None:
        if self.activation not in RELU_KINDS:
            raise UserError(f"unknown --activation {self.activation!r}; expected one of {', '.join(RELU_KINDS)}")
        if self.data is None:
            raise UserError("relufy trains and measures on text: give --data FILE")
        if self.steps < 0:
            raise UserError(f"--steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.kd <= 1:
            raise UserError(f"--kd must be in [0, 1], got {self.kd}")
        if self.l1 < 0:
            raise UserError(f"--l1 must be >= 0, got {self.l1}")
        if not 0 < self.l1_ramp <= 1:
            raise UserError(f"--l1-ramp must be in (0, 1], got {self.l1_ramp}")
        for name in ("max_docs", "eval_docs", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


HEADS = ("lm", "linear")


@dataclass
class PromptTuneConfig:
    model: Path = option(help="A cpmctl checkpoint (kept frozen).", argument=True)
    train: Path = option(help="Training JSONL: text, optional text_pair, label.")
    out: Path = option(help="Output adapter directory (PEFT layout).", argument=True)
    dev: Path | None = option(None, help="Dev JSONL: keep-the-best and early stopping on its accuracy.")
    test: Path | None = option(None, help="Test JSONL, scored once at the end with the best prompt.")
    prompt_length: int = option(100, help="Prompt vectors.")
    position: str = option("front", help="front, back, middle (between text and text_pair) or front+middle+back.")
    init: str = option("vocab", help='vocab (frequent tokens), labels (label words, then vocab), random, or text:"...".')
    reparam: str = option("none", help="none, or mlp (P-tuning style; folded into plain vectors when saved).")
    reparam_hidden: int | None = option(None, help="Hidden width of the reparameterisation MLP (default d_model).")
    deep: bool = option(False, help="A trainable prompt delta at every layer (P-tuning v2 style).")
    verbalizer: Path | None = option(None, help="JSON {label: word} (default: the label strings).")
    head: str = option("lm", help="lm (score label words with the LM head) or linear (a trained linear head).")
    pooling: str = option("mean", help="Linear head pooling: mean or last.")
    full: bool = option(False, help="Full fine-tuning baseline (every weight trains; no prompt).")
    optimizer: str | None = option(None, help="adafactor (default) or adamw (default with --full).")
    lr: float | None = option(None, help="Constant learning rate (default 0.3 adafactor, 1e-3 adamw, 3e-5 --full).")
    weight_decay: float = option(0.0, help="Weight decay.")
    batch_size: int = option(16, help="Examples per step.")
    max_steps: int = option(1000, help="Optimizer steps.")
    eval_every: int = option(100, help="Steps between dev evaluations.")
    patience: int | None = option(5, help="Dev evaluations without improvement before stopping.")
    max_length: int | None = option(None, help="Cap on input tokens, prompt included (inputs are truncated with a warning).")
    max_train_examples: int | None = option(None, help="Train on a random subset of this size.")
    max_dev_examples: int | None = option(None, help="Evaluate on a random dev subset of this size.")
    max_test_examples: int | None = option(None, help="Test on a random subset of this size.")
    gradient_checkpointing: bool = option(False, help="Recompute activations in the backward pass (less memory).")
    mixed_precision: str = option("no", help=MIXED_PRECISION_HELP)
    seed: int = option(0, help=SEED_HELP)
    device: str | None = option(None, help=DEVICE_HELP)
    resume: bool = option(False, help="Continue an interrupted run from OUT.train/.")
    resume_with_changes: list[str] | None = option(None, metavar="NAME,NAME,...", help=RESUME_CHANGES_HELP)
    force: bool = option(False, help="Replace OUT (and an earlier run's state) if they exist.")
    progress: bool = option(True, help=PROGRESS_HELP, off_with_json=True)

    def validate(self) -> None:
        if self.head not in HEADS:
            raise UserError(f"unknown --head {self.head!r}; expected one of {', '.join(HEADS)}")
        if not self.full:
            if self.position not in PROMPT_POSITIONS:
                raise UserError(f"unknown --position {self.position!r}; expected one of {', '.join(PROMPT_POSITIONS)}")
            if self.reparam not in REPARAMS:
                raise UserError(f"unknown --reparam {self.reparam!r}; expected one of {', '.join(REPARAMS)}")
            if self.prompt_length < 1:
                raise UserError(f"--prompt-length must be >= 1, got {self.prompt_length}")
        for name in ("batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise UserError(f"--eval-every must be >= 0, got {self.eval_every}")
        for name in ("max_length", "max_train_examples", "max_dev_examples", "max_test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")

    @property
    def run_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".train")

    def resolved_optimizer(self) -> str:
        return self.optimizer or ("adamw" if self.full else "adafactor")

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.full:
            return 3e-5
        return 0.3 if self.resolved_optimizer() == "adafactor" else 1e-3


@dataclass
class DistillConfig:
    teacher: Path = option(help="Teacher: a task model (checkpoint with task.json, e.g. OUT/checkpoint of a fine-tuning run) or a checkpoint.")
    out: Path = option(help="Run directory: metrics.jsonl, state/ (for --resume), checkpoint/ (the student).", argument=True)
    train: Path | None = option(None, help="Classification task: JSONL of {'text', 'text_pair'?, 'label'}.")
    dev: Path | None = option(None, help="Dev JSONL: accuracy and macro-F1 at each evaluation.")
    data: Path | None = option(None, help="LM distillation on token shards (cpmctl data prepare) instead of a task.",
                               renamed_from={"corpus": None})
    # the student: a checkpoint, a layer selection from the teacher, or a preset
    student: Path | None = option(None, help="Start the student from this checkpoint (same tokenizer as the teacher).")
    student_layers: str | None = option(None, help="N (every other teacher layer, top one kept) or a list like 0,2,4 (default: half).")
    student_decoder_layers: str | None = option(None, help="Encoder-decoder: the decoder's layers (default: as --student-layers).")
    student_config: str | None = option(None, help="A freshly initialised student of this preset.")
    # the objective
    ce_weight: float = option(1.0, help="Student cross-entropy on the originals.")
    kd_weight: float = option(1.0, help="KD (KL at --temperature) on the originals.")
    mix_weight: float = option(1.0, help="KD on mixed inputs (needs the teacher online).")
    smix_weight: float = option(0.0, help="Student cross-entropy on mixed inputs with mixed labels.")
    temperature: float = option(2.0, help="KD temperature T (the KL is scaled by T^2).")
    mixup_alpha: float = option(0.4, help="lambda ~ Beta(a, a).")
    augment: int = option(0, help="Perturbed copies of each training example (token masking/replacement).")
    augment_prob: float = option(0.15, help="Share of tokens perturbed in an augmented copy (half masked, half replaced).")
    teacher_cache: Path | None = option(None, help="Directory of the teacher's logits on the training set (built once, reused); --data: its top-K per target.",
                                        renamed_from={"teacher_logits_cache": None})
    teacher_cache_k: int = option(10, help="--data with --teacher-cache: teacher logits kept per target position.")
    # classification scoring (as in prompt-tune)
    head: str = option("linear", help="Classification: linear (pooled hidden state) or lm (label words scored by the LM head, as in prompt-tune).")
    verbalizer: Path | None = option(None, help="--head lm: JSON {label: word} (default: the labels, or the teacher's words).")
    # data
    train_fraction: float = option(1.0, help="Train on this seeded share of --train.")
    max_length: int = option(128, help="Tokens per task example.")
    seq_len: int = option(128, help="Tokens per sequence (--data).")
    pooling: str = option("mean", help="Linear head pooling: mean or last.")
    freeze_embeddings: bool = option(False, help="Keep the student's embedding tables fixed (faster steps).")
    # training (the shared core)
    batch_size: int = option(32, help="Examples per micro-batch.")
    epochs: float = option(3.0, help="Passes over the training set (unless --max-steps).")
    max_steps: int | None = option(None, help="Optimizer steps.")
    lr: float = option(5e-5, help="Peak learning rate (AdamW).")
    weight_decay: float = option(0.01, help="Weight decay.")
    warmup_ratio: float = option(0.06, help="Share of the steps spent warming up.")
    schedule: str = option("linear", help="constant, linear or cosine decay.")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm.")
    mixed_precision: str = option("no", help=MIXED_PRECISION_HELP)
    eval_every: int = option(0, help="Steps between dev evaluations (0: at the end).")
    patience: int | None = option(None, help="Dev evaluations without a better dev accuracy before stopping (needs --dev, --eval-every).")
    keep_best: bool = option(False, help="Save the student of the best dev accuracy, not the last one (needs --dev, --eval-every).")
    checkpoint_every: int = option(0, help="Steps between training states (0: at the end).")
    log_every: int = option(10, help="Steps between train records in metrics.jsonl.")
    seed: int = option(0, help=SEED_HELP)
    device: str | None = option(None, help=DEVICE_HELP)
    resume: bool = option(False, help="Continue OUT from its newest training state.")
    resume_with_changes: list[str] | None = option(None, metavar="NAME,NAME,...", help=RESUME_CHANGES_HELP)
    force: bool = option(False, help=RUN_FORCE_HELP)
    progress: bool = option(True, help=PROGRESS_HELP, off_with_json=True)



@dataclass
class InferConfig:
    checkpoint: Path = option(help="A cpmctl checkpoint directory.", argument=True)
    texts: list[str] | None = option(None, argument=True, metavar="TEXT",
                                     help="Prompts (or sentences to embed, for encoder-only models).")
    input_file: Path | None = option(None, flag="--input", help="JSONL file of {'text': ...} records instead of TEXT.")
    max_new_tokens: int = option(32, help="Tokens to generate per prompt.")
    temperature: float = option(0.0, help="0 = greedy; > 0 samples.")
    top_k: int | None = option(None, help="Sample among the k most likely tokens.")
    top_p: float | None = option(None, help="Nucleus sampling threshold.")
    seed: int = option(0, help="Random seed for sampling.")
    batch_size: int = option(8, help="Prompts per forward pass.")
    device: str | None = option(None, help=DEVICE_HELP)
    dtype: str | None = option(None, help="float32, bfloat16 or float16 (default: as stored); int8 or int4 (group 64): quantize the "
                                          "attention and FFN linear layers weight-only at load (other weights as stored).")
    stream: bool = option(False, help="Print tokens as they are generated (single prompt; off with --json).", off_with_json=True)
    normalize: bool = option(True, help="L2-normalise embeddings (encoder-only).")
    prompt: Path | None = option(None, help="A prompt adapter from `cpmctl prompt-tune`: classify the inputs (accuracy when they are labelled).")
    kernels: str = option("auto", help=KERNELS_HELP)
    offload: str = option("none", help="none; disk: weights beyond --memory-budget are read from the checkpoint as needed; cpu: they wait in host memory (GPU runs).")
    memory_budget: str | None = option(None, help="With --offload: memory for weights on the device (GPU) or in RAM (CPU), e.g. 2GiB, 512MB or 25% of the weights.")
    prefetch: bool = option(True, help="With --offload: load the next layer's weights while the current one computes.")
    expert_compute: str = option("device", help="With --offload cpu: where a missing expert computes: device (copy it in), host (the CPU, where it lives; Fiddler) or auto (per expert per step, by measured costs).")
    host_layers: int = option(0, help="With --offload cpu: the experts of the first N MoE layers compute on the host (llama.cpp's --n-cpu-moe).")
    iterations: int | None = option(None, help="Parameter-shared models: apply the shared blocks this many times (fewer = faster).")
    step_size: float | None = option(None, help="Parameter-shared models: residual step size (default: trained iterations / --iterations).")
    chat: bool = option(False, help="Each text is a user turn, rendered with the tokenizer's chat template (imported models keep theirs).")
    bandwidth: str | None = option(None, help="With --dry-run --offload: the disk or PCIe bandwidth, e.g. 3GB/s, for the transfer-bound tokens/s.")
    compile: bool = option(False, help="Decoder-only generation through torch.compile'd prefill/decode steps (static KV cache, frozen weights, "
                                        "GEMM kernels chosen by measurement); the first run of each shape compiles, later runs reuse inductor's cache.")
    cpu_gemv: str = option("auto", help="On a CPU, decode-sized int8/int4/bf16 linear layers run cpmctl's C++ GEMV: auto (where it builds; "
                                        "else torch's kernels, with a note), on (exit 2 when it cannot build) or off.")

    def validate(self) -> None:
        if (self.texts is None) == (self.input_file is None):
            raise UserError("give either TEXT or --input FILE.jsonl")
        if self.compile and self.offload != "none":
            raise UserError("--compile needs the weights resident (--offload none): offloading swaps them during the forward")
        if self.cpu_gemv not in ("auto", "on", "off"):
            raise UserError(f"unknown --cpu-gemv {self.cpu_gemv!r}; expected auto, on or off")
        if self.compile and self.prompt is not None:
            raise UserError("--compile applies to generation; a --prompt adapter classifies")
        if self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chat and self.prompt is not None:
            raise UserError("--chat applies to generation; a --prompt adapter classifies the raw text")
        if self.prompt is not None and (self.iterations is not None or self.step_size is not None):
            raise UserError("--iterations/--step-size cannot be combined with --prompt: a prompt is trained for the model's own depth")
        if self.offload not in OFFLOAD_MODES:
            raise UserError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        if self.offload == "none" and self.memory_budget is not None:
            raise UserError("--memory-budget needs --offload cpu or --offload disk")
        if self.offload != "none" and self.memory_budget is None:
            raise UserError(f"--offload {self.offload} needs --memory-budget (e.g. 2GiB, or 25% of the weights)")
        if self.bandwidth is not None and self.offload == "none":
            raise UserError("--bandwidth needs --offload cpu or --offload disk (it sizes the expert transfers)")


# -- tools -------------------------------------------------------------------------------------------
@dataclass
class ConvertHfConfig:
    src: Path = option(help="Hugging Face model directory (config.json + weights), or a cpmctl checkpoint with --export.", argument=True)
    out: Path = option(help="Output directory (must not exist unless --force).", argument=True)
    export: bool = option(False, help="Go the other way: cpmctl checkpoint -> Hugging Face directory.")
    dtype: str | None = option(None, help="Store weights as float32, bfloat16 or float16 (default: as in SRC).")
    force: bool = option(False, help=FORCE_HELP)


@dataclass
class ConvertCpm2Config:
    src: Path = option(help="BMInf's checkpoint.pt (or its directory), or a directory of mp_rank_XX_model_states.pt shards.",
                       argument=True)
    out: Path = option(help="Output directory (must not exist unless --force).", argument=True)
    vocab: Path | None = option(None, help="The release's vocab.txt (default: vocab.txt beside SRC).")
    dtype: str = option("float32", help="Store weights as float32, bfloat16 or float16.")
    force: bool = option(False, help=FORCE_HELP)


@dataclass
class InfoConfig:
    checkpoint: Path | None = option(None, help="A cpmctl checkpoint directory.", argument=True)
    preset: str | None = option(None, help="Describe a named preset instead (built on the meta device).")


@dataclass
class TokenizerTrainConfig:
    corpus: Path = option(help="Text (one document per line) or JSONL with a 'text' field.", argument=True)
    out: Path = option(help="Output directory for the tokenizer.", argument=True)
    vocab_size: int = option(help="Vocabulary size, special tokens included.")
    model_type: str = option("unigram", help="unigram or bpe.")
    sentinels: int = option(100, help="Sentinel tokens for span corruption (<extra_id_0> ...).")
    force: bool = option(False, help=FORCE_HELP)


@dataclass
class TokenizerEncodeConfig:
    tokenizer: Path = option(help="Tokenizer directory or file (tokenizer.model / tokenizer.json), or a checkpoint.", argument=True)
    text: str = option(help="Text to encode.", argument=True)


@dataclass
class DataPrepareConfig:
    corpus: Path = option(help="Text (one document per line) or JSONL (.jsonl/.json).", argument=True)
    out: Path = option(help="Output directory for the token shards.", argument=True)
    tokenizer: Path = option(help="Tokenizer directory or file, or a checkpoint holding one.")
    field: str = option("text", help="JSONL field holding the text.")
    shard_tokens: int = option(64 * 2**20, help="Tokens per shard file.")
    force: bool = option(False, help=FORCE_HELP)


@dataclass
class DataStdlibConfig:
    out: Path = option(help="Output directory: corpus.txt and task/{train,dev,test}.jsonl, labels.json.", argument=True)
    num_classes: int = option(8, help="Task classes: the best-populated top-level modules.")
    min_per_class: int = option(100, help="Fewest documents a class may have.")
    max_per_class: int | None = option(None, help="Keep at most this many documents per class.")
    max_docs: int | None = option(None, help="Use only the first N documents of the corpus.")
    force: bool = option(False, help=FORCE_HELP)


@dataclass
class RunConfig:
    recipe: Path = option(help="A pipeline recipe (TOML with [[step]] tables), e.g. recipes/demo.toml.", argument=True)
    out: Path = option(help="Output directory: every step's output, recipes/ and pipeline.json.", argument=True)
    force: bool = option(False, help="Pass --force to every step that has it (replace earlier outputs).")
    start: str | None = option(None, flag="--from", help="Start at this step (earlier steps' outputs must exist).")
    only: str | None = option(None, help="Run just this step.")
