"""`cpmctl moefy`: turn dense FFNs into experts with routers that run only the chosen ones.

    cpmctl moefy ./minilm ./minilm-moe --experts 48 --ratio 0.25 --router mlp --data corpus.txt
    cpmctl moefy ./minilm-moe ./minilm-dense --restore

Steps: sample documents from --data (a bounded reservoir; a held-out part is kept for the
report), run the dense model once while FFN inputs stream into a fixed-size reservoir per layer,
split each FFN's neurons into equal experts (cluster / coactivation / random), permute them into
contiguous blocks, build the router (center / mlp trained on the reservoir / oracle) and write the
MoE checkpoint with the permutation, so `--restore` gives the exact dense checkpoint back. The
report (rich table, report.json in OUT, and the checkpoint's metrics) gives per-layer router
recall and executed FFN compute fraction, and dense-vs-MoE quality on the held-out documents.

    cpmctl moefy ./lm ./lm-moe --expert-size 32 --data corpus.txt --task dev.jsonl --verbalizer words.json
    cpmctl moefy ./distilled ./distilled-moe --experts 48 --data corpus.txt --task dev.jsonl

`--task FILE.jsonl` (cpmctl.tasks format: text, optional text_pair, label) adds dense vs MoE
accuracy and macro-F1 at the chosen ratio. Classes are scored as the checkpoint was trained to:
with its linear task head when it is a task model (`cpmctl distill` OUT or OUT/checkpoint, whose
task.json and head.safetensors the MoE checkpoint carries along; or `cpmctl prompt-tune --full`
OUT), otherwise by each label word's log-probability under the LM head (--verbalizer, as in
prompt-tune). An encoder with neither head is refused (exit 2): mean-pooled embeddings are not
class scores.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from cpmctl import moefication as mf
from cpmctl import task_model
from cpmctl.checkpoint import load_model, read_config, read_provenance, save_checkpoint_with
from cpmctl.corpus import sample_documents
from cpmctl.data import TokenShards
from cpmctl.command_configs import MoefyConfig  # the options, declared once
from cpmctl.errors import UserError
from cpmctl.ffn import ThresholdFeedForward
from cpmctl.moe import MoEFeedForward, dense_from_moe, moe_from_dense, resolve_kernels, set_kernels
from cpmctl.prompt import PRESERVES_FUNCTION_OF
from cpmctl.plan import (checkpoint_config, dtype_bytes, make_plan, meta_model, parameter_count, source_note,
                         stored_dtype)
from cpmctl.tokenizer import load_tokenizer

log = logging.getLogger("cpmctl")

REPORT_FILE = "report.json"


# -- data ----------------------------------------------------------------------------------------------
def load_documents(cfg: MoefyConfig, config, checkpoint: Path) -> tuple[list[list[int]], list[list[int]], Any]:
    """(train rows, held-out rows, tokenizer) of token ids; text corpora need the checkpoint's tokenizer."""
    tok = load_tokenizer(checkpoint / "tokenizer") if (checkpoint / "tokenizer").is_dir() else None
    if cfg.data is None:
        return [], [], tok
    if not cfg.data.exists():
        raise UserError(f"--data {cfg.data} does not exist")
    held = 0 if cfg.eval_data is not None else cfg.eval_docs
    if cfg.data.is_dir():
        shards = TokenShards(cfg.data)
        order = np.random.default_rng(cfg.seed).permutation(len(shards))[: cfg.max_docs + held]
        rows = [shards.document(int(i)).astype(np.int64).tolist()[: cfg.seq_len] for i in order]
        rows = [r for r in rows if len(r) >= 2]
    else:
        if tok is None:
            raise UserError(f"checkpoint {checkpoint} has no tokenizer/ to read the text in --data; give prepared shards")
        rows = mf.encode_documents(sample_documents(cfg.data, cfg.max_docs + held, cfg.field, cfg.seed), tok, config, cfg.seq_len)
    train, held_out = rows[held:], rows[:held]
    if cfg.eval_data is not None:
        if tok is None:
            raise UserError(f"checkpoint {checkpoint} has no tokenizer/ to read --eval-data")
        held_out = mf.encode_documents(sample_documents(cfg.eval_data, cfg.eval_docs, cfg.field, cfg.seed), tok, config, cfg.seq_len)
    tokens = sum(len(r) for r in train)
    if tokens < cfg.min_tokens or not held_out:
        raise UserError(
            f"--data {cfg.data} is too small: {len(train)} documents, {tokens} tokens for training the router "
            f"(need at least {cfg.min_tokens}) and {len(held_out)} held out for the report; give more text"
        )
    return train, held_out, tok


# -- task accuracy (--task) ----------------------------------------------------------------------------
def resolve_checkpoint(given: Path) -> Path:
    """The checkpoint directory inside what the user named: itself, a distill run directory
    (OUT/checkpoint) or a `prompt-tune --full` output (OUT/model)."""
    return task_model.resolve_task_model(given) if given.is_dir() else given


# -- the stage -----------------------------------------------------------------------------------------
@dataclass
class MoeLayout:
    experts: int
    expert_size: int
    top_k: int
    ratio: float
    layers: list[str]


def moe_layout(cfg: MoefyConfig, config, checkpoint: Path) -> MoeLayout:
    """Experts, their size, k and the layers to split, checked against the dense config; and
    OUT must be free (or --force)."""
    if config.moe is not None:
        raise UserError(f"{checkpoint} is already a MoE model; MoEfy its dense parent, or restore it with --restore")
    if config.threshold_sparsity is not None:
        raise UserError(f"{checkpoint} has thresholded FFNs; restore its dense FFNs with --restore first")
    experts, size = mf.expert_layout(config.d_ff, cfg.experts, cfg.expert_size, cfg.allow_uneven)
    ratio = cfg.ratio if (cfg.ratio is not None or cfg.top_k is not None) else 0.2
    top_k = mf.top_k_for(experts, top_k=cfg.top_k, ratio=ratio)
    if top_k > experts:
        raise UserError(f"--top-k {top_k} is more than the {experts} experts")
    layers = mf.choose_layers(config, cfg.layers)
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")
    return MoeLayout(experts, size, top_k, ratio, layers)


def moe_output_config(cfg: MoefyConfig, config, layout: MoeLayout, *, fill_skipped: bool):
    """The MoE config the run writes. `fill_skipped`: activation statistics were collected
    (there is --data), so skipped experts contribute their typical output."""
    return config.replace(moe=dict(
        experts=layout.experts, expert_size=layout.expert_size, top_k=layout.top_k, router=cfg.router,
        layers=None if layout.layers == mf.ffn_names(config) else layout.layers, permuted=True, ratio=layout.ratio,
        fill_skipped=fill_skipped,
    ))


def _check_restore(cfg: MoefyConfig, checkpoint: Path, config) -> None:
    if config.moe is None and config.threshold_sparsity is None:
        raise UserError(f"{checkpoint} is neither a MoE model nor thresholded; nothing to restore")
    if config.moe is not None and not config.moe.permuted:
        raise UserError(f"{checkpoint} stores no neuron permutation (not made by moefy); it cannot be restored to a dense model")
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")


def plan(cfg: MoefyConfig, *, stand_ins=None):
    """What `run(cfg)` would write and hold in memory, from the checkpoint's config alone."""
    cfg.validate()
    checkpoint = task_model.planned_model_dir(Path(cfg.checkpoint), stand_ins)
    config = checkpoint_config(checkpoint, stand_ins)
    notes: list[str | None] = [source_note(checkpoint, "checkpoint", stand_ins)]
    dense_params = parameter_count(meta_model(config))
    if cfg.restore:
        _check_restore(cfg, checkpoint, config)
        out_config = config.replace(moe=None, threshold_sparsity=None)
        itemsize = dtype_bytes(stored_dtype(checkpoint))
        out_params = parameter_count(meta_model(out_config))
        return make_plan("moefy", output=Path(cfg.out), output_config=out_config, parameters=dense_params, trainable=0,
                         parameter_bytes=dense_params * itemsize, devices=1,
                         breakdown={"weights": dense_params * itemsize, "output weights": out_params * itemsize},
                         steps=None, tokens=None, notes=notes, details={"restore": "MoE -> dense, neurons un-permuted"})
    if cfg.method == "threshold":
        return plan_threshold(cfg, checkpoint, config, dense_params, notes)
    layout = moe_layout(cfg, config, checkpoint)
    if cfg.data is not None and not Path(cfg.data).exists():
        notes.append(f"--data {cfg.data}: not there yet")
    out_config = moe_output_config(cfg, config, layout, fill_skipped=cfg.data is not None)
    moe_model = meta_model(out_config)
    router_params = sum(p.numel() for name, p in moe_model.named_parameters() if ".router." in name)
    # The run works in fp32: the dense model (its FFNs become the experts in place) and the routers.
    breakdown = {"weights": 4 * dense_params, "routers": 4 * max(parameter_count(moe_model) - dense_params, 0)}
    if cfg.data is not None:
        breakdown["router-training sample"] = cfg.max_tokens * config.d_model * 4 * len(layout.layers)
    if cfg.calibrate:
        breakdown["teacher"] = 4 * dense_params
        notes.append(f"--calibrate {cfg.calibrate}: a dense fp32 teacher copy beside the MoE model")
        if cfg.ratios:
            # the sweep recalibrates other ratios from a copy of the uncalibrated down projections
            # and restores the written ratio's from another
            breakdown["calibration copies"] = 2 * 4 * config.d_ff * config.d_model * len(layout.layers)
            notes.append(f"--calibrate with --ratios: one calibration of {cfg.calibrate} steps per ratio other than --ratio's")
    trainable = router_params if cfg.router == "mlp" else 0
    tokens = None
    if cfg.data is not None:
        tokens = min(cfg.max_docs * cfg.seq_len, cfg.max_tokens)
        notes.append("tokens: FFN inputs kept per layer (at most max_docs x seq_len, capped by --max-tokens)")
    return make_plan(
        "moefy", output=Path(cfg.out), output_config=out_config, parameters=dense_params, trainable=trainable,
        parameter_bytes=4 * dense_params, devices=1, breakdown=breakdown,
        steps=cfg.epochs if cfg.router == "mlp" and cfg.data is not None else None, tokens=tokens, notes=notes,
        details={"experts": f"{layout.experts} x {layout.expert_size} neurons, top-{layout.top_k} (ratio {layout.ratio})",
                 "layers": f"all {len(layout.layers)} FFNs" if layout.layers == mf.ffn_names(config) else ", ".join(layout.layers),
                 "split": cfg.split, "router": cfg.router,
                 "steps": "router training epochs" if cfg.router == "mlp" and cfg.data is not None else "-"},
    )


def run(cfg: MoefyConfig) -> dict[str, Any]:
    cfg.validate()
    if cfg.restore:
        return restore(cfg)
    if cfg.method == "threshold":
        return run_threshold(cfg)
    started = time.perf_counter()
    given = Path(cfg.checkpoint)
    checkpoint = resolve_checkpoint(given)
    config = read_config(checkpoint)
    layout = moe_layout(cfg, config, checkpoint)
    experts, size, top_k, ratio, layers = layout.experts, layout.expert_size, layout.top_k, layout.ratio, layout.layers
    train_rows, eval_rows, tok = load_documents(cfg, config, checkpoint)

    torch.manual_seed(cfg.seed)
    model, ckpt = load_model(checkpoint, dtype=torch.float32)
    stored_dtype = _dominant(ckpt.dtype_summary())
    kernels = resolve_kernels(cfg.kernels, next(model.parameters()).device, model.config.activation)  # refused now, not after the work
    task = (mf.load_task_set(cfg.task, model, given, checkpoint, tok, verbalizer=cfg.verbalizer,
                            max_examples=cfg.max_task_examples, seed=cfg.seed) if cfg.task is not None else None)
    # load: documents, model and task until here; the phases below plus load make up total_s
    timings: dict[str, float] = {"load_s": round(time.perf_counter() - started, 2)}
    t0 = time.perf_counter()
    inputs = mf.collect_inputs(model, train_rows, layers, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                               seed=cfg.seed) if train_rows else {}
    timings["statistics_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    dense_eval = mf.evaluate(model, eval_rows, cfg.batch_size) if eval_rows else None
    dense_task = mf.evaluate_task(model, task, cfg.batch_size) if task is not None else None
    timings["dense_eval_s"] = round(time.perf_counter() - t0, 2)

    moe_config = moe_output_config(cfg, config, layout, fill_skipped=bool(inputs))
    per_layer: dict[str, dict[str, Any]] = {}
    moes, targets = {}, {}
    t0 = time.perf_counter()
    for stack, index, ffn in model.ffn_modules():
        name = f"{stack}.{index}"
        if name not in layers:
            continue
        tl = time.perf_counter()
        layer_inputs = inputs.get(name)
        sample = mf.neuron_sample(ffn, layer_inputs) if layer_inputs is not None else None
        perm = mf.split_layer(ffn, sample, experts, size, cfg.split, cfg.seed)
        moe = moes[name] = moe_from_dense(ffn, moe_config, perm)
        if moe_config.moe.fill_skipped:
            moe.set_fill(mf.typical_activations(sample, moe))
        del sample
        layer_targets = mf.init_router(moe, cfg.router, layer_inputs)
        if layer_targets is not None:
            targets[name] = layer_targets
        per_layer[name] = {}
        model.replace_ffn(stack, index, moe)
        log.info("moefy %s: %d experts of %d neurons, top-%d, split in %.1f s", name, experts, size, top_k, time.perf_counter() - tl)
    timings["split_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    for name, stats in mf.train_routers(moes, inputs, targets, epochs=cfg.epochs, seed=cfg.seed,
                                         max_steps=cfg.router_steps).items():
        per_layer[name].update(stats)
    timings["routers_s"] = round(time.perf_counter() - t0, 2)
    model.config = moe_config
    # The routers are trained: their sample of FFN inputs (max_tokens x d_model per layer) and
    # targets are not needed any more, and calibration should not hold them.
    inputs.clear()
    targets.clear()
    calibration = teacher_ckpt = per_ratio = None
    try:
        if cfg.calibrate:
            t0 = time.perf_counter()
            teacher, teacher_ckpt = load_model(checkpoint, dtype=torch.float32)
            if cfg.ratios:  # the sweep calibrates each other k from these routed, uncalibrated experts
                per_ratio = mf.PerRatioCalibration(model, teacher, train_rows, steps=cfg.calibrate, lr=cfg.calibrate_lr,
                                                   batch_size=cfg.batch_size, seed=cfg.seed)
            with tempfile.TemporaryDirectory(prefix="moefy-calibrate-") as work:
                calibration = mf.calibrate(model, teacher, train_rows, Path(work) / "run", steps=cfg.calibrate, lr=cfg.calibrate_lr,
                                           batch_size=cfg.batch_size, seed=cfg.seed)
            if per_ratio is not None:
                per_ratio.done()
            else:
                teacher_ckpt.close()
                teacher_ckpt = teacher = None
            timings["calibrate_s"] = round(time.perf_counter() - t0, 2)
        report = _evaluate_moe(cfg, model, config, layers, per_layer, eval_rows, dense_eval, task, dense_task, per_ratio, kernels,
                               timings, calibration, experts=experts, size=size, top_k=top_k, ratio=ratio, train_rows=train_rows)
    finally:
        if teacher_ckpt is not None:
            teacher_ckpt.close()

    return _finish(model, cfg, checkpoint, ckpt, report, timings, started=started, stored_dtype=stored_dtype)


def _evaluate_moe(cfg: MoefyConfig, model, config, layers, per_layer, eval_rows, dense_eval, task, dense_task, per_ratio, kernels,
                  timings, calibration, *, experts, size, top_k, ratio, train_rows) -> dict[str, Any]:
    """The report: held-out quality and recall per layer, task accuracy, and the --ratios sweep."""
    report: dict[str, Any] = {
        "experts": experts, "expert_size": size, "top_k": top_k, "ratio": ratio, "split": cfg.split, "router": cfg.router,
        "train_documents": len(train_rows), "eval_documents": len(eval_rows), "layers": per_layer,
        "calibrated": calibration is not None,
    }
    if calibration is not None:
        report["calibration"] = calibration
    set_kernels(model, kernels)
    t0 = time.perf_counter()
    if eval_rows:
        moes = {f"{s}.{i}": f for s, i, f in model.ffn_modules() if f"{s}.{i}" in layers}
        meter = mf.RecallMeter(moes, config.d_ff)
        try:
            moe_eval = mf.evaluate(model, eval_rows, cfg.batch_size, meter)
        finally:
            meter.close()
        for name, values in meter.results().items():
            per_layer[name].update(values)
        report["quality"] = mf.quality(dense_eval, moe_eval)
    else:
        for name in per_layer:
            per_layer[name].update(experts=experts, top_k=top_k, compute_fraction=round(top_k * size / config.d_ff, 4))
    if task is not None:
        report["task"] = mf.task_quality(task, dense_task, mf.evaluate_task(model, task, cfg.batch_size))
    timings["moe_eval_s"] = round(time.perf_counter() - t0, 2)
    if cfg.ratios:
        t0 = time.perf_counter()
        moes = {f"{s}.{i}": f for s, i, f in model.ffn_modules() if f"{s}.{i}" in layers}
        report["ratios"] = mf.quality_at_ratios(model, moes, cfg.ratios, config.d_ff, rows=eval_rows, dense_eval=dense_eval,
                                                task=task, dense_task=dense_task, batch_size=cfg.batch_size, calibration=per_ratio)
        timings["ratios_s"] = round(time.perf_counter() - t0, 2)
    return report


# -- --method threshold -----------------------------------------------------------------------------
def _check_threshold_input(cfg: MoefyConfig, config, checkpoint: Path) -> None:
    if config.moe is not None:
        raise UserError(f"{checkpoint} is a MoE model; threshold its dense parent (restore it with --restore)")
    if config.threshold_sparsity is not None:
        raise UserError(f"{checkpoint} is already thresholded (sparsity {config.threshold_sparsity}); threshold its dense parent")
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")


def plan_threshold(cfg: MoefyConfig, checkpoint: Path, config, dense_params: int, notes: list):
    _check_threshold_input(cfg, config, checkpoint)
    layers = mf.choose_layers(config, cfg.layers)
    if not Path(cfg.data).exists():
        notes.append(f"--data {cfg.data}: not there yet")
    breakdown = {"weights": 4 * dense_params, "activation sample": cfg.max_tokens * config.d_model * 4 * len(layers)}
    return make_plan("moefy", output=Path(cfg.out), output_config=config.replace(threshold_sparsity=cfg.sparsity),
                     parameters=dense_params, trainable=0, parameter_bytes=4 * dense_params, devices=1, breakdown=breakdown,
                     steps=None, tokens=min(cfg.max_docs * cfg.seq_len, cfg.max_tokens), notes=notes,
                     details={"method": f"threshold, sparsity {cfg.sparsity} per FFN input and hidden activation",
                              "layers": ", ".join(layers)})


def run_threshold(cfg: MoefyConfig) -> dict[str, Any]:
    """TEAL-style thresholds for every chosen FFN, calibrated on --data; the other FFNs get
    thresholds of 0 (they skip exact zeros only, i.e. stay the dense FFN)."""
    started = time.perf_counter()
    given = Path(cfg.checkpoint)
    checkpoint = resolve_checkpoint(given)
    config = read_config(checkpoint)
    _check_threshold_input(cfg, config, checkpoint)
    layers = mf.choose_layers(config, cfg.layers)
    train_rows, eval_rows, tok = load_documents(cfg, config, checkpoint)
    torch.manual_seed(cfg.seed)
    model, ckpt = load_model(checkpoint, dtype=torch.float32)
    stored_dtype = _dominant(ckpt.dtype_summary())
    kernels = resolve_kernels(cfg.kernels, next(model.parameters()).device)
    task = (mf.load_task_set(cfg.task, model, given, checkpoint, tok, verbalizer=cfg.verbalizer,
                            max_examples=cfg.max_task_examples, seed=cfg.seed) if cfg.task is not None else None)
    # load: documents, model and task until here; the phases below plus load make up total_s
    timings: dict[str, float] = {"load_s": round(time.perf_counter() - started, 2)}
    t0 = time.perf_counter()
    inputs = mf.collect_inputs(model, train_rows, layers, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    timings["statistics_s"] = round(time.perf_counter() - t0, 2)
    dense_eval = mf.evaluate(model, eval_rows, cfg.batch_size)
    dense_task = mf.evaluate_task(model, task, cfg.batch_size) if task is not None else None
    out_config = config.replace(threshold_sparsity=cfg.sparsity)
    t0 = time.perf_counter()
    for stack, index, ffn in model.ffn_modules():
        name = f"{stack}.{index}"
        sample = inputs.pop(name, None)
        sparsity = cfg.sparsity if sample is not None else None
        sparse = mf.threshold_ffn_from_dense(ffn, out_config, sample if sample is not None else ffn.w_in.weight[:0].detach(), sparsity)
        sparse.kernels = kernels
        model.replace_ffn(stack, index, sparse)
    timings["thresholds_s"] = round(time.perf_counter() - t0, 2)
    model.config = out_config
    meter = mf.SkipMeter({f"{s}.{i}": f for s, i, f in model.ffn_modules() if f"{s}.{i}" in layers})
    try:
        sparse_eval = mf.evaluate(model, eval_rows, cfg.batch_size, meter)
    finally:
        meter.close()
    report: dict[str, Any] = {
        "method": "threshold", "sparsity": cfg.sparsity, "layers": meter.results(),
        "train_documents": len(train_rows), "eval_documents": len(eval_rows),
        "quality": {k.replace("moe_", "sparse_"): v for k, v in mf.quality(dense_eval, sparse_eval).items()},
    }
    if task is not None:
        report["task"] = {k.replace("moe_", "sparse_"): v for k, v in
                          mf.task_quality(task, dense_task, mf.evaluate_task(model, task, cfg.batch_size)).items()}
    return _finish(model, cfg, checkpoint, ckpt, report, timings, started=started, stored_dtype=stored_dtype)


def _finish(model, cfg: MoefyConfig, checkpoint: Path, ckpt, report: dict[str, Any], timings: dict[str, float], *,
            started: float, stored_dtype) -> dict[str, Any]:
    """Both methods' last step: the timings into the report, the model back in its stored dtype,
    written with the report, the input checkpoint closed."""
    timings["total_s"] = round(time.perf_counter() - started, 2)
    report["timings"] = timings
    if stored_dtype is not None and stored_dtype != torch.float32:
        model.to(stored_dtype)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("out", "force")}
    write_output(model, cfg, checkpoint, stage="moefy", options=options, metrics=report, report=report)
    ckpt.close()
    return report


def _dominant(summary: dict[str, int]):
    if not summary:
        return None
    name = max(summary, key=summary.get)
    return getattr(torch, name, None)


def write_output(model, cfg: MoefyConfig, checkpoint: Path, *, stage: str, options: dict[str, Any],
                 metrics: dict[str, Any] | None, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """OUT in one atomic step: the checkpoint, report.json, and the task head a task model
    carries (distill's task.json + head.safetensors, copied as they are: the head reads the
    final hidden states, which MoEfication approximates and restore gives back exactly)."""
    full_run = task_model.full_run_task(Path(cfg.checkpoint)) if not (checkpoint / task_model.TASK_FILE).is_file() else None

    def write_extra(tmp: Path) -> None:
        for name in (task_model.TASK_FILE, task_model.HEAD_FILE):
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, tmp / name)
        if full_run is not None:  # a `prompt-tune --full` run: its head lives in the adapter beside the model
            head_state, labels, words, pooling = full_run
            task_model.write_task_files(tmp, head_state, labels=labels, words=words, pooling=pooling,
                                        metrics={"source": str(cfg.checkpoint)})
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    if metrics is not None:
        # Prompts and heads trained on the dense model apply to this copy (prompt.check_base_model).
        parent_hash = read_provenance(checkpoint).get("content_hash")
        metrics = {**metrics, PRESERVES_FUNCTION_OF: parent_hash} if parent_hash else metrics
    tokenizer_dir = checkpoint / "tokenizer"
    return save_checkpoint_with(cfg.out, write_extra, model.config, model.state_dict(), overwrite=cfg.overwrite,
                                tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None, stage=stage,
                                parents=[checkpoint], options=options, metrics=metrics)


def restore(cfg: MoefyConfig) -> dict[str, Any]:
    """The dense checkpoint back from a MoEfied one: neurons un-permuted, routers dropped."""
    checkpoint = resolve_checkpoint(Path(cfg.checkpoint))
    config = read_config(checkpoint)
    _check_restore(cfg, checkpoint, config)
    model, ckpt = load_model(checkpoint)
    restored = 0
    for stack, index, ffn in model.ffn_modules():
        if isinstance(ffn, MoEFeedForward):
            model.replace_ffn(stack, index, dense_from_moe(ffn, config))
            restored += 1
        elif isinstance(ffn, ThresholdFeedForward):
            model.replace_ffn(stack, index, mf.dense_from_threshold(ffn, config))
            restored += 1
    model.config = config.replace(moe=None, threshold_sparsity=None)
    provenance = write_output(model, cfg, checkpoint, stage="moefy-restore", options={"restore": True}, metrics=None)
    ckpt.close()
    return {"restored_layers": restored, "content_hash": provenance["content_hash"]}


def render(report: dict[str, Any]) -> None:
    console = Console()
    if "restored_layers" in report:
        console.print(f"restored {report['restored_layers']} FFN layer(s); content hash {report['content_hash']}")
        return
    if report.get("method") == "threshold":
        render_threshold(report, console)
        return
    table = Table(title=f"moefy: {report['experts']} experts x {report['expert_size']} neurons, top-{report['top_k']}, "
                        f"split {report['split']}, router {report['router']}")
    for column in ("layer", "recall", "compute fraction", "router loss (first -> last)"):
        table.add_column(column)
    for name, values in report["layers"].items():
        loss = f"{values['router_loss_first']} -> {values['router_loss_last']}" if "router_loss_first" in values else "-"
        table.add_row(name, str(values.get("recall", "-")), str(values.get("compute_fraction", "-")), loss)
    console.print(table)
    q = report.get("quality")
    if q:
        if q["metric"] == "embedding cosine":
            console.print(f"held-out embeddings, dense vs MoE: mean cosine {q['mean_cosine']}, min {q['min_cosine']}")
        else:
            console.print(f"held-out perplexity: dense {q['dense_perplexity']}, MoE {q['moe_perplexity']} ({100 * q['perplexity_increase']:+.2f}%)")
    t = report.get("task")
    if t:
        console.print(f"task {t['file']} ({t['examples']} examples, {t['classes']} classes, {t['scoring']} scoring): accuracy "
                      f"dense {t['dense_accuracy']:.4f}, MoE {t['moe_accuracy']:.4f}; macro-F1 dense {t['dense_macro_f1']:.4f}, "
                      f"MoE {t['moe_macro_f1']:.4f}; same prediction on {t['agreement']:.1%}", soft_wrap=True)
    if report.get("ratios"):
        render_ratios(report, console)
    console.print(f"[dim]{report['timings']}[/dim]")


def render_ratios(report: dict[str, Any], console: Console) -> None:
    """One row per ratio of --ratios: k, compute, held-out quality, task accuracy dense vs MoE."""
    table = Table(title="dense vs MoE at each ratio (same experts and routers)")
    for column in ("ratio", "top-k", "compute fraction", "held-out", "task accuracy dense", "task accuracy MoE", "change (points)",
                   "same prediction"):
        table.add_column(column)
    for entry in report["ratios"]:
        q, t = entry.get("quality"), entry.get("task")
        held = "-" if q is None else (f"cosine {q['mean_cosine']}" if q["metric"] == "embedding cosine"
                                      else f"ppl {q['moe_perplexity']} ({100 * q['perplexity_increase']:+.2f}%)")
        cells = ("-",) * 4 if t is None else (f"{t['dense_accuracy']:.4f}", f"{t['moe_accuracy']:.4f}",
                                              f"{100 * (t['moe_accuracy'] - t['dense_accuracy']):+.2f}", f"{t['agreement']:.1%}")
        table.add_row(str(entry["ratio"]), str(entry["top_k"]), str(entry["compute_fraction"]), held, *cells)
    console.print(table)


def render_threshold(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"moefy --method threshold: target sparsity {report['sparsity']} per FFN (held-out measurement)")
    for column in ("layer", "input skipped", "hidden skipped", "threshold in", "threshold hidden"):
        table.add_column(column)
    for name, v in report["layers"].items():
        table.add_row(name, str(v["input_skipped"]), str(v["hidden_skipped"]), str(v["threshold_in"]), str(v["threshold_hidden"]))
    console.print(table)
    q = report["quality"]
    if q["metric"] == "embedding cosine":
        console.print(f"held-out embeddings, dense vs thresholded: mean cosine {q['mean_cosine']}, min {q['min_cosine']}")
    else:
        console.print(f"held-out perplexity: dense {q['dense_perplexity']}, thresholded {q['sparse_perplexity']} "
                      f"({100 * q['perplexity_increase']:+.2f}%)")
    t = report.get("task")
    if t:
        console.print(f"task {t['file']} ({t['examples']} examples): accuracy dense {t['dense_accuracy']:.4f}, "
                      f"thresholded {t['sparse_accuracy']:.4f}; same prediction on {t['agreement']:.1%}", soft_wrap=True)
    console.print(f"[dim]{report['timings']}[/dim]")
