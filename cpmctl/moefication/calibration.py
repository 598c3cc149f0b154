"""Calibration of a MoEfied model: its experts' down projections fine-tuned with the routers active."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cpmctl.losses import lm_loss
from cpmctl.moefication.batches import RowBatches, lm_targets
from cpmctl.training import TrainConfig, Trainer


def mean_pooled(hidden, mask):
    """Mean of the hidden states [B, T, d] over the real tokens of `mask` [B, T]."""
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


# Rows per forward/backward pass of calibration: a step of batch_size rows accumulates gradients
# over micro-batches of at most this many, so the activations kept for the backward pass (every
# layer's, for the lowest layer's w_out) are those of MICRO_ROWS rows, not of the whole batch.
MICRO_ROWS = 8


def calibrate(model, teacher, rows: list[list[int]], work: Path, *, steps: int, lr: float, batch_size: int,
              seed: int) -> dict[str, Any]:
    """Fine-tune the MoE layers' down projections (w_out, b_out, as the paper re-tunes W2) with
    the routers active, through the shared training loop. Encoders match the dense model's
    mean-pooled embeddings (1 - cosine); LMs minimise their own LM loss on the data. The
    training state lives in `work` (a scratch directory)."""
    config = model.config

    def loss_fn(m, batch):
        if config.arch == "encoder":
            with torch.no_grad():
                target = mean_pooled(teacher.encode(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
            got = mean_pooled(m.encode(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
            loss = (1 - F.cosine_similarity(got, target, dim=-1)).mean()
            return loss, {"count": int(batch["input_ids"].shape[0])}
        logits, labels = lm_targets(config, m(**batch), batch)
        return lm_loss(logits, labels), {"count": int((labels != -100).sum())}

    def trainable(name: str) -> bool:
        parts = name.split(".")
        return len(parts) >= 2 and parts[-2] == "ffn" and parts[-1] in ("w_out", "b_out")

    micro = min(batch_size, MICRO_ROWS)
    trainer = Trainer(TrainConfig(out=work, max_steps=steps, lr=lr, schedule="linear",
                                  warmup_steps=max(1, steps // 10), seed=seed, cpu=True, progress=False,
                                  log_every=max(1, steps // 5), grad_accum=-(-batch_size // micro)))
    result = trainer.fit(model, loss_fn, RowBatches(rows, config, micro, seed), trainable=trainable)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"steps": result.step, "last_loss": round(result.last_train.get("loss", float("nan")), 5)}
