"""cpmctl pretrain RECIPE OUT [--set KEY=VALUE ...] [--teacher DIR [--teacher-cache DIR]] [--resume]

Pre-trains a checkpoint (`init`) or a preset from scratch (`preset` + `tokenizer`) on prepared
token shards (`data`) with its architecture's objective: span corruption (encoder-decoder), MLM
(encoder) or causal LM (decoder). Training runs on the shared core (cpmctl.training): accelerate,
AdamW/Adafactor, warm-up + decay, accumulation, clipping, autocast, atomic training states every
`checkpoint_every` steps and exact `--resume`.

Knowledge inheritance (`teacher`): the loss on target positions is
    (1 - a_t) * LM + a_t * T^2 * KL(teacher_T || student_T),   a_t = max(0, 1 - t / ki_steps)
(`ki_schedule` step/constant for the alternatives; T = 1 and ki_steps = half the run by
default, both chosen by benchmarks/ki.py). The teacher must share the student's
tokenizer; its width, depth and vocabulary size may differ. `teacher_cache` stores the teacher's
top-K logits at the target positions of the first ki_steps * grad_accum batches (memory-mapped
.npy files), built once and reused by later runs, so those skip the teacher's forward pass.
FLOPs in the run log include the teacher's forward passes (and the result reports the cache's
one-off cost separately).

Parameter sharing (`share_layers`, `share_groups` G: G distinct blocks per stack, each applied
n_layers / G consecutive times) and step-robust pre-training (`step_robust`): every micro-batch
runs n block applications, n drawn from `robust_iterations` (default L, 3L/4, L/2 rounded to
multiples of G) by a generator seeded with (seed, step, micro-batch), with every residual branch
scaled by beta = L / n (`h <- h + beta * f(h)`, cpmctl.model.set_iterations), so the model learns
to take fewer, larger steps. `eval_iterations` adds validation losses at other iteration counts
(`loss_iter{n}` in the eval records). FLOPs count every block application.

Output directory:
    OUT/metrics.jsonl   train and eval records (JSON lines)
    OUT/state/          training states for --resume
    OUT/checkpoint/     the final model (a cpmctl checkpoint, with tokenizer and provenance)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpmctl import teacher_cache as shared_cache
from cpmctl.checkpoint import load_model, read_provenance, save_checkpoint
from cpmctl.config import ModelConfig
from cpmctl.data import make_batches, random_spans_helper
from cpmctl.command_configs import PretrainConfig  # the options, declared once
from cpmctl.errors import UserError
from cpmctl.fsutil import content_id
from cpmctl.iterations import default_robust_iterations, flops_per_token, sampled_iterations
from cpmctl.losses import KI_SCHEDULES, ki_loss, ki_weight, lm_forward, lm_loss
from cpmctl.model import applied_block_parameters, build_model, set_iterations
from cpmctl.moe import resolve_kernels, set_kernels
from cpmctl.plan import (ACTIVATION_FORMULA, SHARDINGS, activation_bytes, checkpoint_config, is_assumed,
                         logits_bytes, make_plan, meta_model, parameter_count, parameter_shapes, source_note,
                         training_memory)
from cpmctl.teacher_cache import CachedTeacherBatches, build_teacher_cache, check_cache
from cpmctl.tokenizer import load_tokenizer
from cpmctl.training import TrainConfig, Trainer, default_tokens
from cpmctl.training_state import latest_state

log = logging.getLogger("cpmctl")

OBJECTIVE_OF_ARCH = {"encoder-decoder": "span", "encoder": "mlm", "decoder": "causal"}
CHECKPOINT_DIR = "checkpoint"


# -- setup pieces ---------------------------------------------------------------------------------
def _tokenizer_dir(cfg: PretrainConfig) -> Path:
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer)
        return path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if cfg.init is not None and (Path(cfg.init) / "tokenizer").is_dir():
        return Path(cfg.init) / "tokenizer"
    raise UserError("no tokenizer: give tokenizer = DIR (or an init checkpoint that holds one)")


def model_config(cfg: PretrainConfig, tok, stand_ins=None) -> Any:
    """The ModelConfig the run trains and writes: the init checkpoint's, or the preset's with the
    tokenizer's vocabulary and ids (`tok` None: a dry run without the tokenizer keeps the
    preset's), `model` overrides and the sharing options."""
    if (cfg.init is None) == (cfg.preset is None):
        raise UserError("give exactly one of init = CHECKPOINT or preset = NAME")
    sharing = _sharing_overrides(cfg)
    if cfg.init is not None:
        if cfg.model or sharing:
            raise UserError("model overrides (and share_layers / share_groups) apply to a preset; an init checkpoint keeps its config")
        return checkpoint_config(cfg.init, stand_ins)
    # bos too: a preset's bos id (llama-tiny's 2) is unk in a sentencepiece vocabulary without bos,
    # and moefy/infer/tasks prepend config.bos_token_id to every decoder row.
    ids = {} if tok is None else {"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id,
                                  "bos_token_id": tok.bos_id}
    return ModelConfig.from_preset(cfg.preset, **{**ids, **cfg.model, **sharing})


def _check_vocabulary(config, tok) -> None:
    if config.vocab_size < tok.vocab_size:
        raise UserError(f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's ({tok.vocab_size})")


def _build_student(cfg: PretrainConfig, tok) -> tuple[torch.nn.Module, list[Path]]:
    config = model_config(cfg, tok)
    if cfg.init is not None:
        model, ckpt = load_model(cfg.init)
        ckpt.close()
        with torch.no_grad():
            for p in model.parameters():  # own the weights instead of copy-on-write views of a file
                p.data = p.data.clone()
        parents = [Path(cfg.init)]
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(config)
        parents = []
    _check_vocabulary(model.config, tok)
    return model.float().train(), parents


def _sharing_overrides(cfg: PretrainConfig) -> dict[str, Any]:
    """ModelConfig fields from share_layers / share_groups; UserError if `model` says otherwise."""
    out: dict[str, Any] = {}
    if cfg.share_layers:
        out["share_layers"] = True
    if cfg.share_groups is not None:
        out["share_groups"] = cfg.share_groups
    for key, value in out.items():
        if key in cfg.model and cfg.model[key] != value:
            raise UserError(f"{key} = {value} contradicts model.{key} = {cfg.model[key]}")
    return out


@dataclass
class IterationPlan:
    """What a run does with iterations: the set step-robust training samples from (None: plain
    training) and the extra iteration counts evaluated."""

    robust: list[int] | None
    evaluate: list[int]


def iteration_plan(cfg: PretrainConfig, model) -> IterationPlan:
    """Check the sharing / step-robust / evaluation options against the built model (every
    iteration count goes through set_iterations, which raises UserError on a bad one)."""
    config = model.config
    robust, evaluate = cfg.robust_iterations, cfg.eval_iterations or []  # parsed by the config
    if robust is not None and not cfg.step_robust:
        raise UserError("robust_iterations needs step_robust (--step-robust)")
    if cfg.step_robust:
        if config.shared_blocks is None:
            raise UserError("--step-robust needs a parameter-shared model (--share-layers or --share-groups G)")
        depths = sorted(set(config.stack_depths().values()))
        if len(depths) > 1:
            raise UserError(f"--step-robust needs equal encoder and decoder depths, got {', '.join(map(str, depths))}")
        if robust is None:
            robust = default_robust_iterations(depths[0], config.shared_blocks)
    try:
        for n in [*(robust or []), *evaluate]:
            set_iterations(model, n)
    finally:
        set_iterations(model, None)
    return IterationPlan(robust=robust, evaluate=evaluate)


def check_teacher_tokenizer(path: Path, tok) -> None:
    """UserError unless the teacher at `path` has the student's tokenizer."""
    if not (path / "tokenizer").is_dir():
        raise UserError(f"teacher {path} has no tokenizer/ directory, so it cannot be checked against the student's")
    teacher_tok = load_tokenizer(path / "tokenizer")
    if teacher_tok.content_hash() != tok.content_hash():
        raise UserError(f"teacher {path} uses a different tokenizer than the student; knowledge inheritance "
                        "needs the same tokenizer (grow the vocabulary with `cpmctl inherit --vocab` first)")


def check_teacher_config(path: Path, teacher_config, student_config) -> None:
    if teacher_config.arch != student_config.arch:
        raise UserError(f"teacher is {teacher_config.arch} but the student is {student_config.arch}; they must share the architecture")
    if teacher_config.lm_head is False:
        raise UserError(f"teacher {path} has no LM head")


def load_teacher(path: Path, tok, student_config) -> torch.nn.Module:
    """The teacher in eval mode without gradients; UserError unless it shares the tokenizer."""
    path = Path(path)
    check_teacher_tokenizer(path, tok)
    teacher, ckpt = load_model(path)
    ckpt.close()
    check_teacher_config(path, teacher.config, student_config)
    teacher.requires_grad_(False)
    return teacher.float().eval()


def make_data(cfg: PretrainConfig, tok, config, split: str = "train", **extra: Any):
    objective = cfg.objective or OBJECTIVE_OF_ARCH[config.arch]
    return make_batches(cfg.data, tok, objective=objective, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                        split=split, valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                        decoder_start_id=config.start_token_id if objective == "span" else None, **extra)


# -- teacher cache (shared with `cpmctl distill --data`: cpmctl/teacher_cache.py) -----------------
def cache_fingerprint(cfg: PretrainConfig, teacher_path: Path, data_batches, k: int) -> dict[str, Any]:
    return shared_cache.cache_fingerprint(read_provenance(teacher_path).get("content_hash"), data_batches, k, seq_len=cfg.seq_len,
                                          batch_size=cfg.batch_size, seed=cfg.seed, valid_fraction=cfg.valid_fraction)


# -- the stage --------------------------------------------------------------------------------------
def _validate(cfg: PretrainConfig, *, inputs: bool = True) -> None:
    """Options and output checks; `inputs=False` (dry run) leaves out the checks that the data,
    teacher and init exist (a pipeline's earlier step may write them; the dry run reads models
    through cpmctl.plan.checkpoint_config instead)."""
    if inputs and not Path(cfg.data).is_dir():
        raise UserError(f"data {cfg.data} is not a directory of token shards (run `cpmctl data prepare`)")
    if cfg.objective is not None and cfg.objective not in OBJECTIVE_OF_ARCH.values():
        raise UserError(f"unknown objective {cfg.objective!r}; expected span, mlm or causal")
    if cfg.ki_schedule not in KI_SCHEDULES:
        raise UserError(f"unknown KI schedule {cfg.ki_schedule!r}; expected one of {', '.join(KI_SCHEDULES)}")
    if cfg.kernels not in ("auto", "torch", "triton"):
        raise UserError(f"unknown --kernels {cfg.kernels!r}; expected auto, torch or triton")
    if cfg.ki_temperature <= 0:
        raise UserError(f"KI temperature must be > 0, got {cfg.ki_temperature}")
    if cfg.teacher_cache is not None and cfg.teacher is None:
        raise UserError("--teacher-cache needs --teacher")
    if cfg.teacher_cache_k < 1:
        raise UserError(f"teacher cache K must be >= 1, got {cfg.teacher_cache_k}")
    if inputs and cfg.teacher is not None and not Path(cfg.teacher).is_dir():
        raise UserError(f"teacher {cfg.teacher} is not a checkpoint directory")
    if inputs and cfg.init is not None and not Path(cfg.init).is_dir():
        raise UserError(f"init {cfg.init} is not a checkpoint directory")
    out = Path(cfg.out)
    if cfg.resume:
        if latest_state(out) is None:
            raise UserError(f"--resume: {out} holds no training state to continue; start without --resume")
    if out.exists() and not cfg.resume:
        if not cfg.force:
            raise UserError(f"output {out} already exists; pass --resume to continue it or --force to start over")
        if any(out.iterdir()) and not ((out / "metrics.jsonl").exists() or (out / "state").exists()):
            raise UserError(f"--force would delete {out}, which does not look like a pretrain run; remove it yourself")


def train_config(cfg: PretrainConfig):
    """The training core's config (its checks: steps, lr, optimizer, schedule, precision, ...)."""
    tcfg = TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(cfg, f.name)})
    tcfg.allow_fsdp = True  # the model is saved through trainer.full_state_dict()
    tcfg.trajectory = {
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "data": content_id(cfg.data), "objective": cfg.objective,
        "valid_fraction": cfg.valid_fraction, "init": content_id(Path(cfg.init) / "cpmctl.json") if cfg.init else None,
        "preset": cfg.preset, "model": dict(cfg.model), "teacher": str(cfg.teacher) if cfg.teacher else None,
        "ki_steps": cfg.ki_steps, "ki_temperature": cfg.ki_temperature, "ki_schedule": cfg.ki_schedule,
        "ki_alpha": cfg.ki_alpha, "step_robust": cfg.step_robust, "robust_iterations": cfg.robust_iterations,
    }
    return tcfg


def run(cfg: PretrainConfig) -> dict[str, Any]:
    _validate(cfg)
    tok_dir = _tokenizer_dir(cfg)
    tok = load_tokenizer(tok_dir)
    model, parents = _build_student(cfg, tok)
    plan = iteration_plan(cfg, model)
    train_data = make_data(cfg, tok, model.config, "train")
    valid_data = make_data(cfg, tok, model.config, "valid", shuffle=False, drop_last=False, epochs=1)
    teacher = load_teacher(cfg.teacher, tok, model.config) if cfg.teacher is not None else None
    ki_steps = (cfg.max_steps // 2 if cfg.ki_steps is None else cfg.ki_steps) if teacher is not None else 0

    tcfg = train_config(cfg)
    if cfg.force and not cfg.resume and Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    trainer = Trainer(tcfg)
    set_kernels(model, resolve_kernels(cfg.kernels, trainer.device, model.config.activation))
    if teacher is not None:
        set_kernels(teacher, resolve_kernels(cfg.kernels, trainer.device, teacher.config.activation))

    cache_meta = None
    data = train_data
    if teacher is not None:
        teacher.to(trainer.device)
        if cfg.teacher_cache is not None:
            needed = ki_steps * cfg.grad_accum
            fingerprint = cache_fingerprint(cfg, Path(cfg.teacher), train_data, cfg.teacher_cache_k)
            cache = Path(cfg.teacher_cache)
            if cache.exists():
                cache_meta = check_cache(cache, fingerprint, needed)
            else:
                if trainer.is_main:
                    fresh = make_data(cfg, tok, model.config, "train")
                    log.info(f"building the teacher cache ({needed} batches, top-{cfg.teacher_cache_k}) in {cache}")
                    build_teacher_cache(cache, teacher, fresh, needed, cfg.teacher_cache_k, fingerprint,
                                        trainer.device, model.config.vocab_size)
                trainer.wait()
                cache_meta = check_cache(cache, fingerprint, needed)
            data = CachedTeacherBatches(train_data, cache)
    teacher_fwd = flops_per_token(teacher) / 3.0 if teacher is not None else 0.0
    student_flops = flops_per_token(model)
    # Multiplied block parameters per token at each sampled n, relative to the trained depth.
    trained_applied = applied_block_parameters(model)
    robust_extra: dict[int, int] = {}
    for n in plan.robust or []:
        set_iterations(model, n)
        robust_extra[n] = applied_block_parameters(model) - trained_applied
    set_iterations(model, None)
    micro_of_step = {"step": -1, "micro": 0}

    def next_micro() -> int:
        """0, 1, ... over the micro-batches of the current optimizer step (restarts each step)."""
        if micro_of_step["step"] != trainer.step:
            micro_of_step.update(step=trainer.step, micro=0)
        else:
            micro_of_step["micro"] += 1
        return micro_of_step["micro"]

    def loss_fn(wrapped, batch):
        extra_flops = 0.0
        if plan.robust is not None:
            n = sampled_iterations(plan.robust, cfg.seed, trainer.step, next_micro())
            set_iterations(trainer.unwrapped, n)
            extra_flops = 6.0 * robust_extra[n] * default_tokens(batch)
        logits = lm_forward(wrapped, batch)
        a_t = ki_weight(trainer.step, ki_steps, cfg.ki_schedule, cfg.ki_alpha)
        if a_t <= 0.0:
            loss, stats = ki_loss(logits, batch["labels"], None, 0.0, cfg.ki_temperature)
        elif "teacher_ids" in batch:
            loss, stats = ki_loss(logits, batch["labels"], (batch["teacher_ids"], batch["teacher_logits"]), a_t, cfg.ki_temperature)
        else:
            with torch.no_grad():
                teacher_logits = lm_forward(teacher, batch)
            loss, stats = ki_loss(logits, batch["labels"], teacher_logits, a_t, cfg.ki_temperature)
            extra_flops += teacher_fwd * default_tokens(batch)
        if plan.robust is not None:
            stats = {**stats, "iterations": float(n)}
        if extra_flops:
            stats = {**stats, "flops": extra_flops}
        return loss, stats

    def validation_loss(wrapped) -> float:
        total, count = 0.0, 0
        valid_data.load_state_dict({"epoch": 0, "position": 0})
        for i, batch in enumerate(valid_data):
            if i >= cfg.eval_batches:
                break
            batch = trainer.to_device(batch)
            n = int((batch["labels"] != -100).sum())
            total += float(lm_loss(lm_forward(wrapped, batch), batch["labels"])) * n
            count += n
        return total / max(count, 1)

    def eval_fn(wrapped):
        try:
            set_iterations(trainer.unwrapped, None)
            loss = validation_loss(wrapped)
            metrics = {"loss": loss, "ppl": float(np.exp(min(loss, 50.0)))}
            for n in plan.evaluate:
                set_iterations(trainer.unwrapped, n)
                metrics[f"loss_iter{n}"] = validation_loss(wrapped)
        finally:
            set_iterations(trainer.unwrapped, None)
        return metrics

    try:
        result = trainer.fit(model, loss_fn, data, eval_fn=eval_fn if cfg.eval_batches > 0 else None,
                             flops_per_token=student_flops)
    finally:
        set_iterations(model, None)
    summary = {
        "out": str(cfg.out), "checkpoint": str(Path(cfg.out) / CHECKPOINT_DIR), "steps": result.step,
        "tokens": result.tokens, "flops": result.flops, "train_seconds": result.train_seconds,
        "final_train_loss": result.last_train.get("loss"), "final_eval_loss": result.last_eval.get("loss"),
        "ki_steps": ki_steps, "teacher_cache_flops": cache_meta["flops"] if cache_meta else None,
        "resumed_from": result.resumed_from,
    }
    if plan.robust is not None:
        summary["robust_iterations"] = plan.robust
    if plan.evaluate:
        summary["final_eval_loss_by_iterations"] = {n: result.last_eval.get(f"loss_iter{n}") for n in plan.evaluate}
    weights = trainer.full_state_dict()  # every process takes part: under FSDP it gathers the shards
    if trainer.is_main:
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
        save_checkpoint(Path(cfg.out) / CHECKPOINT_DIR, trainer.unwrapped.config, weights, tokenizer_dir=tok_dir,
                        stage="pretrain", parents=[p for p in [*parents, cfg.teacher] if p is not None], options=options,
                        metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))}, overwrite=True)
    trainer.wait()
    return summary


# -- dry run ----------------------------------------------------------------------------------------
def default_devices() -> int:
    """Processes of the launch: WORLD_SIZE when a launcher set it, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def sequence_lengths(objective: str, seq_len: int) -> dict[str, int]:
    """Tokens per row of each stack for the objective (span: the corrupted input and its target,
    as cpmctl.data.Batches makes them)."""
    if objective == "span":
        return {"encoder": seq_len, "decoder": random_spans_helper(seq_len)[1]}
    return {"encoder": seq_len, "decoder": seq_len}


def _dry_tokenizer(cfg: PretrainConfig, notes: list[str], stand_ins=None):
    """The tokenizer when it is there; None (with a note) when a pipeline step will write it."""
    if cfg.tokenizer is None and cfg.init is not None and is_assumed(cfg.init, stand_ins):
        notes.append(f"tokenizer: from init {cfg.init}, not there yet")
        return None
    path = _tokenizer_dir(cfg)
    if not path.exists():
        notes.append(f"tokenizer {path}: not there yet (the preset's vocabulary size and ids assumed)")
        return None
    return load_tokenizer(path)


def plan(cfg: PretrainConfig, *, stand_ins=None, devices: int | None = None, sharding: str = "ddp"):
    """What `run(cfg)` would do on `devices` processes (default: WORLD_SIZE, else 1), with
    sharding "ddp" (a full copy per device) or "fsdp" (weights, gradients and optimizer state
    split over them). Nothing is loaded or written."""
    _validate(cfg, inputs=False)
    tcfg = train_config(cfg)
    devices = default_devices() if devices is None else devices
    if devices < 1:
        raise UserError(f"--devices must be >= 1, got {devices}")
    if sharding not in SHARDINGS:
        raise UserError(f"unknown --sharding {sharding!r}; expected ddp or fsdp")
    if cfg.batch_size % devices:
        raise UserError(f"the global batch of {cfg.batch_size} rows does not split over {devices} processes; "
                        f"use a batch size divisible by {devices}")
    notes: list[str | None] = [source_note(cfg.init, "init", stand_ins) if cfg.init is not None else None]
    if not Path(cfg.data).is_dir():
        notes.append(f"data {cfg.data}: not there yet (tokens counted from the options)")
    tok = _dry_tokenizer(cfg, notes, stand_ins)
    config = model_config(cfg, tok, stand_ins)
    if tok is not None:
        _check_vocabulary(config, tok)
    model = meta_model(config)
    iterations = iteration_plan(cfg, model)
    objective = cfg.objective or OBJECTIVE_OF_ARCH[config.arch]
    lengths = sequence_lengths(objective, cfg.seq_len)
    micro = cfg.batch_size // devices
    bytes_per_value = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    out_len = lengths["decoder"] if config.arch == "encoder-decoder" else lengths["encoder"]

    teacher_bytes = 0
    if cfg.teacher is not None:
        teacher_config = checkpoint_config(cfg.teacher, stand_ins)
        check_teacher_config(Path(cfg.teacher), teacher_config, config)
        if tok is not None and (Path(cfg.teacher) / "config.json").is_file():
            check_teacher_tokenizer(Path(cfg.teacher), tok)
        teacher_bytes = 4 * parameter_count(meta_model(teacher_config))
        notes.append(source_note(cfg.teacher, "teacher", stand_ins))
        if cfg.teacher_cache is not None:
            state = "reused" if Path(cfg.teacher_cache).exists() else "built first"
            notes.append(f"teacher cache {cfg.teacher_cache} ({state}): the teacher's top-{cfg.teacher_cache_k} logits of the "
                         "first ki_steps x grad_accum batches come from it; the teacher is still loaded")
    parameters = parameter_count(model)
    breakdown = training_memory(
        weights=4 * parameters, trainable_shapes=parameter_shapes(model), optimizer=tcfg.optimizer, devices=devices,
        sharding=sharding, activations=activation_bytes(config, micro, lengths, bytes_per_value),
        logits=logits_bytes(micro, out_len, config.vocab_size), teacher=teacher_bytes)
    rows_tokens = lengths["encoder"] + (lengths["decoder"] if objective == "span" else 0)
    notes.append(f"activations: {ACTIVATION_FORMULA}, {micro} rows per device, {bytes_per_value}-byte values")
    if iterations.robust is not None:
        notes.append(f"step-robust: iterations sampled from {iterations.robust} (activations at the trained depth)")
    return make_plan(
        "pretrain", output=Path(cfg.out) / CHECKPOINT_DIR, output_config=config, parameters=parameters, trainable=parameters,
        parameter_bytes=4 * parameters, devices=devices, breakdown=breakdown, steps=cfg.max_steps,
        tokens=cfg.max_steps * cfg.grad_accum * cfg.batch_size * rows_tokens, notes=notes,
        details={"objective": objective, "sharding": sharding, "optimizer": tcfg.optimizer,
                 "micro-batch per device": f"{micro} rows x {lengths if config.arch == 'encoder-decoder' else lengths['encoder']} tokens"},
    )
