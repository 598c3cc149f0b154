"""Calibration of a MoEfied model: its experts' down projections fine-tuned with the routers active."""

from __future__ import annotations

import tempfile
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

    micro = min(batch_size, MICRO_ROWS)
    trainer = Trainer(TrainConfig(out=work, max_steps=steps, lr=lr, schedule="linear",
                                  warmup_steps=max(1, steps // 10), seed=seed, cpu=True, progress=False,
                                  log_every=max(1, steps // 5), grad_accum=-(-batch_size // micro)))
    result = trainer.fit(model, loss_fn, RowBatches(rows, config, micro, seed), trainable=_calibrated)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    refresh_fills(model)  # the stored outputs of skipped experts, from the calibrated w_out
    return {"steps": result.step, "last_loss": round(result.last_train.get("loss", float("nan")), 5)}


@torch.no_grad()
def refresh_fills(model) -> None:
    """Recompute every filled MoE layer's stored skipped-expert outputs (fill_out) from its
    current w_out, so that what is saved and served matches the weights."""
    for module in model.modules():
        if getattr(module, "act_fill", None) is not None and hasattr(module, "set_fill") and not module.quantized:
            module.set_fill(module.act_fill.clone())


def _calibrated(name: str) -> bool:
    """A parameter `calibrate` trains: a MoE layer's w_out or b_out."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "ffn" and parts[-1] in ("w_out", "b_out")


class PerRatioCalibration:
    """Calibration redone for each k of a ratio sweep, as a separate run at that k would do it.

    Calibration tunes the down projections for the routers' choice at one k, so experts
    calibrated at the written k are not what a run at another k would have made. Built before
    the first calibration (it keeps a copy of the routed, uncalibrated w_out / b_out), `done()`
    after it (a copy of the written k's result); `prepare(written)` puts the right weights in place
    for the layers' current k: the written ones, or the uncalibrated ones calibrated again at that k
    with the same data, steps, learning rate and seed. `restore()` puts the written k's weights
    back. Every load recomputes the layers' stored skipped-expert outputs."""

    def __init__(self, model, teacher, rows: list[list[int]], *, steps: int, lr: float, batch_size: int, seed: int) -> None:
        self.model, self.teacher, self.rows = model, teacher, rows
        self.options = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed)
        self.before = self._copy()
        self.written: dict[str, torch.Tensor] | None = None

    def _copy(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters() if _calibrated(name)}

    @torch.no_grad()
    def _load(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)
        refresh_fills(self.model)

    def done(self) -> None:
        self.written = self._copy()

    def prepare(self, written: bool) -> dict[str, Any] | None:
        """Weights for the layers' current k: the written ones (`written`), else calibrated anew
        from the uncalibrated copy; returns that calibration's summary (None when written)."""
        if written:
            self._load(self.written)
            return None
        self._load(self.before)
        with tempfile.TemporaryDirectory(prefix="moefy-calibrate-") as work:
            return calibrate(self.model, self.teacher, self.rows, Path(work) / "run", **self.options)

    def restore(self) -> None:
        self._load(self.written)
