"""ReLU-fication: make a GELU/SiLU model's FFN activations exactly sparse, then recover its quality.

Mirzadeh et al. 2024 ("ReLU Strikes Back"): swap the FFN activation for ReLU and continue
training briefly; most activations become exactly zero and quality comes back. For gated FFNs the
ReLU goes on the gate branch (`relu`), or on both branches (`drelu`, Turbo Sparse 2024). ProSparse
(2024) adds an L1 penalty on the activations whose factor rises progressively (`l1_weight`).

- `relufied_config`: the config with the new activation, refusing models that are already ReLU,
  MoE models and thresholded models;
- `swap_activation`: the model instance switched to it (its FFNs and a BERT-style LM-head transform);
- `HiddenTap`: forward pre-hooks on the FFNs' down projections that see the hidden activations
  (for the sparsity measurement and the L1 term);
- `activation_sparsity`: the fraction of exactly-zero FFN activations per layer over real tokens;
- `recover`: the recovery run through the shared Trainer: the model's own LM loss (decoders,
  encoder-decoders), optionally mixed with KD from the original model (the KI loss), or for
  encoders the original's sentence embeddings (1 - cosine), plus the progressive L1 term.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmctl.config import RELU_ACTIVATIONS, ModelConfig
from cpmctl.errors import UserError
from cpmctl.ffn import FeedForward
from cpmctl.losses import ki_loss
from cpmctl.moefication.batches import RowBatches, length_sorted, lm_targets, model_inputs, real_tokens
from cpmctl.moefication.calibration import mean_pooled
from cpmctl.training import Trainer, TrainConfig, forward_flops_per_token

RELU_KINDS = ("relu", "drelu")
# The temperature of the recovery's KD from the original model. The recovery has no temperature
# option; T = 2 is the value BENCHMARKS.md's ReLU-fication figures (issue 24) were measured with.
# It is not `cpmctl pretrain --ki-temperature` (T = 1, chosen for knowledge inheritance from a
# smaller teacher), which was never measured for recovery.
RECOVERY_KD_TEMPERATURE = 2.0


def relufied_config(config: ModelConfig, activation: str, where: str) -> ModelConfig:
    """`config` with its FFN activation replaced by `activation` (relu or drelu)."""
    if config.moe is not None:
        raise UserError(f"{where} is a MoE model; relufy its dense parent (MoEfied models restore to it), then MoEfy again")
    if config.threshold_sparsity is not None:
        raise UserError(f"{where} has thresholded FFNs (activation sparsity by thresholds); relufy its dense parent")
    if config.activation in RELU_ACTIVATIONS:
        raise UserError(f"{where} is already a ReLU model (activation {config.activation}); its activations are already exactly sparse")
    if activation not in RELU_KINDS:
        raise UserError(f"unknown ReLU activation {activation!r}; expected one of {', '.join(RELU_KINDS)}", option="activation")
    if activation == "drelu" and not config.gated:
        raise UserError(f"dReLU puts a ReLU on both branches of a gated FFN, and {where} has plain FFNs; use relu",
                        option="activation")
    return config.replace(activation=activation)


def swap_activation(model: nn.Module, config: ModelConfig) -> None:
    """Switch the instance to `config`'s activation: every FFN, and the LM head's transform (it
    reads the same config field, so the saved model rebuilds with it)."""
    for module in model.modules():
        if isinstance(module, FeedForward) or (hasattr(module, "transform") and hasattr(module, "activation")):
            module.activation = config.activation
    model.config = config


class HiddenTap:
    """Forward pre-hooks on each FFN's down projection: `hidden` holds, per layer, the activations
    of the last forward pass (with their graph when training). `keep` selects real tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [f"{stack}.{i}" for stack, i, _ in model.ffn_modules()]
        self.hidden: dict[str, Tensor] = {}
        self.handles = [ffn.w_out.register_forward_pre_hook(self._hook(f"{stack}.{i}"))
                        for stack, i, ffn in model.ffn_modules()]

    def _hook(self, name: str):
        def hook(module, args):
            self.hidden[name] = args[0]

        return hook

    def l1(self, masks: dict[str, Tensor]) -> Tensor:
        """Mean |activation| over the real tokens, averaged over layers."""
        terms = []
        for name, h in self.hidden.items():
            keep = masks[name.split(".")[0]].reshape(-1)
            flat = h.reshape(-1, h.shape[-1])
            terms.append(flat[keep].abs().mean() if keep.numel() == flat.shape[0] else flat.abs().mean())
        return torch.stack(terms).mean()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def activation_sparsity(model: nn.Module, rows: list[list[int]], batch_size: int) -> dict[str, float]:
    """Per FFN layer, the fraction of exactly-zero activations over the real tokens of `rows`."""
    config = model.config
    zeros = {name: 0 for name in (f"{s}.{i}" for s, i, _ in model.ffn_modules())}
    totals = dict.fromkeys(zeros, 0)
    tap = HiddenTap(model)
    try:
        with torch.no_grad():
            for batch in length_sorted(rows, batch_size):
                inputs = model_inputs(config, batch)
                tap.hidden.clear()
                _forward(model, inputs)
                for name, h in tap.hidden.items():
                    keep = real_tokens(name.split(".")[0], inputs).reshape(-1)
                    flat = h.reshape(-1, h.shape[-1])
                    flat = flat[keep] if keep.numel() == flat.shape[0] else flat
                    zeros[name] += int((flat == 0).sum())
                    totals[name] += flat.numel()
    finally:
        tap.close()
    return {name: round(zeros[name] / max(1, totals[name]), 4) for name in zeros}


def _forward(model: nn.Module, inputs: dict[str, Any]):
    if model.config.arch == "encoder":
        return model.encode(inputs["input_ids"], inputs["attention_mask"])
    return model(**inputs)


def l1_weight(step: int, steps: int, peak: float, ramp: float) -> float:
    """ProSparse's progressive factor: 0 at step 0, rising linearly to `peak` over the first
    `ramp` fraction of the run, then held (a sudden strong penalty kills the model's function)."""
    if peak <= 0:
        return 0.0
    ramp_steps = max(1, int(round(ramp * steps)))
    return peak * min(1.0, (step + 1) / ramp_steps)


def recovery_loss(model_config: ModelConfig, teacher: nn.Module, tap: HiddenTap, trainer_step, *, kd: float, l1: float,
                  l1_ramp: float, steps: int):
    """The recovery objective (model, batch) -> (loss, stats). `trainer_step()` gives the step."""
    causal = model_config.arch != "encoder"
    teacher_flops = forward_flops_per_token(teacher)

    def loss_fn(m, batch):
        step = trainer_step()
        stats: dict[str, float] = {}
        if causal:
            logits = m(**batch)
            student, labels = lm_targets(model_config, logits, batch)
            teacher_logits = None
            if kd > 0:
                with torch.no_grad():
                    teacher_logits, _ = lm_targets(model_config, teacher(**batch), batch)
            loss, stats = ki_loss(student, labels, teacher_logits, kd, RECOVERY_KD_TEMPERATURE)
            count = int((labels != -100).sum())
        else:
            mask = batch["attention_mask"]
            with torch.no_grad():
                target = mean_pooled(teacher.encode(batch["input_ids"], mask), mask)
            got = mean_pooled(m.encode(batch["input_ids"], mask), mask)
            loss = (1 - F.cosine_similarity(got, target, dim=-1)).mean()
            stats["cosine_loss"] = float(loss.detach())
            count = int(batch["input_ids"].shape[0])
        weight = l1_weight(step, steps, l1, l1_ramp)
        if weight > 0:
            masks = {"encoder": batch["attention_mask"].bool(), "decoder": batch.get("decoder_attention_mask", batch["attention_mask"]).bool()}
            penalty = tap.l1(masks)
            loss = loss + weight * penalty
            stats.update(l1=float(penalty.detach()), l1_weight=weight)
        stats["count"] = count
        # The original model's forward passes are compute of the recovery too.
        uses_teacher = kd > 0 or not causal
        stats["flops"] = teacher_flops * int(batch["attention_mask"].sum()) if uses_teacher else 0.0
        return loss, stats

    return loss_fn


def recover(model: nn.Module, teacher: nn.Module, rows: list[list[int]], work: Path, *, steps: int, lr: float,
            batch_size: int, seed: int, kd: float, l1: float, l1_ramp: float) -> dict[str, Any]:
    """Recovery training of the relufied `model` (all parameters) through the shared Trainer;
    the training state lives in `work` (a scratch directory). Returns steps, tokens, FLOPs
    (the teacher's forward passes included) and the last logged losses."""
    teacher.requires_grad_(False).eval()
    tap = HiddenTap(model)
    trainer = Trainer(TrainConfig(out=work, max_steps=steps, lr=lr, schedule="linear", warmup_steps=max(1, steps // 10),
                                  seed=seed, cpu=True, progress=False, log_every=max(1, steps // 5)))
    loss_fn = recovery_loss(model.config, teacher, tap, lambda: trainer.step, kd=kd, l1=l1, l1_ramp=l1_ramp, steps=steps)
    try:
        result = trainer.fit(model, loss_fn, RowBatches(rows, model.config, batch_size, seed))
    finally:
        tap.close()
    model.eval()
    last = {k: round(v, 5) for k, v in result.last_train.items() if isinstance(v, float) and k in ("loss", "lm", "kd", "l1", "cosine_loss")}
    return {"steps": result.step, "tokens": result.tokens, "flops": result.flops, "last": last}
