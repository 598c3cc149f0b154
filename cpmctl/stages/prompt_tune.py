"""`cpmctl prompt-tune`: adapt a frozen model to a classification task with a soft prompt.

    cpmctl prompt-tune ./m2 --train train.jsonl --dev dev.jsonl ./prompt
    cpmctl prompt-tune ./minilm --train t.jsonl --dev d.jsonl --head linear --prompt-length 40 ./p
    cpmctl prompt-tune ./m2 --train t.jsonl --dev d.jsonl --full ./baseline   # full fine-tuning
    cpmctl infer ./m2 --prompt ./prompt --input test.jsonl                    # accuracy

Only the prompt (and the linear head, with --head linear) is trainable: the training core gives
frozen weights neither gradients nor optimizer state. Training runs on `cpmctl.training.Trainer`
(keep-the-best and early stopping on dev accuracy); its resumable state and metrics.jsonl live
in `<OUT>.train/` until the adapter is written (metrics.jsonl is then copied into OUT).
`--full` fine-tunes every weight with the same data, scoring and evaluation (the baseline) and
writes OUT/model (a checkpoint) plus a prompt-free adapter in OUT holding labels and head.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cpmctl.checkpoint import SafetensorsFile, load_model, save_checkpoint, write_safetensors
from cpmctl.devices import current_memory_bytes, peak_memory_bytes
from cpmctl.command_configs import PromptTuneConfig  # the options, declared once
from cpmctl.errors import UserError
from cpmctl.fsutil import any_of, atomic_directory, check_output, content_id, holding
from cpmctl.plan import (ACTIVATION_FORMULA, activation_bytes, checkpoint_config, checkpointed_activation_bytes,
                         dtype_bytes, is_assumed, make_plan, meta_model, parameter_count, parameter_shapes,
                         source_note, stored_dtype, training_memory)
from cpmctl.prompt import (Adapter, PromptedClassifier, SoftPrompt, base_model_hash, encode_for,
                           gradient_checkpointing, initial_vectors, peft_base_model, peft_config, prompt_plan,
                           token_counts, write_adapter)
from cpmctl.tasks import (LabelSet, LinearHead, Scorer, TrainBatches, classification_loss, eval_batches, evaluate,
                          label_token_ids, load_examples, load_verbalizer, position_limit, subsample)
from cpmctl.tokenizer import load_tokenizer
from cpmctl.training import TrainConfig, Trainer

log = logging.getLogger("cpmctl")

FULL_MODEL_DIR = "model"
BEST_FILE = "best.safetensors"  # in the run directory: the trainable tensors at the best dev accuracy




def _check_outputs(cfg: PromptTuneConfig) -> None:
    if cfg.out.exists() and not cfg.force:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")
    if cfg.run_dir.exists() and not cfg.resume and not cfg.force:
        raise UserError(f"{cfg.run_dir} holds an earlier run's training state; pass --resume to continue it or --force to start over")
    # --force deletes the run directory too: only when it is one (the trainer's files, or empty)
    check_output(cfg.run_dir, overwrite=True, inputs=[cfg.model, cfg.train, cfg.dev, cfg.test, cfg.verbalizer],
                 ours=any_of(holding("state"), holding("metrics.jsonl"), holding(BEST_FILE)), keep=cfg.resume)


def _train_config(cfg: PromptTuneConfig, *, has_dev: bool):
    return TrainConfig(
        out=cfg.run_dir, max_steps=cfg.max_steps, lr=cfg.resolved_lr(), optimizer=cfg.resolved_optimizer(),
        weight_decay=cfg.weight_decay, schedule="constant", warmup_steps=0, max_grad_norm=1.0,
        mixed_precision=cfg.mixed_precision, seed=cfg.seed, eval_every=cfg.eval_every if has_dev else 0,
        log_every=max(1, min(50, cfg.max_steps // 10 or 1)), resume=cfg.resume, cpu=cfg.device == "cpu",
        progress=cfg.progress, best_metric="accuracy" if has_dev else None, best_mode="max",
        patience=cfg.patience if has_dev else None, resume_with_changes=cfg.resume_with_changes,
        trajectory={"batch_size": cfg.batch_size, "train": content_id(cfg.train), "dev": content_id(cfg.dev),
                    "max_train_examples": cfg.max_train_examples, "prompt_length": cfg.prompt_length,
                    "position": cfg.position, "init": cfg.init, "reparam": cfg.reparam, "deep": cfg.deep,
                    "head": cfg.head, "full": cfg.full, "max_length": cfg.max_length},
    )


def deep_layers(cfg: PromptTuneConfig, config) -> int:
    """--deep: a prompt delta at every layer of the prompted stack after the first (that one
    reads the prompt itself)."""
    stack = "encoder" if config.has_encoder else "decoder"  # cpmctl.prompt.prompted_stack's choice
    return config.stack_depths()[stack] - 1 if cfg.deep else 0


def trainable_modules(cfg: PromptTuneConfig, config, n_classes: int):
    """The modules the run trains beside (or, with --full, with) the frozen model: the soft prompt
    (None with --full) and the linear head (None with --head lm), built on the meta device."""
    with torch.device("meta"):
        prompt = None if cfg.full else SoftPrompt(torch.empty(cfg.prompt_length, config.d_model), reparam=cfg.reparam,
                                                  hidden=cfg.reparam_hidden, deep_layers=deep_layers(cfg, config))
        head = LinearHead(config.d_model, n_classes, cfg.pooling) if cfg.head == "linear" else None
    return prompt, head


def plan(cfg: PromptTuneConfig, *, stand_ins=None):
    """What `run(cfg)` would train, from the model's config alone (the task files are read when
    they are there, for the number of classes and examples)."""
    cfg.validate()
    _check_outputs(cfg)
    config = checkpoint_config(cfg.model, stand_ins)
    notes: list[str | None] = [source_note(cfg.model, "model", stand_ins)]
    if not is_assumed(cfg.model, stand_ins) and not (Path(cfg.model) / "tokenizer").is_dir():
        raise UserError(f"checkpoint {cfg.model} has no tokenizer/ directory")
    n_classes = 2
    if Path(cfg.train).is_file():
        examples = subsample(load_examples(cfg.train), cfg.max_train_examples, cfg.seed)
        verbalizer = load_verbalizer(cfg.verbalizer) if cfg.verbalizer else None
        n_classes = len(LabelSet.from_examples(examples, verbalizer))
    else:
        notes.append(f"--train {cfg.train}: not there yet (2 classes assumed for the head)")
    train_cfg = _train_config(cfg, has_dev=cfg.dev is not None)
    model = meta_model(config)
    prompt, head = trainable_modules(cfg, config, n_classes)
    extra = [m for m in (prompt, head) if m is not None]
    extra_shapes = [tuple(p.shape) for m in extra for p in m.parameters()]
    trainable_shapes = (parameter_shapes(model) if cfg.full else []) + extra_shapes
    parameters = parameter_count(model)
    trainable = sum(math.prod(s) for s in trainable_shapes)
    dtype = stored_dtype(cfg.model)
    weight_bytes = parameters * dtype_bytes(dtype) + 4 * sum(math.prod(s) for s in extra_shapes)
    limit = position_limit(config)
    seq = cfg.max_length or limit
    if seq is None:
        seq = config.max_positions
        notes.append(f"sequence length: no --max-length and no position table, {seq} tokens (max_positions) assumed per row")
    seq_by_stack = {"encoder": seq, "decoder": seq if config.arch == "decoder" else 1}
    bytes_per_value = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    activations = (checkpointed_activation_bytes if cfg.gradient_checkpointing else activation_bytes)(
        config, cfg.batch_size, seq_by_stack, bytes_per_value)
    breakdown = training_memory(weights=weight_bytes, trainable_shapes=trainable_shapes, optimizer=train_cfg.optimizer,
                                activations=activations, logits=0)
    del breakdown["logits"]
    notes.append(f"activations: {ACTIVATION_FORMULA}, {cfg.batch_size} rows of {seq} tokens (prompt included)"
                 + (" (--gradient-checkpointing: each layer keeps its input, one layer at a time is recomputed)"
                    if cfg.gradient_checkpointing else ""))
    return make_plan("prompt-tune", output=Path(cfg.out), output_config=None, parameters=parameters, trainable=trainable,
                     parameter_bytes=weight_bytes, devices=1, breakdown=breakdown, steps=cfg.max_steps,
                     tokens=cfg.max_steps * cfg.batch_size * seq, notes=notes,
                     details={"optimizer": train_cfg.optimizer, "classes": n_classes,
                              "trained": "every weight (--full)" if cfg.full else
                              f"prompt {cfg.prompt_length} x {config.d_model}" + (" at every layer" if cfg.deep else "")
                              + (" + linear head" if head is not None else "")})


def run(cfg: PromptTuneConfig) -> dict[str, Any]:
    cfg.validate()
    _check_outputs(cfg)
    if cfg.run_dir.exists() and not cfg.resume:
        shutil.rmtree(cfg.run_dir)  # --force (checked above)

    train_examples = subsample(load_examples(cfg.train), cfg.max_train_examples, cfg.seed)
    dev_examples = subsample(load_examples(cfg.dev), cfg.max_dev_examples, cfg.seed) if cfg.dev else None
    test_examples = subsample(load_examples(cfg.test), cfg.max_test_examples, cfg.seed) if cfg.test else None
    verbalizer = load_verbalizer(cfg.verbalizer) if cfg.verbalizer else None
    labels = LabelSet.from_examples(train_examples, verbalizer)

    model, ckpt = load_model(cfg.model)
    tokenizer_dir = Path(cfg.model) / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise UserError(f"checkpoint {cfg.model} has no tokenizer/ directory")
    tok = load_tokenizer(tokenizer_dir)
    config = model.config
    base_hash = base_model_hash(ckpt, model)
    if cfg.full:
        # Our own copy of the weights: the loaded ones are views of the memory-mapped files.
        for p in model.parameters():
            p.data = p.data.clone()
        ckpt.close()  # no view of the files is left: their pages leave memory

    scoring = "linear" if cfg.head == "linear" else "lm"
    label_ids = label_token_ids(tok, labels.words) if scoring == "lm" else None
    # The head and the reparameterisation MLP draw their initial weights from torch's global
    # generator before the Trainer seeds it, and torch seeds that generator at random in every
    # process: seeded here, two runs with one --seed start (and so end) alike.
    torch.manual_seed(cfg.seed)
    head = LinearHead(config.d_model, len(labels), cfg.pooling) if scoring == "linear" else None
    scorer = Scorer(model, label_ids=label_ids, head=head)

    plan = None if cfg.full else prompt_plan(cfg.position, cfg.prompt_length)
    train_rows = encode_for(tok, config, train_examples, labels, scoring=scoring, plan=plan, max_length=cfg.max_length, what="training")
    dev_rows = encode_for(tok, config, dev_examples, labels, scoring=scoring, plan=plan, max_length=cfg.max_length, what="dev") if dev_examples else None
    test_rows = encode_for(tok, config, test_examples, labels, scoring=scoring, plan=plan, max_length=cfg.max_length, what="test") if test_examples else None

    prompt = None
    if not cfg.full:
        counts = token_counts(train_rows, exclude=tok.special_ids)
        init = initial_vectors(cfg.init, cfg.prompt_length, model.embed.tokens.weight, counts=counts, label_ids=label_ids, tokenizer=tok, seed=cfg.seed)
        prompt = SoftPrompt(init, reparam=cfg.reparam, hidden=cfg.reparam_hidden, deep_layers=deep_layers(cfg, config))
    classifier = PromptedClassifier(scorer, prompt)
    trainable = None if cfg.full else ["prompt"] + (["scorer.head"] if head is not None else [])

    train_cfg = _train_config(cfg, has_dev=bool(dev_rows))
    trainer = Trainer(train_cfg)
    device = trainer.device
    timing: dict[str, float] = {"eval_seconds": 0.0}

    def loss_fn(module, batch):
        logits = module(batch)
        loss = classification_loss(logits, batch["labels"])
        return loss, {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}

    def eval_fn(module):
        started = time.perf_counter()
        result = evaluate(module, eval_batches(dev_rows, cfg.batch_size * 2, tok.pad_id), len(labels), device=device)
        timing["eval_seconds"] += time.perf_counter() - started
        # The peak so far covers every training step and evaluation, and not the training
        # core's end-of-run state save (which serialises the whole model and optimizer once).
        timing["peak"] = peak_memory_bytes(device)
        return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"], "loss": result["loss"]}

    best_file = cfg.run_dir / BEST_FILE

    def on_best(module, step, metrics):
        # The best trainable tensors go to disk, not to a second copy in memory (for --full that
        # would be the whole model), and survive an interruption for --resume.
        started = time.perf_counter()
        trained = {name: p.detach().cpu() for name, p in module.named_parameters() if p.requires_grad}
        tmp = best_file.with_suffix(".tmp")
        write_safetensors(tmp, trained)
        os.replace(tmp, best_file)
        timing["eval_seconds"] += time.perf_counter() - started

    batches = TrainBatches(train_rows, cfg.batch_size, tok.pad_id, seed=cfg.seed)
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory_before = current_memory_bytes(device)
    with gradient_checkpointing(model, cfg.gradient_checkpointing):
        result = trainer.fit(classifier, loss_fn, batches, trainable=trainable, eval_fn=eval_fn if dev_rows else None, on_best=on_best)
        peak = timing.get("peak") or peak_memory_bytes(device)
        final = trainer.unwrapped
        if result.best is not None and best_file.is_file():  # keep the prompt (or weights) with the best dev accuracy
            with torch.no_grad(), SafetensorsFile(best_file) as st:
                params = dict(final.named_parameters())
                for name in st.names():
                    params[name].copy_(st.get(name).to(params[name].device))
        final.eval()
        test_metrics = None
        if test_rows:
            with torch.no_grad():
                test_metrics = evaluate(final, eval_batches(test_rows, cfg.batch_size * 2, tok.pad_id), len(labels), device=device)
            test_metrics.pop("predictions")

    backbone_params = sum(p.numel() for p in model.parameters())
    trainable_params = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    steps = max(result.step - (result.resumed_from or 0), 1)
    metrics = {
        "steps": result.step, "stopped_early": result.stopped_early,
        "best": result.best, "last_eval": result.last_eval, "test": test_metrics,
        "trainable_parameters": trainable_params, "backbone_parameters": backbone_params,
        "trainable_percent": 100.0 * trainable_params / backbone_params,
        "seconds_per_step": max(result.train_seconds - timing["eval_seconds"], 0.0) / steps,
        "peak_memory_bytes": peak, "memory_before_training_bytes": memory_before,
        "device": str(device), "train_examples": len(train_rows),
    }
    meta = {
        "plan": [list(p) for p in plan] if plan else [], "position": None if cfg.full else cfg.position,
        "labels": list(labels.labels), "verbalizer": labels.to_dict(), "scoring": scoring,
        "head": {"pooling": cfg.pooling, "classes": len(labels)} if head is not None else None,
        "base_model_hash": base_hash, "base_model_arch": config.arch, "d_model": config.d_model,
        "deep": bool(cfg.deep) and not cfg.full, "reparam_folded": cfg.reparam if not cfg.full else None,
        "init": None if cfg.full else cfg.init, "full_fine_tuning": cfg.full, "max_length": cfg.max_length,
        "metrics": {k: v for k, v in metrics.items() if k not in ("best", "last_eval")} | {"dev_best": result.best},
    }
    with torch.no_grad():
        prompt_tensor = prompt.folded().cpu() if prompt is not None else torch.zeros(0, config.d_model)
        deep_tensor = prompt.deep.detach().float().cpu() if prompt is not None and prompt.deep is not None else None
        head_state = {k: v.detach().float().cpu() for k, v in head.state_dict().items()} if head is not None else {}
    classifier.remove_hooks()
    adapter = Adapter(prompt=prompt_tensor, meta=meta, head=head_state, deep=deep_tensor)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    with atomic_directory(cfg.out, overwrite=cfg.force) as tmp:
        if cfg.full:
            model.cpu()
            provenance = save_checkpoint(tmp / FULL_MODEL_DIR, config, model.state_dict(), tokenizer_dir=tokenizer_dir,
                                         stage="prompt-tune --full", parents=[cfg.model], options=options, metrics=metrics)
            adapter.meta["base_model_hash"] = provenance["content_hash"]
        adapter.peft = peft_config(adapter, config, peft_base_model(cfg.model), cfg.init if not cfg.full else "random")
        write_adapter(tmp, adapter)
        metrics_file = cfg.run_dir / "metrics.jsonl"
        if metrics_file.is_file():
            shutil.copyfile(metrics_file, tmp / "metrics.jsonl")
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    ckpt.close()
    return {"out": str(cfg.out), **metrics}


def render(result: dict[str, Any]) -> None:
    best = result.get("best") or {}
    lines = [f"wrote {result['out']}",
             f"trainable {result['trainable_parameters']:,} of {result['backbone_parameters']:,} backbone parameters "
             f"({result['trainable_percent']:.4f}%), {result['steps']} steps, {result['seconds_per_step']:.3f} s/step"]
    if best:
        m = best["metrics"]
        lines.append(f"best dev accuracy {m['accuracy']:.4f} (macro-F1 {m['macro_f1']:.4f}) at step {best['step']}")
    if result.get("test"):
        t = result["test"]
        lines.append(f"test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f} on {t['examples']} examples")
    for line in lines:
        print(line)


# -- inference with a trained adapter (`cpmctl infer MODEL --prompt OUT`) ---------------------------
