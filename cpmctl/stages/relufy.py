"""`cpmctl relufy`: swap a GELU/SiLU model's FFN activation for ReLU and recover its quality.

    cpmctl relufy ./lm ./lm-relu --data corpus.txt --steps 300 --kd 0.5 --l1 1e-3
    cpmctl relufy ./minilm ./minilm-relu --data corpus.txt --steps 300
    cpmctl moefy ./lm-relu ./lm-relu-moe --experts 32 --ratio 0.25 --split coactivation --data corpus.txt

Steps: sample documents from --data (a held-out part is kept for the report unless --eval-data
names other text), measure the original's per-layer activation sparsity and held-out quality,
swap the activation (`relu` on the gate of a gated FFN, or `drelu` on both branches), measure
again, train for --steps (the model's LM loss mixed with KD from the original by --kd; encoders
match the original's sentence embeddings; --l1 adds the progressive activation-sparsity penalty),
measure a last time and write OUT with report.json. The report gives per-layer sparsity before,
after the swap and after recovery, held-out perplexity (LMs) or embedding cosine to the original
(encoders) at each point, and the recovery's compute, also as a fraction of the original's
pre-training where its provenance records it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from cpmctl import moefication as mf
from cpmctl import relufication as rf
from cpmctl import task_model
from cpmctl.checkpoint import load_model, read_config, read_provenance, save_checkpoint_with
from cpmctl.command_configs import RelufyConfig  # the options, declared once
from cpmctl.corpus import sample_documents
from cpmctl.errors import UserError
from cpmctl.plan import checkpoint_config, make_plan, meta_model, parameter_count, source_note
from cpmctl.tokenizer import load_tokenizer

REPORT_FILE = "report.json"


def _check_output(cfg: RelufyConfig) -> None:
    if os.path.exists(cfg.out) and not cfg.force:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")


def load_rows(cfg: RelufyConfig, config, checkpoint: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(training rows, held-out rows) of token ids from the text in --data (and --eval-data)."""
    if not Path(cfg.data).is_file():
        raise UserError(f"--data {cfg.data} is not a text or JSONL file")
    if not (checkpoint / "tokenizer").is_dir():
        raise UserError(f"checkpoint {checkpoint} has no tokenizer/ to read the text in --data")
    tok = load_tokenizer(checkpoint / "tokenizer")
    held = 0 if cfg.eval_data is not None else cfg.eval_docs
    rows = mf.encode_documents(sample_documents(cfg.data, cfg.max_docs + held, cfg.field, cfg.seed), tok, config, cfg.seq_len)
    train, held_out = rows[held:], rows[:held]
    if cfg.eval_data is not None:
        if not Path(cfg.eval_data).is_file():
            raise UserError(f"--eval-data {cfg.eval_data} is not a text or JSONL file")
        held_out = mf.encode_documents(sample_documents(cfg.eval_data, cfg.eval_docs, cfg.field, cfg.seed), tok, config, cfg.seq_len)
    tokens = sum(len(r) for r in train)
    if tokens < cfg.min_tokens or not held_out or len(train) < cfg.batch_size:
        raise UserError(f"--data {cfg.data} is too small: {len(train)} documents, {tokens} tokens for recovery training "
                        f"(need at least {cfg.min_tokens} and one batch of {cfg.batch_size}) and {len(held_out)} held out; give more text")
    return train, held_out


def quality_against(original: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Held-out quality of a model against the original's: perplexity (and its increase) or the
    mean / min cosine of the sentence embeddings."""
    if "embeddings" in original:
        cos = F.cosine_similarity(original["embeddings"], got["embeddings"], dim=-1)
        return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}
    return {"perplexity": round(got["perplexity"], 4), "perplexity_increase": round(got["perplexity"] / original["perplexity"] - 1, 5)}


def plan(cfg: RelufyConfig, *, stand_ins=None):
    """What `run(cfg)` would write and hold in memory, from the checkpoint's config alone."""
    cfg.validate()
    checkpoint = task_model.planned_model_dir(Path(cfg.checkpoint), stand_ins)
    config = checkpoint_config(checkpoint, stand_ins)
    out_config = rf.relufied_config(config, cfg.activation, str(checkpoint))
    _check_output(cfg)
    params = parameter_count(meta_model(config))
    notes = [source_note(checkpoint, "checkpoint", stand_ins)]
    if not Path(cfg.data).exists():
        notes.append(f"--data {cfg.data}: not there yet")
    # fp32 model + AdamW's two moments + gradients, and the fp32 original beside it
    breakdown = {"weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params, "original model": 4 * params}
    return make_plan("relufy", output=Path(cfg.out), output_config=out_config, parameters=params, trainable=params,
                     parameter_bytes=4 * params, devices=1, breakdown=breakdown, steps=cfg.steps or None,
                     tokens=cfg.steps * cfg.batch_size * cfg.seq_len or None, notes=notes,
                     details={"activation": f"{config.activation} -> {cfg.activation}", "kd": cfg.kd, "l1": cfg.l1})


def run(cfg: RelufyConfig) -> dict[str, Any]:
    cfg.validate()
    started = time.perf_counter()
    checkpoint = task_model.resolve_task_model(Path(cfg.checkpoint)) if Path(cfg.checkpoint).is_dir() else Path(cfg.checkpoint)
    config = read_config(checkpoint)
    new_config = rf.relufied_config(config, cfg.activation, str(cfg.checkpoint))
    _check_output(cfg)
    train_rows, eval_rows = load_rows(cfg, config, checkpoint)
    torch.manual_seed(cfg.seed)
    original, original_ckpt = load_model(checkpoint, dtype=torch.float32)
    model, ckpt = load_model(checkpoint, dtype=torch.float32)
    try:
        original.requires_grad_(False).eval()
        model.eval()
        batch = cfg.batch_size
        before = {"sparsity": rf.activation_sparsity(original, eval_rows, batch)}
        reference = mf.evaluate(original, eval_rows, batch)
        before["quality"] = quality_against(reference, reference)
        rf.swap_activation(model, new_config)
        swapped = {"sparsity": rf.activation_sparsity(model, eval_rows, batch),
                   "quality": quality_against(reference, mf.evaluate(model, eval_rows, batch))}
        recovery = None
        if cfg.steps:
            with tempfile.TemporaryDirectory(prefix="relufy-") as work:
                recovery = rf.recover(model, original, train_rows, Path(work) / "run", steps=cfg.steps, lr=cfg.lr,
                                      batch_size=batch, seed=cfg.seed, kd=cfg.kd, l1=cfg.l1, l1_ramp=cfg.l1_ramp)
            pretraining = read_provenance(checkpoint).get("metrics", {}).get("flops")
            if pretraining:
                recovery["fraction_of_pretraining"] = round(recovery["flops"] / pretraining, 5)
        after = {"sparsity": rf.activation_sparsity(model, eval_rows, batch),
                 "quality": quality_against(reference, mf.evaluate(model, eval_rows, batch))}
    finally:
        original_ckpt.close()
    report: dict[str, Any] = {
        "activation": f"{config.activation} -> {new_config.activation}", "metric": "embedding cosine" if "embeddings" in reference else "perplexity",
        "original": before, "swapped": swapped, "recovered": after, "recovery": recovery,
        "train_documents": len(train_rows), "eval_documents": len(eval_rows),
        "seconds": round(time.perf_counter() - started, 2),
    }
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("out", "force")}

    def write_report(tmp: Path) -> None:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    tokenizer_dir = checkpoint / "tokenizer"
    stored = ckpt.dtype_summary()
    dominant = getattr(torch, max(stored, key=stored.get), None) if stored else None
    if dominant is not None and dominant != torch.float32:
        model.to(dominant)
    metrics = {"perplexity_increase": after["quality"].get("perplexity_increase"), "mean_cosine": after["quality"].get("mean_cosine"),
               "mean_sparsity": _mean(after["sparsity"])}
    save_checkpoint_with(cfg.out, write_report, new_config, model.state_dict(), overwrite=cfg.force,
                         tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None, stage="relufy",
                         parents=[checkpoint], options=options, metrics={k: v for k, v in metrics.items() if v is not None})
    ckpt.close()
    return report


def _mean(values: dict[str, float]) -> float:
    return round(sum(values.values()) / max(1, len(values)), 4)


def render(report: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"relufy: {report['activation']}, activation sparsity (exact zeros) per FFN")
    for column in ("layer", "original", "swapped", "recovered"):
        table.add_column(column)
    for name in report["recovered"]["sparsity"]:
        table.add_row(name, *(f"{report[k]['sparsity'][name]:.3f}" for k in ("original", "swapped", "recovered")))
    console.print(table)
    for when in ("swapped", "recovered"):
        q = report[when]["quality"]
        if "mean_cosine" in q:
            console.print(f"{when}: held-out embedding cosine to the original {q['mean_cosine']} (min {q['min_cosine']})")
        else:
            console.print(f"{when}: held-out perplexity {q['perplexity']} ({100 * q['perplexity_increase']:+.2f}% vs the original "
                          f"{report['original']['quality']['perplexity']})")
    rec = report.get("recovery")
    if rec:
        fraction = f", {100 * rec['fraction_of_pretraining']:.2f}% of the original's pre-training" if "fraction_of_pretraining" in rec else ""
        console.print(f"recovery: {rec['steps']} steps, {rec['tokens']:,} tokens, {rec['flops']:.3g} FLOPs{fraction}")
