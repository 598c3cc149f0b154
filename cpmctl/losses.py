"""Losses shared by the training stages: LM cross-entropy and distillation (KD/KL) on target
positions, from online teacher logits or from a cached top-K teacher distribution.

    lm_forward(model, batch)                     -> logits [B, T, V] for any architecture
    target_mask(labels)                          -> bool [B, T], labels != -100
    lm_loss(logits, labels)                      -> mean cross-entropy over target positions
    kd_loss(student_logits, teacher_logits, mask, temperature)
                                                 -> mean over targets of T^2 * KL(p_t^T || p_s^T)
    teacher_topk(teacher_logits, k)              -> (ids [.., k], logits [.., k]) of the k largest
    kd_loss_topk(student_logits, ids, topk_logits, mask, temperature)
                                                 -> as kd_loss with the teacher restricted to its
                                                    top-k tokens, renormalised
    ki_weight(step, ki_steps, schedule, alpha)   -> a_t
    ki_loss(student_logits, labels, teacher, a_t, temperature)
                                                 -> ((1 - a_t) * LM + a_t * KD, stats)

All distillation terms are averaged over the target positions (labels != -100), as knowledge
inheritance (Qin et al. 2022) defines them. Vocabulary sizes may differ between teacher and
student when they share a tokenizer (the extra rows are padding): a teacher with a smaller
vocabulary is compared with the student's full softmax (its distribution is zero on the extra
ids); a teacher with a larger one is cut to the student's size and renormalised.

The temperature has no default here: every caller passes the one it means. The KI default
(`cpmctl pretrain --ki-temperature`, chosen by measurement) is declared once, in
cpmctl.command_configs; distillation and ReLU-fication recovery declare their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmctl.errors import UserError

IGNORE_INDEX = -100
KI_SCHEDULES = ("linear", "constant", "step")
MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "token_type_ids", "position_ids")


def lm_forward(model: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Logits of `model` on a batch from cpmctl.data (any objective): the batch keys the
    Transformer's forward takes are passed through, everything else (labels, caches) is not."""
    return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})


def target_mask(labels: Tensor) -> Tensor:
    return labels != IGNORE_INDEX


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over target positions (fp32 softmax)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _align_teacher(teacher_logits: Tensor, student_vocab: int) -> Tensor:
    if teacher_logits.shape[-1] > student_vocab:
        return teacher_logits[..., :student_vocab]  # padding ids beyond the tokenizer: dropped
    return teacher_logits


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) averaged over positions where `mask` is true."""
    teacher_logits = _align_teacher(teacher_logits, student_logits.shape[-1])
    s = student_logits[mask].float() / temperature
    t = teacher_logits[mask].float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    vt = log_pt.shape[-1]
    kl = (log_pt.exp() * (log_pt - log_ps[:, :vt])).sum(-1)
    return temperature**2 * kl.mean()


def teacher_topk(teacher_logits: Tensor, k: int, student_vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """(ids, logits) of the teacher's k most likely tokens at each position. Probabilities at
    any temperature follow from the logits (softmax over the k of them), so caching logits
    serves every temperature."""
    if student_vocab is not None:
        teacher_logits = _align_teacher(teacher_logits, student_vocab)
    k = min(k, teacher_logits.shape[-1])
    values, ids = teacher_logits.float().topk(k, dim=-1)
    return ids, values


def kd_loss_topk(student_logits: Tensor, ids: Tensor, topk_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(q || p_s) with q the teacher's top-k distribution at temperature T renormalised
    over those k tokens, p_s the student's full softmax at T; averaged over `mask` positions.
    `ids`/`topk_logits`: [B, T, k] aligned with the student's positions."""
    s = student_logits[mask].float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_ps = F.log_softmax(s, dim=-1).gather(-1, ids[mask].long())
    log_q = F.log_softmax(topk_logits[mask].float() / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_ps)).sum(-1)
    return temperature**2 * kl.mean()


def ki_weight(step: int, ki_steps: int, schedule: str = "linear", alpha: float = 0.5) -> float:
    """Teacher weight a_t at optimizer step t (0-based).

    linear: max(0, 1 - t/N) (knowledge inheritance); step: 1 until N, then 0 (a hard switch);
    constant: alpha until N, then 0. N = 0 turns the teacher off.
    """
    if schedule not in KI_SCHEDULES:
        raise UserError(f"unknown KI schedule {schedule!r}; expected one of {', '.join(KI_SCHEDULES)}")
    if ki_steps <= 0 or step >= ki_steps:
        return 0.0
    if schedule == "linear":
        return max(0.0, 1.0 - step / ki_steps)
    if schedule == "step":
        return 1.0
    return float(alpha)


def ki_loss(student_logits: Tensor, labels: Tensor, teacher: Tensor | tuple[Tensor, Tensor] | None,
            a_t: float, temperature: float) -> tuple[Tensor, dict[str, float]]:
    """(1 - a_t) * LM + a_t * T^2 * KL(teacher || student) on target positions.

    `teacher`: full teacher logits [B, T, V_t], or (ids, logits) of its top-k [B, T, k], or None
    when a_t is 0. Returns the loss and {"lm", "kd", "a_t"} for logging.
    """
    lm = lm_loss(student_logits, labels)
    stats = {"lm": float(lm.detach()), "a_t": float(a_t)}
    if a_t <= 0.0:
        return lm, stats
    if teacher is None:
        raise ValueError("a_t > 0 needs a teacher distribution")
    mask = target_mask(labels)
    if isinstance(teacher, tuple):
        kd = kd_loss_topk(student_logits, teacher[0], teacher[1], mask, temperature)
    else:
        kd = kd_loss(student_logits, teacher, mask, temperature)
    stats["kd"] = float(kd.detach())
    return (1.0 - a_t) * lm + a_t * kd, stats
