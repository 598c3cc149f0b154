"""`cpmctl distill --teacher T --train train.jsonl --dev dev.jsonl --student-layers 3 OUT`: MixKD.

Knowledge distillation with mixup on word embeddings into a smaller student (the building blocks
and the objective are in `cpmctl/distill.py`), trained by the shared core (`cpmctl/training.py`:
accelerate, AdamW, schedule, accumulation, clipping, autocast, atomic training states, exact
resume, progress, metrics JSON lines).

Two modes:
- classification (`--train X.jsonl`, tasks as in prompt-tune: {"text", "text_pair"?, "label"}),
  scored as in prompt-tune (`cpmctl.tasks.Scorer`):
  `--head linear` (default): the student is the backbone plus a linear head
  (`cpmctl.tasks.LinearHead`); the teacher is a task model (a checkpoint with task.json and
  head.safetensors, e.g. OUT/checkpoint of an earlier run, or the output of `cpmctl prompt-tune
  --full --head linear`), or a plain checkpoint when no term needs the teacher (plain fine-tuning:
  --kd-weight 0 --mix-weight 0; this is how a teacher is fine-tuned in the first place);
  `--head lm` (decoder-only and encoder-decoder models; `--verbalizer labels.json`): teacher and
  student answer with the label word, each class scored by its LM head (log-probability of the
  word), and every term (CE, KD, mixed KD, mixed CE) works on those class scores. The teacher is
  any checkpoint with an LM head (a plain one, an earlier `--head lm` run, whose words become the
  default verbalizer, or `cpmctl prompt-tune --full --head lm`); mixup still interpolates word
  embeddings. An encoder-only model answers at a [MASK] slot, which a mixed pair does not share,
  so there `--head lm` runs without the mixup terms;
- LM distillation (`--data SHARDS` from `cpmctl data prepare`): decoder-only students learn
  next-token prediction, encoder-decoder ones span corruption, on the corpus, with the same four
  terms over the vocabulary at every target position (mixed targets: both sequences' labels).

Files:
    OUT/metrics.jsonl            train/eval records (the shared core's format)
    OUT/state/step-N/            training states; `--resume` continues exactly where they stop
    OUT/checkpoint/              the student, written atomically at the end: a regular checkpoint
                                 (config.json, model.safetensors, tokenizer/, cpmctl.json) plus,
                                 for tasks, head.safetensors and task.json (labels, pooling)

The teacher-logits cache (`--teacher-cache DIR`) stores the teacher's outputs on the
un-mixed training examples once: for a task, its class logits [N, C] (`cpmctl.distill.
TeacherLogitsCache`; linear-head or label-word scores, keyed on the teacher, its head or label
words, and the examples); for `--data`, pretrain's top-K cache (`cpmctl.teacher_cache`, K =
`--teacher-cache-k`) over every micro-batch of the run, keyed on teacher, data, batch layout, seed
and K, and the KD term becomes KL against the teacher's top-K renormalised (as in pretrain's
knowledge inheritance). A stale cache is refused. Mixed inputs change every step, so with
--mix-weight > 0 the teacher stays loaded and runs online on them; the cache then saves only the
teacher's pass over the originals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cpmctl import distill, task_model, tasks, teacher_cache
from cpmctl.command_configs import DistillConfig  # the options, declared once
from cpmctl.checkpoint import load_model
from cpmctl.data import make_batches
from cpmctl.errors import UserError
from cpmctl.fsutil import content_id
from cpmctl.plan import (ACTIVATION_FORMULA, activation_bytes, checkpoint_config, logits_bytes, make_plan,
                         meta_model, parameter_count, parameter_shapes, source_note, training_memory)
from cpmctl.tokenizer import load_tokenizer
from cpmctl.training import METRICS_FILE, TrainConfig, Trainer, forward_flops_per_token
from cpmctl.training_state import STATE_DIR

log = logging.getLogger("cpmctl")



# =============================================================================================
# Task models: backbone checkpoint + linear head + labels
# =============================================================================================


# =============================================================================================
# Batches the shared core can resume
# =============================================================================================


# =============================================================================================
# The models the trainer sees: one forward over originals and mixed inputs together
# =============================================================================================


# =============================================================================================
# LM distillation
# =============================================================================================


# =============================================================================================
# The stage
# =============================================================================================


def loss_weights(cfg: DistillConfig) -> distill.LossWeights:
    """The MixKD loss weights of the options (LossWeights checks them)."""
    return distill.LossWeights(ce=cfg.ce_weight, kd=cfg.kd_weight, mix=cfg.mix_weight, smix=cfg.smix_weight)


def _check_config(cfg: DistillConfig, *, inputs: bool = True) -> None:
    """Options and output checks; `inputs=False` (dry run) leaves out the checks that the task,
    corpus and verbalizer files exist (a pipeline's earlier step may write them)."""
    if (cfg.train is None) == (cfg.data is None):
        raise UserError("give either --train (a classification task) or --data (LM distillation)")
    sources = [x for x in (cfg.student, cfg.student_layers, cfg.student_config) if x is not None]
    if len(sources) > 1:
        raise UserError("give at most one of --student, --student-layers and --student-config")
    if cfg.student_decoder_layers is not None and cfg.student_layers is None:
        raise UserError("--student-decoder-layers goes with --student-layers")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {cfg.temperature}")
    if loss_weights(cfg).needs_mixup and cfg.mixup_alpha <= 0:
        raise UserError(f"--mixup-alpha must be > 0, got {cfg.mixup_alpha}")
    if not 0 < cfg.train_fraction <= 1:
        raise UserError(f"--train-fraction must be in (0, 1], got {cfg.train_fraction}")
    if cfg.augment < 0 or not 0 <= cfg.augment_prob <= 1:
        raise UserError("--augment must be >= 0 and --augment-prob in [0, 1]")
    if cfg.batch_size < 1 or cfg.epochs <= 0:
        raise UserError("--batch-size must be >= 1 and --epochs > 0")
    for path, what in ((cfg.train, "training file"), (cfg.dev, "dev file"), (cfg.data, "corpus")):
        if inputs and path is not None and not Path(path).exists():
            raise UserError(f"{what} {path} does not exist")
    if cfg.head not in ("linear", "lm"):
        raise UserError(f"unknown --head {cfg.head!r}; expected linear or lm")
    if cfg.verbalizer is not None and cfg.head != "lm":
        raise UserError("--verbalizer names the label words of --head lm")
    if cfg.data is not None and (cfg.head != "linear" or cfg.verbalizer is not None):
        raise UserError("--head and --verbalizer apply to classification tasks (--train), not to --data")
    if inputs and cfg.verbalizer is not None and not Path(cfg.verbalizer).is_file():
        raise UserError(f"verbalizer file {cfg.verbalizer} does not exist")
    if cfg.patience is not None or cfg.keep_best:
        if cfg.dev is None or cfg.eval_every <= 0:
            raise UserError("--patience and --keep-best work on dev evaluations: give --dev and --eval-every")
        if cfg.patience is not None and cfg.patience < 1:
            raise UserError(f"--patience must be >= 1, got {cfg.patience}")
    if cfg.teacher_cache_k < 1:
        raise UserError(f"--teacher-cache-k must be >= 1, got {cfg.teacher_cache_k}")
    out = Path(cfg.out)
    if cfg.resume:
        if not (out / "state").is_dir():
            raise UserError(f"--resume: {out} holds no training state; start without --resume")
    elif out.exists() and not cfg.force:
        raise UserError(f"output {out} already exists; choose a new path, --resume it or pass --force")


def _clear_run(out: Path) -> None:
    """--force: drop an earlier run's training states and metrics (its checkpoint/ is replaced
    atomically at the end)."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    (out / METRICS_FILE).unlink(missing_ok=True)


def build_student(cfg: DistillConfig, teacher: nn.Module, teacher_tokenizer: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The student backbone and a description of where it came from."""
    config = teacher.config
    if cfg.student is not None:
        if task_model.tokenizer_hash(Path(cfg.student)) != teacher_tokenizer:
            raise UserError(f"student {cfg.student} and the teacher use different tokenizers; distillation needs the same token ids")
        student_path = task_model.resolve_task_model(Path(cfg.student))
        model, _ = load_model(student_path)
        model = _owned(model)
        if model.config.vocab_size != config.vocab_size:
            raise UserError(f"student vocabulary {model.config.vocab_size} differs from the teacher's {config.vocab_size}")
        return model, {"student": str(cfg.student)}
    if cfg.student_config is not None:
        model = distill.student_from_preset(cfg.student_config, config)
        _check_preset_student(cfg, model.config, config)
        return model, {"student_config": cfg.student_config}
    layers, decoder_layers = student_layers(cfg, config)
    student = distill.student_from_teacher(teacher, layers, decoder_layers)
    info: dict[str, Any] = {"student_layers": layers}
    if decoder_layers is not None:
        info["student_decoder_layers"] = decoder_layers
    return student, info


def student_layers(cfg: DistillConfig, config) -> tuple[list[int], list[int] | None]:
    """The teacher layers the student keeps (encoder or only stack; decoder of an encoder-decoder)."""
    n = config.n_layers
    layers = distill.parse_layers(cfg.student_layers if cfg.student_layers is not None else str(max(1, n // 2)), n)
    decoder_layers = None
    if config.arch == "encoder-decoder":
        nd = config.n_decoder_layers
        spec = cfg.student_decoder_layers if cfg.student_decoder_layers is not None else (
            cfg.student_layers if cfg.student_layers is not None else str(max(1, nd // 2)))
        decoder_layers = distill.parse_layers(spec, nd)
    return layers, decoder_layers


def _check_preset_student(cfg: DistillConfig, student_config, teacher_config) -> None:
    if cfg.data is None and student_config.arch != teacher_config.arch:
        raise UserError(f"a {student_config.arch} student cannot take a {teacher_config.arch} teacher's task inputs; "
                        f"choose a {teacher_config.arch} preset")


def plan(cfg: DistillConfig, *, stand_ins=None):
    """What `run(cfg)` would train, from the teacher's (and student's) config alone."""
    _check_config(cfg, inputs=False)
    teacher_dir = task_model.planned_model_dir(Path(cfg.teacher), stand_ins)
    teacher_config = checkpoint_config(teacher_dir, stand_ins)
    notes: list[str | None] = [source_note(teacher_dir, "teacher", stand_ins)]
    for path, what in ((cfg.train, "--train"), (cfg.dev, "--dev"), (cfg.data, "--data")):
        if path is not None and not Path(path).exists():
            notes.append(f"{what} {path}: not there yet")
    if cfg.student is not None:
        student_dir = task_model.planned_model_dir(Path(cfg.student), stand_ins)
        config = checkpoint_config(student_dir, stand_ins)
        notes.append(source_note(student_dir, "student", stand_ins))
        if Path(cfg.student).exists() and Path(cfg.teacher).exists() and task_model.tokenizer_hash(Path(cfg.student)) != task_model.tokenizer_hash(teacher_dir):
            raise UserError(f"student {cfg.student} and the teacher use different tokenizers; distillation needs the same token ids")
        if config.vocab_size != teacher_config.vocab_size:
            raise UserError(f"student vocabulary {config.vocab_size} differs from the teacher's {teacher_config.vocab_size}")
        student = meta_model(config)
    elif cfg.student_config is not None:
        config = distill.preset_student_config(cfg.student_config, teacher_config)
        _check_preset_student(cfg, config, teacher_config)
        student = meta_model(config)
    else:
        layers, decoder_layers = student_layers(cfg, teacher_config)
        student = distill.student_from_teacher(meta_model(teacher_config), layers, decoder_layers)
        config = student.config
    trainable = _trainable(cfg)
    trainable_shapes = parameter_shapes(student, trainable)
    parameters = parameter_count(student)
    seq = cfg.seq_len if cfg.data is not None else cfg.max_length
    student_forwards = 2 if (cfg.mix_weight or cfg.smix_weight) else 1  # originals, and mixed inputs
    bytes_per_value = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    lengths = {"encoder": seq, "decoder": seq if (cfg.data is not None or config.arch == "decoder") else 1}
    activations = student_forwards * activation_bytes(config, cfg.batch_size, lengths, bytes_per_value)
    logits = 0
    if cfg.data is not None:  # the student's and the teacher's logits over the vocabulary
        logits = 2 * student_forwards * logits_bytes(cfg.batch_size, seq, config.vocab_size)
    breakdown = training_memory(weights=4 * parameters, trainable_shapes=trainable_shapes, optimizer="adamw",
                                activations=activations, logits=logits,
                                teacher=4 * parameter_count(meta_model(teacher_config)))
    notes.append(f"activations: {ACTIVATION_FORMULA}, {cfg.batch_size} rows of {seq} tokens, "
                 f"{student_forwards} student forward pass(es) per step")
    steps = cfg.max_steps
    if steps is None:
        notes.append("steps: epochs x batches per epoch, known once the data is read (give --max-steps to fix them)")
    tokens = None if steps is None else steps * cfg.grad_accum * cfg.batch_size * seq
    return make_plan("distill", output=Path(cfg.out) / task_model.MODEL_DIR, output_config=config, parameters=parameters,
                     trainable=sum(math.prod(s) for s in trainable_shapes), parameter_bytes=4 * parameters, devices=1,
                     breakdown=breakdown, steps=steps, tokens=tokens, notes=notes,
                     details={"student": f"{config.arch}, d_model {config.d_model}, layers {config.stack_depths()}",
                              "mode": "LM (--data)" if cfg.data is not None else "classification (--train)"})


def _owned(model: nn.Module) -> nn.Module:
    """Parameters copied out of the checkpoint's memory map (a trained model must own them)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().clone().float() if p.is_floating_point() else p.detach().clone()))
    return model


def run(cfg: DistillConfig) -> dict[str, Any]:
    _check_config(cfg)
    weights = loss_weights(cfg)
    teacher_tm = task_model.load_task_model(Path(cfg.teacher))
    teacher = teacher_tm.model.float().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, student_info = build_student(cfg, teacher, teacher_tm.tokenizer_hash)
    if cfg.force and not cfg.resume and Path(cfg.out).exists():
        _clear_run(Path(cfg.out))
    if cfg.data is not None:
        return _run_lm(cfg, weights, teacher_tm, teacher, student, student_info)
    return _run_classification(cfg, weights, teacher_tm, teacher, student, student_info)


def _train_config(cfg: DistillConfig, steps_per_epoch: int):
    max_steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch / cfg.grad_accum))
    return TrainConfig(
        out=Path(cfg.out), max_steps=max_steps, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        warmup_steps=int(cfg.warmup_ratio * max_steps), grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm or None,
        mixed_precision=cfg.mixed_precision, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
        eval_every=cfg.eval_every, log_every=cfg.log_every, resume=cfg.resume, cpu=cfg.device == "cpu",
        progress=cfg.progress, resume_with_changes=cfg.resume_with_changes,
        # dev accuracy drives early stopping and the kept student (classification only: --dev)
        best_metric="accuracy" if cfg.patience is not None or cfg.keep_best else None, best_mode="max",
        patience=cfg.patience, restore_best=cfg.keep_best,
        trajectory={"batch_size": cfg.batch_size, "train": content_id(cfg.train), "data": content_id(cfg.data),
                    "train_fraction": cfg.train_fraction, "max_length": cfg.max_length, "seq_len": cfg.seq_len,
                    "ce_weight": cfg.ce_weight, "kd_weight": cfg.kd_weight, "mix_weight": cfg.mix_weight,
                    "smix_weight": cfg.smix_weight, "temperature": cfg.temperature, "mixup_alpha": cfg.mixup_alpha,
                    "augment": cfg.augment, "augment_prob": cfg.augment_prob},
    )


def _trainable(cfg: DistillConfig):
    """None (everything), or a predicate leaving out the embedding tables (the mixup still
    interpolates them; they are just not updated). A tied LM head stays fixed with them."""
    if not cfg.freeze_embeddings:
        return None
    tables = (".embed.tokens.", ".embed.positions.", ".embed.token_types.")
    return lambda name: not any(t in f".{name}" for t in tables)


def _options(cfg: DistillConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def _run_classification(cfg, weights, teacher_tm: task_model.TaskModel, teacher, student, student_info) -> dict[str, Any]:
    lm_head = cfg.head == "lm"
    examples = tasks.load_examples(cfg.train)
    verbalizer = tasks.load_verbalizer(cfg.verbalizer) if cfg.verbalizer is not None else None
    if lm_head and verbalizer is None and teacher_tm.scoring == "lm" and teacher_tm.labels is not None:
        verbalizer = dict(zip(teacher_tm.labels, teacher_tm.words))  # the words the teacher was trained to answer with
    label_set = tasks.LabelSet.from_examples(examples, verbalizer)
    if teacher_tm.labels is not None and tuple(teacher_tm.labels) != label_set.labels:
        raise UserError(f"the teacher was trained on labels {', '.join(teacher_tm.labels)}; {cfg.train} has {', '.join(label_set.labels)}")
    if lm_head and teacher_tm.scoring == "lm" and teacher_tm.words is not None and tuple(teacher_tm.words) != label_set.words:
        raise UserError(f"the teacher answers with the words {', '.join(teacher_tm.words)}; --verbalizer gives {', '.join(label_set.words)}")
    if not lm_head and teacher_tm.head is None and weights.needs_teacher:
        raise UserError(f"teacher {cfg.teacher} has no task head ({task_model.TASK_FILE}); fine-tune it first "
                        "(cpmctl distill --teacher CKPT --student-layers ALL --kd-weight 0 --mix-weight 0 ...) "
                        "or set --kd-weight 0 --mix-weight 0")
    tok_dir = teacher_tm.path / "tokenizer"
    if not tok_dir.is_dir():
        raise UserError(f"teacher {teacher_tm.path} has no tokenizer/; a task needs one to encode its text")
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.pad_id is None:
        raise UserError("the teacher's tokenizer has no padding token; batches need one")
    mode = "lm" if lm_head else "linear"
    label_ids = tasks.label_token_ids(tokenizer, label_set.words) if lm_head else None
    if lm_head and student.config.arch == "encoder" and weights.needs_mixup:
        raise UserError("--head lm with an encoder-only model answers at a [MASK] position, which differs between the "
                        "two inputs of a mixed pair; set --mix-weight 0 --smix-weight 0 or use --head linear")
    limit = tasks.position_limit(student.config)
    max_length = min(cfg.max_length, limit) if limit else cfg.max_length

    if cfg.train_fraction < 1:
        keep = max(1, round(cfg.train_fraction * len(examples)))
        picked = np.sort(np.random.default_rng([cfg.seed, 0xF0]).permutation(len(examples))[:keep])
        examples = [examples[int(i)] for i in picked]
    rows, truncated = tasks.encode_examples(tokenizer, student.config, examples, label_set, mode=mode, max_length=max_length)
    if truncated:
        log.info(f"{truncated} training example(s) truncated to {max_length} tokens")
    if cfg.augment:
        prob = cfg.augment_prob
        options = dict(vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids | {tokenizer.unk_id} - {None},
                       mask_id=tokenizer.mask_id, mask_prob=prob / 2 if tokenizer.mask_id is not None else 0.0,
                       replace_prob=prob / 2 if tokenizer.mask_id is not None else prob)
        new_ids, _ = distill.augment_examples([r.ids for r in rows], [r.label for r in rows], cfg.augment, cfg.seed, **options)
        rows = rows + [replace(rows[i % len(rows)], ids=ids) for i, ids in enumerate(new_ids)]
    dev_rows = None
    if cfg.dev is not None:
        dev_rows, _ = tasks.encode_examples(tokenizer, student.config, tasks.load_examples(cfg.dev), label_set, mode=mode, max_length=max_length)

    # Scorers. --head lm: both models score the label words with their LM heads (KD over those
    # class scores). Linear: the student starts from the teacher's head when the widths match.
    if lm_head:
        head = None
        scorer = tasks.Scorer(student, label_ids=label_ids)
        teacher_scorer = tasks.Scorer(teacher, label_ids=label_ids).eval() if weights.needs_teacher else None
    else:
        torch.manual_seed(cfg.seed)
        head = tasks.LinearHead(student.config.d_model, len(label_set), cfg.pooling)
        if teacher_tm.head is not None and teacher.config.d_model == student.config.d_model and teacher_tm.pooling == cfg.pooling:
            head.load_state_dict(teacher_tm.head.state_dict())
        scorer = tasks.Scorer(student, head=head)
        teacher_scorer = tasks.Scorer(teacher, head=teacher_tm.head.float().eval()) if teacher_tm.head is not None else None
    model = distill.MixKDClassifier(scorer)

    batches = distill.TaskBatches(rows, cfg.batch_size, tokenizer.pad_id, cfg.seed)
    trainer = Trainer(_train_config(cfg, batches.batches_per_epoch))
    if teacher_scorer is not None:
        teacher_scorer.to(trainer.device)
    cache = None
    if weights.kd and cfg.teacher_cache is not None:
        cache_path = Path(cfg.teacher_cache)
        key = teacher_key(teacher_tm, label_ids)
        if trainer.is_main:
            cache = _teacher_cache(cache_path, teacher_scorer, key, rows, tokenizer.pad_id, cfg.batch_size, trainer.device)
        trainer.wait()
        if cache is None:
            cache = distill.TeacherLogitsCache.open(cache_path, teacher=key, examples=distill.examples_hash([r.ids for r in rows]))
    if cache is not None and weights.mix:
        log.info("teacher-logits cache: serves the KD term on the original examples; mixed inputs are new every step, "
                 "so the teacher also runs online on them (--mix-weight 0 trains from the cache alone)")
    if not (weights.mix > 0 or (weights.kd > 0 and cache is None)):
        teacher_scorer = None  # nothing calls it any more: let it go
    objective = distill.ClassificationObjective(weights, cfg.temperature, cfg.mixup_alpha, cfg.seed, len(label_set), teacher_scorer, cache,
                                        forward_flops_per_token(teacher) if teacher_scorer is not None else 0.0)

    def evaluate(wrapped) -> dict[str, float]:
        inner = wrapped.module if hasattr(wrapped, "module") else wrapped
        metrics = tasks.evaluate(inner.scorer, tasks.eval_batches(dev_rows, cfg.batch_size, tokenizer.pad_id), len(label_set), device=trainer.device)
        return {k: metrics[k] for k in ("accuracy", "macro_f1", "loss")}

    log.info(f"distill: {len(rows):,} training rows ({cfg.augment} augmented copies each), {len(label_set)} labels, "
             f"student {student_info}, weights {asdict(weights)}, T={cfg.temperature}, alpha={cfg.mixup_alpha}")
    result = trainer.fit(model, objective, batches, eval_fn=evaluate if dev_rows else None, trainable=_trainable(cfg))
    if trainer.is_main:
        # --keep-best: the saved student is the best evaluation's, so are its dev figures
        dev = result.best["metrics"] if cfg.keep_best and result.best is not None else result.last_eval
        metrics = {"steps": result.step, **{f"dev_{k}": v for k, v in dev.items()}}
        if result.best is not None:
            metrics["best_step"] = result.best["step"]
        task_model.save_task_model(Path(cfg.out) / task_model.MODEL_DIR, scorer.model, scorer.head, labels=label_set.labels, words=label_set.words,
                        pooling=cfg.pooling if head is not None else "mean", tokenizer_dir=tok_dir, parents=[teacher_tm.path], options=_options(cfg), metrics=metrics)
    trainer.wait()
    return {"out": str(cfg.out), "model": str(Path(cfg.out) / task_model.MODEL_DIR), "steps": result.step, "train_rows": len(rows),
            "dev": result.best["metrics"] if cfg.keep_best and result.best is not None else result.last_eval,
            "best": result.best, "stopped_early": result.stopped_early, "train": result.last_train, "train_seconds": result.train_seconds,
            "resumed_from": result.resumed_from, "cache": str(cache.path) if cache is not None else None, "head": cfg.head,
            **student_info}


def teacher_key(teacher_tm: task_model.TaskModel, label_ids: list[list[int]] | None) -> str:
    """What the cached class logits depend on besides the examples: the teacher's weights and
    head, and with --head lm the label words' token ids (other words, other scores)."""
    if label_ids is None:
        return teacher_tm.identity
    return f"{teacher_tm.identity}:lm:{hashlib.sha256(json.dumps(label_ids).encode()).hexdigest()[:16]}"


def _teacher_cache(path: Path, teacher_scorer, teacher: str, rows, pad_id: int, batch_size: int, device) -> distill.TeacherLogitsCache:
    """Open the cache at `path` (built for the teacher keyed `teacher` and these rows), or run
    `teacher_scorer` over the rows once and write it: class logits [N, C], linear or label-word."""
    key = distill.examples_hash([r.ids for r in rows])
    if path.exists():
        cache = distill.TeacherLogitsCache.open(path, teacher=teacher, examples=key)
        log.info(f"teacher-logits cache {path}: {len(cache):,} rows reused")
        return cache
    logits = None
    with torch.no_grad():
        for batch in tasks.eval_batches(rows, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            scores = teacher_scorer(batch).float().cpu().numpy()
            if logits is None:
                logits = np.zeros((len(rows), scores.shape[1]), dtype=np.float32)
            logits[batch["index"].cpu().numpy()] = scores
    log.info(f"teacher-logits cache {path}: {len(rows):,} rows written")
    return distill.TeacherLogitsCache.build(path, logits, teacher=teacher, examples=key)


def _run_lm(cfg, weights, teacher_tm: task_model.TaskModel, teacher, student, student_info) -> dict[str, Any]:
    config = student.config
    if config.arch == "encoder" or teacher.config.arch == "encoder":
        raise UserError("LM distillation needs decoder-only or encoder-decoder models (an encoder has no next-token objective)")
    if student.lm_head is None or teacher.lm_head is None:
        raise UserError("LM distillation needs models with an LM head")
    tok_dir = teacher_tm.path / "tokenizer"
    if not tok_dir.is_dir():
        raise UserError(f"teacher {teacher_tm.path} has no tokenizer/; LM distillation needs it to read the corpus")
    tokenizer = load_tokenizer(tok_dir)
    objective_name = "span" if config.arch == "encoder-decoder" else "causal"

    def corpus_batches():
        return make_batches(cfg.data, tokenizer, objective=objective_name, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                            seed=cfg.seed, decoder_start_id=config.start_token_id if config.arch == "encoder-decoder" else None)

    inner = corpus_batches()
    batches = distill.KeyedBatches(inner)
    tcfg = _train_config(cfg, inner.batches_per_epoch)
    trainer = Trainer(tcfg)
    if weights.needs_teacher:
        teacher.to(trainer.device)
    cache_meta = None
    if weights.kd and cfg.teacher_cache is not None:
        # pretrain's top-K cache (cpmctl.teacher_cache), over every micro-batch of this run
        needed = tcfg.max_steps * cfg.grad_accum
        cache_meta = lm_teacher_cache(Path(cfg.teacher_cache), teacher, teacher_tm, corpus_batches, cfg, needed,
                                      config.vocab_size, trainer)
        batches = teacher_cache.CachedTeacherBatches(batches, Path(cfg.teacher_cache))
        if weights.mix:
            log.info("teacher-logits cache: serves the KD term on the original examples; mixed inputs are new every step, "
                     "so the teacher also runs online on them (--mix-weight 0 trains from the cache alone)")
    online = weights.mix > 0 or (weights.kd > 0 and cache_meta is None)
    objective = distill.LMObjective(weights, cfg.temperature, cfg.mixup_alpha, cfg.seed, teacher if online else None,
                            forward_flops_per_token(teacher))
    log.info(f"distill (LM, {objective_name}): student {student_info}, weights {asdict(weights)}, T={cfg.temperature}")
    result = trainer.fit(distill.MixKDLanguageModel(student), objective, batches, trainable=_trainable(cfg))
    if trainer.is_main:
        task_model.save_task_model(Path(cfg.out) / task_model.MODEL_DIR, student, None, tokenizer_dir=tok_dir, parents=[teacher_tm.path],
                        options=_options(cfg), metrics={"steps": result.step, **result.last_train})
    trainer.wait()
    return {"out": str(cfg.out), "model": str(Path(cfg.out) / task_model.MODEL_DIR), "steps": result.step, "train": result.last_train,
            "train_seconds": result.train_seconds, "resumed_from": result.resumed_from,
            "cache": str(cfg.teacher_cache) if cache_meta else None,
            "cache_flops": cache_meta["flops"] if cache_meta else None, **student_info}


def lm_fingerprint(cfg: DistillConfig, teacher_tm: task_model.TaskModel, data_batches, student_vocab: int) -> dict[str, Any]:
    """The shared cache fingerprint with distill's batch layout (the corpus has no valid split)
    and the student's vocabulary (the teacher's top-K is taken over the ids the student has)."""
    weights_hash = teacher_tm.identity.rsplit(":", 1)[0]  # identity = "<weights hash>:<head hash>"
    return teacher_cache.cache_fingerprint(weights_hash, data_batches, cfg.teacher_cache_k, seq_len=cfg.seq_len,
                                           batch_size=cfg.batch_size, seed=cfg.seed, student_vocab=student_vocab)


def lm_teacher_cache(path: Path, teacher, teacher_tm: task_model.TaskModel, corpus_batches, cfg: DistillConfig, micro_batches: int,
                     student_vocab: int, trainer) -> dict[str, Any]:
    """Open (checking it is this run's: teacher, data, layout, K, length) or build the top-K cache."""
    fingerprint = lm_fingerprint(cfg, teacher_tm, corpus_batches(), student_vocab)
    if not path.exists():
        if trainer.is_main:
            log.info(f"building the teacher cache ({micro_batches} batches, top-{cfg.teacher_cache_k}) in {path}")
            teacher_cache.build_teacher_cache(path, teacher, corpus_batches(), micro_batches, cfg.teacher_cache_k, fingerprint,
                                              trainer.device, student_vocab)
        trainer.wait()
    else:
        log.info(f"teacher cache {path}: reused")
    return teacher_cache.check_cache(path, fingerprint, micro_batches)
