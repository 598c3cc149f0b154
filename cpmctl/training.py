"""The shared training core: one loop for every stage that trains (pretrain, prompt-tune, distill).

A stage supplies *what* to train; this module owns *how*:

    from cpmctl.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(out=run_dir, max_steps=1000, lr=1e-3, schedule="cosine",
                                  warmup_steps=100, checkpoint_every=200, eval_every=100))
    teacher.to(trainer.device)                       # anything besides the model: move it yourself
    result = trainer.fit(
        model,                                       # an nn.Module (not yet wrapped or moved)
        loss_fn,                                     # (model, batch) -> (loss, stats)
        batches,                                     # iterable of *global* batches with
                                                     # state_dict()/load_state_dict() (cpmctl.data.Batches)
        trainable=["prompt"],                        # optional: parameter names, prefixes or a predicate;
                                                     # only these get gradients and optimizer state
        eval_fn=lambda model: {"loss": ...},         # optional: metrics dict, every eval_every steps
        on_best=lambda model, step, metrics: ...,    # optional: called when cfg.best_metric improves
    )

Contract of the pieces:
- `batches` yields dicts of tensors whose first dimension is the *global* micro-batch (the same
  on every process). With W processes, process r trains on rows [r*B/W, (r+1)*B/W) of it, so the
  data stream and its resumable position do not depend on W. One optimizer step consumes
  `cfg.grad_accum` micro-batches; the effective batch is B * grad_accum rows.
- `loss_fn(model, batch)` gets the (possibly DDP/FSDP-wrapped) model: call `model(...)` for the
  forward pass (use `trainer.unwrapped` for attributes). It returns the loss *averaged* over the
  batch's units (target tokens, or rows) and a dict of floats. Special keys:
    "count"   units the loss is averaged over (default: labels != -100 when the batch has 2-D
              `labels`, else its rows). The trainer weights each process's and micro-batch's loss
              by it, so the gradient is the mean over the whole step, whatever W and grad_accum;
    "tokens"  tokens processed (default: the number of `attention_mask` ones, or `input_ids`
              elements); summed for tokens/s;
    "flops"   FLOPs spent outside the trained model, e.g. a teacher's forward pass; added to the
              model's own 6 * params * tokens (or `flops_per_token` given to fit()).
  Every other key is averaged (weighted by "count") and logged.
- `trainer.step` is the 0-based optimizer step being computed (e.g. for a KI weight a_t);
  `trainer.device`, `trainer.is_main`, `trainer.rank`, `trainer.world`, `trainer.wait()` and
  `trainer.to_device(batch)` are there for the caller's own work (teachers, caches, saving);
  `trainer.unwrapped` is the model without DDP/FSDP wrapping once fit() has started. Under FSDP
  its parameters are this process's shards (DTensors), so a stage saves the model through
  `trainer.full_state_dict()`: the whole state dict on the main process, {} on the others (a
  collective under FSDP: every process calls it). `on_best` also gets the sharded module there.
- `eval_fn(model)` runs under no_grad in eval mode on every process (it must be deterministic);
  the metrics are logged and, with `cfg.best_metric`, drive keep-the-best and early stopping
  (`cfg.patience` evaluations without improvement stop the run).

What the trainer does: accelerate `Accelerator` setup (CPU, one GPU, DDP or FSDP2 from an
`accelerate launch` config, e.g. recipes/accelerate-fsdp.yaml; gloo for several CPU processes,
where accelerate runs an FSDP config as DDP; FSDP1 (fsdp_version 1), DeepSpeed and Megatron-LM are
refused with a UserError), AdamW (fused where torch has the kernel) or torch's Adafactor, warm-up
then constant/linear/cosine decay (`lr_at`), gradient accumulation (no gradient sync until the
last micro-batch), clipping, bf16/fp16 autocast, atomic training-state checkpoints every N steps
(`out/state/step-XXXXXXXX/`, safetensors and JSON only, never a pickle: trainable weights and
buffers, optimizer state, every process's RNG states, and `trainer.json` with step, data position,
counters and the best metric; see "training states" below; under FSDP the shards are gathered into
whole tensors on save and scattered on resume, so a state resumes under any number of processes,
with or without FSDP), `keep_checkpoints` newest kept while training and `keep_state` once the run
completes (default: the final state only), exact resume (`cfg.resume`: the latest state; the
learning rate is a pure function of the step), rank-0 progress (rich on a terminal, plain log
lines otherwise) with loss, tokens/s and ETA, metrics as JSON lines in `out/metrics.jsonl`,
throughput and FLOP accounting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from cpmctl.checkpoint import write_safetensors
from cpmctl.errors import UserError
from cpmctl.training_state import (MODEL_STATE_FILE, OPTIMIZER_FILE, OPTIMIZER_TENSORS_FILE, STATE_DIR, STATE_FORMAT,
                                   all_gather_bytes, canonical_name, gather_model_state, gather_optimizer_state,
                                   inner_optimizer, latest_state, load_model_state, load_optimizer_state,
                                   optimizer_state_to_load, pack, rank_rng_state, read_safetensors,
                                   read_trainer_record, rng_state, set_rng_state, state_dirs, write_state)

log = logging.getLogger("cpmctl")

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "bf16", "fp16")
KEEP_STATES = ("last", "all", "none")
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.safetensors"  # cfg.restore_best: the trainable tensors at the best evaluation
IGNORE_INDEX = -100

LossFn = Callable[[nn.Module, dict[str, Any]], "tuple[Tensor, dict[str, float]]"]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainConfig:
    """How to train (what to train is given to `Trainer.fit`)."""

    out: Path                          # run directory: state/, metrics.jsonl
    max_steps: int                     # optimizer steps
    lr: float = 1e-3
    optimizer: str = "adamw"           # adamw | adafactor
    weight_decay: float = 0.0          # on matrices only (not norms, biases, 1-D tensors)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"           # decay after warm-up: constant | linear | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0          # floor of the decay, as a fraction of lr
    grad_accum: int = 1                # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    mixed_precision: str = "no"        # no | bf16 | fp16 (autocast; fp16 with loss scaling, GPU only)
    seed: int = 0
    checkpoint_every: int = 0          # steps between training-state checkpoints (0: at the end only)
    keep_checkpoints: int = 2          # newest training states kept while training
    # Training states left once a run has completed (max_steps, data exhausted or early stop):
    # "last" (default) the final one only, so `--resume` with a larger max_steps extends the run;
    # "all" the keep_checkpoints newest; "none" no state (out/state is removed: nothing to extend).
    keep_state: str = "last"
    eval_every: int = 0                # steps between evaluations (0: at the end only, if eval_fn)
    log_every: int = 10                # steps between train records / progress lines
    resume: bool = False               # continue from the newest state in out/state
    cpu: bool = False                  # force the CPU even where CUDA exists
    progress: bool = True              # rank-0 progress display / log lines
    # FSDP shards the model's parameters; a stage may allow it only if it saves through
    # trainer.full_state_dict() and never calls submodules of the sharded model directly.
    allow_fsdp: bool = False
    best_metric: str | None = None     # eval metric driving keep-the-best and early stopping
    best_mode: str = "min"             # min | max
    patience: int | None = None        # evaluations without improvement before stopping
    # With best_metric: the trainable tensors at each improvement go to out/best.safetensors, and
    # fit() loads the best ones back into the model before it returns, so what the caller saves
    # is the best evaluated model, not the last one (early stopping then ends `patience`
    # evaluations past it). The training state stays the last step's, for --resume.
    restore_best: bool = False
    # The stage's settings that decide the run's trajectory besides this config's (batch size,
    # data, sequence length, ...): recorded in every state; a resume with other values is refused
    # unless each changed name is listed in resume_with_changes (and then written to the log).
    trajectory: dict[str, Any] = field(default_factory=dict)
    resume_with_changes: list[str] | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        checks = [
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}"),
            (self.mixed_precision in PRECISIONS, f"unknown mixed precision {self.mixed_precision!r}; expected one of {', '.join(PRECISIONS)}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.checkpoint_every >= 0 and self.eval_every >= 0, "checkpoint_every and eval_every must be >= 0"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.keep_state in KEEP_STATES, f"unknown keep_state {self.keep_state!r}; expected one of {', '.join(KEEP_STATES)}"),
            (self.best_mode in ("min", "max"), f"best_mode must be min or max, got {self.best_mode!r}"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (not self.restore_best or self.best_metric is not None, "restore_best needs a best_metric"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class TrainResult:
    step: int                                   # optimizer steps done (in total, across resumes)
    tokens: int                                 # tokens processed (all processes)
    flops: float                                # model + extra (teacher) FLOPs
    train_seconds: float                        # wall-clock in the loop (all sessions of the run)
    last_train: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None          # {"step": s, "metrics": {...}} with best_metric
    stopped_early: bool = False
    resumed_from: int | None = None


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped a run after it saved a resumable state; exit 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, option="resume")
        self.exit_code = 128 + signum


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received` (the loop saves a state at the next
    step boundary and stops); a second signal of either kind acts at once, as by default. Only
    the main thread can take signals; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


# -- pure helpers -------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to cfg.lr over
    warmup_steps, then constant, linear or cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "linear":
        scale = 1.0 - progress
    else:
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * scale)


def model_flops_per_token(model: nn.Module, *, trainable_only: bool = False) -> float:
    """6 * parameters (forward 2N + backward 4N per token), embedding tables excluded since a
    lookup costs no multiply-adds. An untied output projection is a matmul and counts."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if not trainable_only or p.requires_grad:
                total += p.numel()
    return 6.0 * total


def forward_flops_per_token(model: nn.Module) -> float:
    """2 * parameters (embeddings excluded): the cost of one forward pass per token."""
    return model_flops_per_token(model) / 3.0


def default_count(batch: Mapping[str, Any]) -> int:
    """Units a loss is averaged over: target tokens (2-D labels != -100), else rows."""
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.dim() >= 2:
        return int((labels != IGNORE_INDEX).sum())
    return _rows(batch)


def default_tokens(batch: Mapping[str, Any]) -> int:
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor):
        n = int(mask.sum())
        dec = batch.get("decoder_attention_mask")
        return n + (int(dec.sum()) if isinstance(dec, Tensor) else 0)
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, Tensor) else _rows(batch)


def _rows(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise UserError("a batch needs at least one tensor with a batch dimension")


def local_slice(batch: Mapping[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Rows [rank*B/W, (rank+1)*B/W) of every batch tensor; other values are kept as they are."""
    if world == 1:
        return dict(batch)
    rows = _rows(batch)
    if rows % world:
        raise UserError(f"the global batch of {rows} rows does not split over {world} processes; "
                        f"use a batch size divisible by {world}")
    per = rows // world
    return {k: (v[rank * per:(rank + 1) * per] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == rows else v)
            for k, v in batch.items()}


def select_trainable(model: nn.Module, trainable: Any) -> list[str]:
    """Set requires_grad from `trainable` (None: all; names/prefixes; or a predicate on the
    name); returns the trainable names. Nothing trainable is a UserError."""
    names = []
    for name, p in model.named_parameters():
        if trainable is None:
            keep = True
        elif callable(trainable):
            keep = bool(trainable(name))
        else:
            keep = any(name == t or name.startswith(t.rstrip(".") + ".") for t in trainable)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise UserError(f"no parameter matches the trainable set {trainable!r}")
    return names


def make_optimizer(params: Sequence[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer == "adamw":
        # The fused kernel does the whole update in one pass over each tensor (about 5x faster
        # optimizer steps than the default on a 2-core CPU); it exists for floating-point
        # parameters on the devices torch lists.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 fused=fused_adamw_supported([p for _, p in params]) or None)
    if not hasattr(torch.optim, "Adafactor"):
        raise UserError("Adafactor needs torch >= 2.5; use optimizer = adamw")
    return torch.optim.Adafactor(groups, lr=cfg.lr)


def fused_adamw_supported(params: Sequence[Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for every one of `params` (device and dtype)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices  # private: may be gone

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper: without it, trust CUDA only
        devices = {"cuda"}
    return bool(params) and all(p.device.type in devices and torch.is_floating_point(p) for p in params)


class _Progress:
    """Rank-0 display: a rich bar on a terminal, plain log lines (every log_every steps) otherwise."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled = enabled
        self.total = total
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, record: dict[str, Any], eta_s: float) -> None:
        if not self.enabled:
            return
        info = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            log.info(f"step {step}/{self.total}  {info}  lr {record['lr']:.3g}  eta {_duration(eta_s)}")

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _float(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, Tensor) else float(value)


# -- the trainer --------------------------------------------------------------------------------
class Trainer:
    """Owns the Accelerator; `fit` runs one training run. See the module docstring."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator  # +0.4 s at import (measured): only a Trainer needs it
        from accelerate.utils import set_seed  # (same)

        if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
            raise UserError("fp16 mixed precision needs a GPU; use bf16 on the CPU")
        self.cfg = cfg
        # accelerate picks multi-process CPU (gloo) only when told cpu=True.
        self.accelerator = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
        self._check_distributed_support()
        set_seed(cfg.seed)
        self.unwrapped: nn.Module | None = None
        self.step = 0  # the optimizer step being computed (0-based); loss functions may read it

    # process facts the callers need (trainer.step: the 0-based optimizer step in progress)
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def _any_process_signalled(self, signals: StopSignals) -> bool:
        """Whether any process got SIGINT/SIGTERM: the state save that follows is collective, so
        every process must agree (one tiny reduction per step under a multi-process launch)."""
        if self.world == 1:
            return signals.received is not None
        flag = torch.tensor([0 if signals.received is None else signals.received], device=self.device)
        flag = self.accelerator.reduce(flag, reduction="max") if hasattr(self.accelerator, "reduce") else flag
        if int(flag.item()) and signals.received is None:
            signals.received = int(flag.item())
        return bool(int(flag.item()))

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}

    # -- the loop ------------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[dict[str, Any]],
        *,
        trainable: Any = None,
        eval_fn: EvalFn | None = None,
        on_best: Callable[[nn.Module, int, dict[str, float]], None] | None = None,
        count_fn: Callable[[Mapping[str, Any]], int] = default_count,
        flops_per_token: float | None = None,
    ) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        if not (hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict")):
            raise TypeError("batches must provide state_dict()/load_state_dict() for exact resume")
        self._trainable = select_trainable(model, trainable)
        if flops_per_token is None:
            flops_per_token = model_flops_per_token(model)
        resume_dir = self._resume_dir()
        if resume_dir is None and latest_state(cfg.out) is not None:
            raise UserError(f"{cfg.out} already holds a training state; resume it or choose a new output", option="resume")

        model = model.to(self.device)
        # The whole (unsharded) shapes, to check a state against before FSDP shards the model.
        self._shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        # Model and optimizer are prepared together: FSDP2 replaces the parameters by sharded ones
        # and accelerate then swaps them in the optimizer (DDP keeps the same parameters).
        optimizer = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg)
        wrapped, optimizer = acc.prepare(model, optimizer)
        self.unwrapped = acc.unwrap_model(wrapped)
        self._wrapped, self._optimizer = wrapped, optimizer
        # All the model's parameters (frozen ones have no gradient): FSDP clips a sharded model
        # through its own path only when given exactly these.
        clip_params = list(wrapped.parameters())

        state = {"step": 0, "tokens": 0, "flops": 0.0, "train_seconds": 0.0, "best": None, "bad_evals": 0}
        changes: dict[str, Any] = {}
        if resume_dir is not None:
            saved = self._load_state(resume_dir)
            changes = accepted_changes(saved.get("config"), cfg)
            batches.load_state_dict(saved["data"])
            state.update({k: saved[k] for k in state})
        saved_step = state["step"] if resume_dir is not None else None
        resumed_from = state["step"] if resume_dir is not None else None
        if self.is_main:
            cfg.out.mkdir(parents=True, exist_ok=True)
            self._trim_metrics(state["step"] if resume_dir is not None else 0)
            if resume_dir is None:
                (cfg.out / BEST_FILE).unlink(missing_ok=True)  # an earlier run's best is not this run's
        self.wait()
        if cfg.restore_best:
            on_best = self._keeping_best(on_best)

        iterator = iter(batches)
        progress = _Progress(cfg.progress and self.is_main, cfg.max_steps, state["step"])
        if resumed_from is not None:
            progress.note(f"resumed from {resume_dir} at step {resumed_from}")
            if changes:
                progress.note("resumed with changed settings: " + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items()))
                self._write_metrics({"step": resumed_from, "event": "resume_with_changes",
                                     "changes": {k: {"before": v[0], "after": v[1]} for k, v in changes.items()}})
        window: dict[str, float] = {}
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        stopped_early = exhausted = False
        session_start, session_tokens = time.monotonic(), 0
        base_seconds = state["train_seconds"]
        signals = StopSignals().__enter__()  # left in the finally below
        try:
            while state["step"] < cfg.max_steps and not stopped_early:
                micro = []
                for _ in range(cfg.grad_accum):
                    try:
                        micro.append(next(iterator))
                    except StopIteration:
                        exhausted = True
                        break
                if exhausted:
                    break
                self.step = state["step"]
                step_stats = self._step(wrapped, optimizer, clip_params, loss_fn, micro, count_fn, flops_per_token, state["step"])
                state["step"] += 1
                state["tokens"] += int(step_stats["tokens"])
                state["flops"] += step_stats["flops"]
                session_tokens += int(step_stats["tokens"])
                state["train_seconds"] = base_seconds + (time.monotonic() - session_start)
                for k, v in step_stats.items():
                    window[k] = window.get(k, 0.0) + v
                window["_steps"] = window.get("_steps", 0.0) + 1

                step = state["step"]
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    elapsed = time.monotonic() - session_start
                    rate = session_tokens / elapsed if elapsed > 0 else 0.0
                    last_train = self._train_record(window, step, state, rate)
                    window = {}
                    self._write_metrics(last_train)
                    eta = (cfg.max_steps - step) * elapsed / max(step - (resumed_from or 0), 1)
                    progress.update(step, last_train, eta)
                if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                    last_eval = self._evaluate(wrapped, eval_fn, step, state)
                    progress.note(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if isinstance(v, float)))
                    stopped_early = self._track_best(last_eval, step, state, on_best)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    self._save_state(batches, state)
                    saved_step = step
                if self._any_process_signalled(signals) and step < cfg.max_steps:
                    if saved_step != step:
                        self._save_state(batches, state)
                    name = signal.Signals(signals.received or signal.SIGTERM).name
                    progress.note(f"{name}: saved a training state at step {step}")
                    raise Interrupted(f"interrupted by {name} at step {step}; a training state was saved: continue it by "
                                      "resuming", signals.received or signal.SIGTERM)
            if eval_fn is not None and (exhausted or stopped_early) and state["step"] and not last_eval:
                last_eval = self._evaluate(wrapped, eval_fn, state["step"], state)
            if cfg.keep_state != "none" and saved_step != state["step"]:
                self._save_state(batches, state)
            self._prune_states(completed=True)
        finally:
            signals.restore()
            progress.close()
        if stopped_early:
            progress.note(f"stopped early at step {state['step']}: {cfg.best_metric} did not improve for {cfg.patience} evaluations")
        if cfg.restore_best and state["best"] is not None:
            self._restore_best()
            progress.note(f"restored the best evaluation's weights (step {state['best']['step']})")
        return TrainResult(step=state["step"], tokens=state["tokens"], flops=state["flops"],
                           train_seconds=state["train_seconds"], last_train=last_train, last_eval=last_eval,
                           best=state["best"], stopped_early=stopped_early, resumed_from=resumed_from)

    def _step(self, wrapped, optimizer, params, loss_fn, micro, count_fn, flops_per_token, step) -> dict[str, float]:
        """One optimizer step over the micro-batches; returns global (all-process) statistics."""
        acc, cfg = self.accelerator, self.cfg
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        wrapped.train()
        # Each process's loss is weighted by its share of the step's units, so that DDP's mean
        # over processes gives the mean over every unit of the step, for any W and grad_accum.
        slices = [local_slice(b, self.rank, self.world) for b in micro]
        total_units = sum(count_fn(b) for b in micro)
        if total_units == 0:
            raise UserError("a training step has no target units (all labels are ignored)")
        sums: dict[str, float] = {}
        for i, local in enumerate(slices):
            local = self.to_device(local)
            units = count_fn(local)
            sync = i == len(slices) - 1
            context = acc.no_sync(wrapped) if not sync else contextlib.nullcontext()
            with context:
                with acc.autocast():
                    loss, stats = loss_fn(wrapped, local)
                acc.backward(loss * (units * self.world / total_units))
            stats = dict(stats)
            tokens = _float(stats.pop("tokens", default_tokens(local)))
            extra = _float(stats.pop("flops", 0.0))
            stats.pop("count", None)
            sums["loss_sum"] = sums.get("loss_sum", 0.0) + _float(loss) * units
            sums["tokens"] = sums.get("tokens", 0.0) + tokens
            sums["flops"] = sums.get("flops", 0.0) + extra + flops_per_token * tokens
            for k, v in stats.items():
                sums[f"stat:{k}"] = sums.get(f"stat:{k}", 0.0) + _float(v) * units
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = _float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        # The fused AdamW kernel writes the weights without bumping their version counters, and
        # caches keyed on a weight's version (a MoE layer's stored fill outputs, moe.py) would
        # go on serving values computed from the old weights: bump them here.
        for p in params:
            if p.requires_grad:
                torch.autograd.graph.increment_version(p)
        optimizer.zero_grad(set_to_none=True)

        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.world > 1:
            values = acc.reduce(values, reduction="sum")
        reduced = dict(zip(keys, values.tolist()))
        out = {"loss": reduced.pop("loss_sum") / total_units, "tokens": reduced.pop("tokens"),
               "flops": reduced.pop("flops"), "lr": lr}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        out.update({k[5:]: v / total_units for k, v in reduced.items()})
        return out

    def _train_record(self, window: dict[str, float], step: int, state: dict, rate: float) -> dict[str, Any]:
        n = window.pop("_steps")
        record: dict[str, Any] = {"kind": "train", "step": step}
        for k, v in window.items():
            if k not in ("tokens", "flops", "lr"):  # counters are reported as running totals below
                record[k] = v / n
        record["lr"] = lr_at(step - 1, self.cfg)  # the rate of the window's last step
        record.update({"tokens": state["tokens"], "flops": state["flops"], "tokens_per_s": rate,
                       "train_seconds": state["train_seconds"]})
        return record

    def _evaluate(self, wrapped, eval_fn, step: int, state: dict) -> dict[str, float]:
        wrapped.eval()
        with torch.no_grad(), self.accelerator.autocast():
            metrics = {k: _float(v) for k, v in eval_fn(wrapped).items()}
        wrapped.train()
        self._write_metrics({"kind": "eval", "step": step, **metrics, "tokens": state["tokens"],
                             "flops": state["flops"], "train_seconds": state["train_seconds"]})
        return metrics

    def _keeping_best(self, on_best):
        """`on_best` preceded by writing the trainable tensors to out/best.safetensors (atomically,
        on the main process; the others hold the same tensors under DDP)."""
        if self.sharded:
            raise UserError("restore_best keeps whole tensors; it is not supported under FSDP")
        path = self.cfg.out / BEST_FILE

        def keep(module, step, metrics):
            if self.is_main:
                tensors = {name: p.detach().cpu() for name, p in module.named_parameters() if p.requires_grad}
                tmp = path.with_name(f".{path.name}.tmp")
                write_safetensors(tmp, tensors, metadata={"step": str(step)})
                os.replace(tmp, path)
            if on_best is not None:
                on_best(module, step, metrics)

        return keep

    def _restore_best(self) -> None:
        """Load out/best.safetensors into the model's trainable parameters (every process)."""
        self.wait()
        params = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in read_safetensors(self.cfg.out / BEST_FILE).items():
                params[name].copy_(tensor.to(params[name].device))

    def _track_best(self, metrics: dict[str, float], step: int, state: dict, on_best) -> bool:
        """Update the best record; True when patience has run out."""
        name = self.cfg.best_metric
        if name is None:
            return False
        if name not in metrics:
            raise UserError(f"best_metric {name!r} is not among the evaluation metrics ({', '.join(metrics)})")
        value, best = metrics[name], state["best"]
        better = best is None or (value < best["metrics"][name] if self.cfg.best_mode == "min" else value > best["metrics"][name])
        if better:
            state["best"], state["bad_evals"] = {"step": step, "metrics": dict(metrics)}, 0
            if on_best is not None:
                on_best(self.unwrapped, step, metrics)
            return False
        state["bad_evals"] += 1
        return self.cfg.patience is not None and state["bad_evals"] >= self.cfg.patience

    # -- files -----------------------------------------------------------------------------------
    def _resume_dir(self) -> Path | None:
        if not self.cfg.resume:
            return None
        found = latest_state(self.cfg.out)
        if found is None:
            raise UserError(f"nothing to resume: no training state in {self.cfg.out / STATE_DIR}; start a new run instead", option="resume")
        return found

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are FSDP shards (so whole tensors need a gather)."""
        from accelerate.utils import DistributedType  # accelerate: imported with the Trainer

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _check_distributed_support(self) -> None:
        """DDP and FSDP2 are supported; other engines are refused before anything is trained."""
        from accelerate.utils import DistributedType  # accelerate: imported with the Trainer

        kind = self.accelerator.distributed_type
        engines = {getattr(DistributedType, n, None) for n in ("DEEPSPEED", "MEGATRON_LM")} - {None}
        if kind in engines:
            raise UserError(f"{kind.value} runs are not supported: cpmctl's training states are whole tensors gathered "
                            "through torch.distributed.checkpoint; use DDP or FSDP (fsdp_version: 2) in the accelerate config")
        if self.sharded and not self.cfg.allow_fsdp:
            raise UserError("FSDP is supported by `cpmctl pretrain` only; run this stage with DDP or one process "
                            "(its trainable part is small enough to hold whole on each device)")
        if self.sharded and not getattr(self.accelerator, "is_fsdp2", False):
            raise UserError("FSDP1 is not supported (its flattened parameters lose the names and shapes cpmctl's "
                            "optimizer groups and states use); set fsdp_version: 2 in the accelerate config")
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.sharded and self.is_main:
            log.warning(f"accelerate applies FSDP on GPUs (accelerators) only: this {kind.value} run keeps "
                        "the whole model on every process")

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's state dict (every parameter and persistent buffer, unsharded) on the
        main process, {} on the others: what a stage saves once fit() has returned. Under FSDP it
        gathers the shards (to the CPU), so every process must call it."""
        if self.sharded:
            return gather_model_state(self._wrapped, frozen=True)
        return self.unwrapped.state_dict() if self.is_main else {}

    def _save_state(self, batches, state: dict) -> None:
        """Write out/state/step-N: every process hands its RNG states to rank 0, which writes the
        whole directory atomically and prunes old ones."""
        rng = all_gather_bytes(pack(*rng_state()), self.world, self.device)
        # Collective under FSDP (the shards are gathered); the tensors land on rank 0 only.
        model_tensors = gather_model_state(self._wrapped, frozen=False)
        optimizer = inner_optimizer(self._optimizer)
        optim_named = gather_optimizer_state(self._wrapped, optimizer)
        if self.is_main:
            record = {**state, "format": STATE_FORMAT, "world": self.world, "data": batches.state_dict(),
                      "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                      "config": _jsonable(asdict(self.cfg))}
            write_state(self.cfg.out / STATE_DIR, state["step"], model_tensors=model_tensors, optimizer=optimizer,
                        optimizer_named=optim_named, rng=rng, record=record)
        self._prune_states(completed=False)

    def _load_state(self, where: Path) -> dict[str, Any]:
        """Restore model, optimizer, loss scaler and this process's RNG from a state directory
        (every process reads the whole tensors and keeps what it holds: all, or its FSDP shards);
        returns trainer.json."""
        saved = read_trainer_record(where)
        load_model_state(self._wrapped, read_safetensors(where / MODEL_STATE_FILE), self._shapes, self._trainable, where)
        optimizer = inner_optimizer(self._optimizer)
        names = {id(p): canonical_name(n) for n, p in self.unwrapped.named_parameters()}
        live = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        named = optimizer_state_to_load(optimizer, live, json.loads((where / OPTIMIZER_FILE).read_text()),
                                        read_safetensors(where / OPTIMIZER_TENSORS_FILE), where)
        load_optimizer_state(self._wrapped, optimizer, named)
        if self.accelerator.scaler is not None and saved.get("scaler"):
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        set_rng_state(*rank_rng_state(where, self.rank))
        return saved

    def _prune_states(self, *, completed: bool) -> None:
        """Keep the keep_checkpoints newest states; once the run has completed, what keep_state says."""
        if self.is_main:
            keep = self.cfg.keep_checkpoints
            if completed:
                keep = {"all": keep, "last": 1, "none": 0}[self.cfg.keep_state]
            if keep == 0:
                shutil.rmtree(self.cfg.out / STATE_DIR, ignore_errors=True)
            else:
                for old in state_dirs(self.cfg.out)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self.wait()

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.cfg.out / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop records written after the state being resumed (they will be redone)."""
        path = self.cfg.out / METRICS_FILE
        if not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# TrainConfig fields that change what a resumed run computes (max_steps may grow: that extends it).
TRAJECTORY_FIELDS = ("lr", "optimizer", "weight_decay", "betas", "eps", "schedule", "warmup_steps", "min_lr_ratio",
                     "grad_accum", "max_grad_norm", "mixed_precision", "seed")


def trajectory_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The trajectory-deciding settings of a TrainConfig, as recorded (JSON) in a state."""
    settings = {name: config.get(name) for name in TRAJECTORY_FIELDS}
    settings.update(config.get("trajectory") or {})
    return _jsonable(settings)


def accepted_changes(saved_config: Any, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The trajectory settings that differ between a state and this run, {name: (saved, now)};
    a UserError naming each unless every one is listed in cfg.resume_with_changes."""
    if not isinstance(saved_config, dict):
        return {}  # a state from before settings were recorded
    before = trajectory_settings(saved_config)
    now = trajectory_settings(_jsonable(asdict(cfg)))
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
               if k in before and before.get(k) != now.get(k)}
    allowed = set(cfg.resume_with_changes or ())
    refused = [k for k in changed if k not in allowed]
    if refused:
        listed = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused)
        raise UserError(f"resuming with changed settings that alter the run's trajectory: {listed}; resume with the "
                        f"earlier values, or list the names to accept ({','.join(refused)})", option="resume_with_changes")
    return changed


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def read_metrics(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of out/metrics.jsonl."""
    path = Path(out) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
