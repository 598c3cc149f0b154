"""cpmctl pretrain RECIPE OUT [--set KEY=VALUE ...] [--teacher DIR [--teacher-cache DIR]] [--resume]

Pre-trains a checkpoint (`init`) or a preset from scratch (`preset` + `tokenizer`) on prepared
token shards (`data`) with its architecture's objective: span corruption (encoder-decoder), MLM
(encoder) or causal LM (decoder). Training runs on the shared core (cpmctl.training): accelerate,
AdamW/Adafactor, warm-up + decay, accumulation, clipping, autocast, atomic training states every
`checkpoint_every` steps and exact `--resume`.

Knowledge inheritance (`teacher`): the loss on target positions is
    (1 - a_t) * LM + a_t * T^2 * KL(teacher_T || student_T),   a_t = max(0, 1 - t / ki_steps)
(`ki_schedule` step/constant for the alternatives). The teacher must share the student's
tokenizer; its width, depth and vocabulary size may differ. `teacher_cache` stores the teacher's
top-K logits at the target positions of the first ki_steps * grad_accum batches (memory-mapped
.npy files), built once and reused by later runs, so those skip the teacher's forward pass.
FLOPs in the run log include the teacher's forward passes (and the result reports the cache's
one-off cost separately).

Output directory:
    OUT/metrics.jsonl   train and eval records (JSON lines)
    OUT/state/          training states for --resume
    OUT/checkpoint/     the final model (a cpmctl checkpoint, with tokenizer and provenance)
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpmctl import teacher_cache as shared_cache
from cpmctl.errors import UserError
from cpmctl.teacher_cache import CachedTeacherBatches, build_teacher_cache, check_cache

log = logging.getLogger("cpmctl")

OBJECTIVE_OF_ARCH = {"encoder-decoder": "span", "encoder": "mlm", "decoder": "causal"}
CHECKPOINT_DIR = "checkpoint"


@dataclass
class PretrainConfig:
    out: Path
    data: Path                              # token shards from `cpmctl data prepare`
    init: Path | None = None                # a checkpoint to continue from, or
    preset: str | None = None               # a preset trained from scratch
    tokenizer: Path | None = None           # the tokenizer (default: the init checkpoint's)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides for a preset
    objective: str | None = None            # span | mlm | causal (default: from the architecture)
    seq_len: int = 128
    batch_size: int = 8                     # global micro-batch (rows), split over processes
    valid_fraction: float = 0.01
    eval_batches: int = 20
    # training (see cpmctl.training.TrainConfig)
    max_steps: int = 1000
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    schedule: str = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 10
    cpu: bool = False
    progress: bool = True
    resume: bool = False
    force: bool = False
    # knowledge inheritance
    teacher: Path | None = None
    ki_steps: int | None = None             # N; default max_steps // 2
    ki_temperature: float = 2.0
    ki_schedule: str = "linear"             # linear | step | constant
    ki_alpha: float = 0.5                   # a_t of the constant schedule
    teacher_cache: Path | None = None
    teacher_cache_k: int = 10
    kernels: str = "auto"                   # MoE FFNs: auto (Triton on CUDA) | torch | triton; the
                                            # Triton kernels are forward-only, so they serve the
                                            # teacher and evaluation, the torch path the training


# -- setup pieces ---------------------------------------------------------------------------------
def _tokenizer_dir(cfg: PretrainConfig) -> Path:
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer)
        return path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if cfg.init is not None and (Path(cfg.init) / "tokenizer").is_dir():
        return Path(cfg.init) / "tokenizer"
    raise UserError("no tokenizer: give tokenizer = DIR (or an init checkpoint that holds one)")


def _build_student(cfg: PretrainConfig, tok) -> tuple[torch.nn.Module, list[Path]]:
    from cpmctl.checkpoint import load_model
    from cpmctl.config import ModelConfig
    from cpmctl.model import build_model

    if (cfg.init is None) == (cfg.preset is None):
        raise UserError("give exactly one of init = CHECKPOINT or preset = NAME")
    if cfg.init is not None:
        if cfg.model:
            raise UserError("model overrides apply to a preset; an init checkpoint keeps its config")
        model, ckpt = load_model(cfg.init)
        ckpt.close()
        with torch.no_grad():
            for p in model.parameters():  # own the weights instead of copy-on-write views of a file
                p.data = p.data.clone()
        parents = [Path(cfg.init)]
    else:
        # bos too: a preset's bos id (llama-tiny's 2) is unk in a sentencepiece vocabulary without bos,
        # and moefy/infer/tasks prepend config.bos_token_id to every decoder row.
        overrides = {"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id,
                     "bos_token_id": tok.bos_id, **cfg.model}
        config = ModelConfig.from_preset(cfg.preset, **overrides)
        torch.manual_seed(cfg.seed)
        model = build_model(config)
        parents = []
    if model.config.vocab_size < tok.vocab_size:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({tok.vocab_size})")
    return model.float().train(), parents


def load_teacher(path: Path, tok, student_config) -> torch.nn.Module:
    """The teacher in eval mode without gradients; UserError unless it shares the tokenizer."""
    from cpmctl.checkpoint import load_model
    from cpmctl.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / "tokenizer").is_dir():
        raise UserError(f"teacher {path} has no tokenizer/ directory, so it cannot be checked against the student's")
    teacher_tok = load_tokenizer(path / "tokenizer")
    if teacher_tok.content_hash() != tok.content_hash():
        raise UserError(f"teacher {path} uses a different tokenizer than the student; knowledge inheritance "
                        "needs the same tokenizer (grow the vocabulary with `cpmctl inherit --vocab` first)")
    teacher, ckpt = load_model(path)
    ckpt.close()
    if teacher.config.arch != student_config.arch:
        raise UserError(f"teacher is {teacher.config.arch} but the student is {student_config.arch}; they must share the architecture")
    if teacher.config.lm_head is False:
        raise UserError(f"teacher {path} has no LM head")
    teacher.requires_grad_(False)
    return teacher.float().eval()


def make_data(cfg: PretrainConfig, tok, config, split: str = "train", **extra: Any):
    from cpmctl.data import make_batches

    objective = cfg.objective or OBJECTIVE_OF_ARCH[config.arch]
    return make_batches(cfg.data, tok, objective=objective, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                        split=split, valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                        decoder_start_id=config.start_token_id if objective == "span" else None, **extra)


# -- teacher cache (shared with `cpmctl distill --corpus`: cpmctl/teacher_cache.py) -----------------
def cache_fingerprint(cfg: PretrainConfig, teacher_path: Path, data_batches, k: int) -> dict[str, Any]:
    from cpmctl.checkpoint import read_provenance

    return shared_cache.cache_fingerprint(read_provenance(teacher_path).get("content_hash"), data_batches, k, seq_len=cfg.seq_len,
                                          batch_size=cfg.batch_size, seed=cfg.seed, valid_fraction=cfg.valid_fraction)


# -- the stage --------------------------------------------------------------------------------------
def _validate(cfg: PretrainConfig) -> None:
    from cpmctl.losses import KI_SCHEDULES

    if not Path(cfg.data).is_dir():
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
    if cfg.teacher is not None and not Path(cfg.teacher).is_dir():
        raise UserError(f"teacher {cfg.teacher} is not a checkpoint directory")
    if cfg.init is not None and not Path(cfg.init).is_dir():
        raise UserError(f"init {cfg.init} is not a checkpoint directory")
    out = Path(cfg.out)
    if cfg.resume:
        from cpmctl.training import latest_state

        if latest_state(out) is None:
            raise UserError(f"--resume: {out} holds no training state to continue; start without --resume")
    if out.exists() and not cfg.resume:
        if not cfg.force:
            raise UserError(f"output {out} already exists; pass --resume to continue it or --force to start over")
        if any(out.iterdir()) and not ((out / "metrics.jsonl").exists() or (out / "state").exists()):
            raise UserError(f"--force would delete {out}, which does not look like a pretrain run; remove it yourself")


def run(cfg: PretrainConfig) -> dict[str, Any]:
    from cpmctl.checkpoint import save_checkpoint
    from cpmctl.losses import ki_loss, ki_weight, lm_forward, lm_loss
    from cpmctl.moe import resolve_kernels, set_kernels
    from cpmctl.tokenizer import load_tokenizer
    from cpmctl.training import TrainConfig, Trainer, default_tokens, forward_flops_per_token

    _validate(cfg)
    tok_dir = _tokenizer_dir(cfg)
    tok = load_tokenizer(tok_dir)
    model, parents = _build_student(cfg, tok)
    train_data = make_data(cfg, tok, model.config, "train")
    valid_data = make_data(cfg, tok, model.config, "valid", shuffle=False, drop_last=False, epochs=1)
    teacher = load_teacher(cfg.teacher, tok, model.config) if cfg.teacher is not None else None
    ki_steps = (cfg.max_steps // 2 if cfg.ki_steps is None else cfg.ki_steps) if teacher is not None else 0

    tcfg = TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(cfg, f.name)})
    tcfg.allow_fsdp = True  # the model is saved through trainer.full_state_dict()
    if cfg.force and not cfg.resume and Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    trainer = Trainer(tcfg)
    kernels = resolve_kernels(cfg.kernels, trainer.device)
    set_kernels(model, kernels)
    if teacher is not None:
        set_kernels(teacher, kernels)

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
    teacher_fwd = forward_flops_per_token(teacher) if teacher is not None else 0.0

    def loss_fn(wrapped, batch):
        logits = lm_forward(wrapped, batch)
        a_t = ki_weight(trainer.step, ki_steps, cfg.ki_schedule, cfg.ki_alpha)
        if a_t <= 0.0:
            return ki_loss(logits, batch["labels"], None, 0.0, cfg.ki_temperature)
        if "teacher_ids" in batch:
            return ki_loss(logits, batch["labels"], (batch["teacher_ids"], batch["teacher_logits"]), a_t, cfg.ki_temperature)
        with torch.no_grad():
            teacher_logits = lm_forward(teacher, batch)
        loss, stats = ki_loss(logits, batch["labels"], teacher_logits, a_t, cfg.ki_temperature)
        stats["flops"] = teacher_fwd * default_tokens(batch)
        return loss, stats

    def eval_fn(wrapped):
        total, count = 0.0, 0
        valid_data.load_state_dict({"epoch": 0, "position": 0})
        for i, batch in enumerate(valid_data):
            if i >= cfg.eval_batches:
                break
            batch = trainer.to_device(batch)
            n = int((batch["labels"] != -100).sum())
            total += float(lm_loss(lm_forward(wrapped, batch), batch["labels"])) * n
            count += n
        return {"loss": total / max(count, 1), "ppl": float(np.exp(min(total / max(count, 1), 50.0)))}

    result = trainer.fit(model, loss_fn, data, eval_fn=eval_fn if cfg.eval_batches > 0 else None)
    summary = {
        "out": str(cfg.out), "checkpoint": str(Path(cfg.out) / CHECKPOINT_DIR), "steps": result.step,
        "tokens": result.tokens, "flops": result.flops, "train_seconds": result.train_seconds,
        "final_train_loss": result.last_train.get("loss"), "final_eval_loss": result.last_eval.get("loss"),
        "ki_steps": ki_steps, "teacher_cache_flops": cache_meta["flops"] if cache_meta else None,
        "resumed_from": result.resumed_from,
    }
    weights = trainer.full_state_dict()  # every process takes part: under FSDP it gathers the shards
    if trainer.is_main:
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
        save_checkpoint(Path(cfg.out) / CHECKPOINT_DIR, trainer.unwrapped.config, weights, tokenizer_dir=tok_dir,
                        stage="pretrain", parents=[p for p in [*parents, cfg.teacher] if p is not None], options=options,
                        metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))}, overwrite=True)
    trainer.wait()
    return summary
