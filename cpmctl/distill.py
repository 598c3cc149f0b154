"""MixKD building blocks: the student, mixup on word embeddings, token perturbation, the objective
and the teacher-logits cache. `cpmctl/stages/distill.py` wires them into training.

Student construction (`student_from_teacher`): a copy of the teacher's config with fewer layers
whose embeddings, norms, position biases and head are the teacher's, and whose block i is the
teacher's block `layers[i]` (for an encoder-decoder, each stack has its own list). The default
selection keeps every other layer counted from the top, so the student's last block is the
teacher's last block and the head sees the representation it was trained on.

Mixup (Liang et al., MixKD, ICLR 2021; our reading, see ../shared/REFERENCES.md): for a batch
and a permutation `perm` of it, row i is paired with row perm[i] and

    lambda_i ~ Beta(alpha, alpha)                (one per pair, from a seeded numpy generator)
    x_mix[i] = lambda_i * E[x_i] + (1 - lambda_i) * E[x_perm[i]]   position by position
    mask_mix[i] = mask[i] | mask[perm[i]]        (the union of the two attention masks)
    y_mix[i] = lambda_i * onehot(y_i) + (1 - lambda_i) * onehot(y_perm[i])

where E are word (token) embeddings; both sequences are padded to the same length first, and a
padding position holds the embedding of the pad token, as it would in a padded batch. Position,
token-type embeddings and the embedding norm come after the mixing, inside the model. The
teacher and the student mix in their own embedding spaces with the same lambdas and pairs.

Objective (`mixkd_loss`), every weight exposed because the paper does not publish them:

    w_ce   * CE(student(x), y)
  + w_kd   * KD_T(teacher(x) || student(x))
  + w_mix  * KD_T(teacher(x_mix) || student(x_mix))
  + w_smix * CE_soft(student(x_mix), y_mix)

KD_T is the temperature-T KL divergence scaled by T^2 (`cpmctl.losses`).

The teacher-logits cache holds the teacher's class logits (linear-head or label-word scores) for
the un-mixed training examples only: a mixed input is new every step, so the mixed-KD term always
needs the teacher online. (LM distillation on a corpus uses pretrain's top-K cache,
`cpmctl.teacher_cache`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmctl import losses
from cpmctl.config import ModelConfig
from cpmctl.data import EpochBatches
from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory, verify_checksums, write_checksums
from cpmctl.losses import IGNORE_INDEX
from cpmctl.model import build_model
from cpmctl.tasks import collate

# =============================================================================================
# Student construction
# =============================================================================================


def every_other_layer(n_teacher: int, n_student: int) -> list[int]:
    """`n_student` teacher layers evenly spaced and ending at the last one ([1, 3, 5] of 6)."""
    if not 1 <= n_student <= n_teacher:
        raise UserError(f"a student needs 1..{n_teacher} layers of this teacher, got {n_student}")
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def parse_layers(spec: str | int | Sequence[int], n_teacher: int) -> list[int]:
    """`--student-layers`: a count N (every other layer, see `every_other_layer`) or a list
    "0,2,5" of teacher layer indices (0-based, increasing, within the teacher)."""
    if isinstance(spec, int):
        return every_other_layer(n_teacher, spec)
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"student layers must be a count or a comma-separated list of layer indices, got {spec!r}",
                            option="student_layers") from None
        if len(values) == 1 and "," not in spec:
            return every_other_layer(n_teacher, values[0])
    else:
        values = [int(v) for v in spec]
    if not values:
        raise UserError("the student layer selection names no layer", option="student_layers")
    bad = [v for v in values if not 0 <= v < n_teacher]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range: the teacher has layers 0..{n_teacher - 1}")
    if values != sorted(set(values)):
        raise UserError(f"student layers must be distinct and increasing, got {values}")
    return values


def _remap_moe_layers(config: ModelConfig, maps: dict[str, list[int]]) -> list[str] | None:
    """The MoE layer names of the student: teacher "encoder.5" becomes "encoder.i" where i picks 5."""
    if config.moe is None or config.moe.layers is None:
        return None
    out = []
    for stack, picked in maps.items():
        for i, teacher_index in enumerate(picked):
            if f"{stack}.{teacher_index}" in config.moe.layers:
                out.append(f"{stack}.{i}")
    return out


def student_layer_map(config: ModelConfig, layers: Sequence[int], decoder_layers: Sequence[int] | None = None) -> dict[str, list[int]]:
    """{stack name: teacher layer index of each student layer} for the teacher's stacks."""
    if config.arch == "encoder":
        return {"encoder": list(layers)}
    if config.arch == "decoder":
        return {"decoder": list(layers)}
    return {"encoder": list(layers), "decoder": list(decoder_layers if decoder_layers is not None else layers)}


def student_config(teacher: ModelConfig, maps: dict[str, list[int]], *, unshare: bool = False) -> ModelConfig:
    """`unshare`: the student has one block per layer even if the teacher shares them."""
    changes: dict[str, Any] = {}
    if teacher.arch == "encoder-decoder":
        changes = {"n_layers": len(maps["encoder"]), "n_decoder_layers": len(maps["decoder"])}
    else:
        changes = {"n_layers": len(next(iter(maps.values())))}
    if unshare:
        changes.update(share_layers=False, share_groups=None)
    if teacher.moe is not None and teacher.moe.layers is not None:
        moe = teacher.to_dict()["moe"]
        moe["layers"] = _remap_moe_layers(teacher, maps)
        changes["moe"] = moe
    return teacher.replace(**changes)


def student_state_dict(teacher_state: dict[str, Tensor], maps: dict[str, list[int]], shared: bool) -> dict[str, Tensor]:
    """The teacher's tensors renamed for the student: block `maps[stack][i]` becomes block i.

    A parameter-shared teacher has a single block per stack, which the student keeps as is.
    Returns cloned tensors, so training the student never writes into the teacher."""
    out = {}
    for name, tensor in teacher_state.items():
        parts = name.split(".")
        if len(parts) > 3 and parts[0] in maps and parts[1] == "blocks" and not shared:
            picked = maps[parts[0]]
            teacher_index = int(parts[2])
            for i, t in enumerate(picked):
                if t == teacher_index:
                    out[".".join([parts[0], "blocks", str(i), *parts[3:]])] = tensor.detach().clone()
            continue
        out[name] = tensor.detach().clone()
    return out


def student_from_teacher(teacher: nn.Module, layers: Sequence[int], decoder_layers: Sequence[int] | None = None) -> nn.Module:
    """A smaller `Transformer` initialised from `teacher` (encoder, decoder or encoder-decoder)."""
    config: ModelConfig = teacher.config
    stacks = student_layer_map(config, layers, decoder_layers)
    for stack, picked in stacks.items():
        n = config.n_decoder_layers if (stack == "decoder" and config.arch == "encoder-decoder") else config.n_layers
        parse_layers(picked, n)  # range and order checks with the user-facing message
    grouped = (config.shared_blocks or 1) > 1
    if grouped:
        # Teacher blocks are shared in G groups; picked layers need not keep equal runs per group,
        # so the student gets its own copy of the block the teacher applies at each picked layer.
        depths = config.stack_depths()
        stacks = {s: [t * config.shared_blocks // depths[s] for t in picked] for s, picked in stacks.items()}
    student = build_model(student_config(config, stacks, unshare=grouped), device="meta")
    state = student_state_dict(teacher.state_dict(), stacks, config.share_layers and not grouped)
    student.load_state_dict(state, assign=True, strict=True)
    return student


def preset_student_config(preset: str, teacher_config: ModelConfig) -> ModelConfig:
    """A named preset on the teacher's vocabulary and ids (and positions, when both are absolute)."""
    base = ModelConfig.from_preset(preset)
    same = {k: getattr(teacher_config, k) for k in ("vocab_size", "pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id")}
    if base.position == "absolute" and teacher_config.position == "absolute":
        same["max_positions"] = max(base.max_positions, teacher_config.max_positions)
    return base.replace(**same)


def student_from_preset(preset: str, teacher_config: ModelConfig) -> nn.Module:
    """A freshly initialised student of a named preset (preset_student_config)."""
    return build_model(preset_student_config(preset, teacher_config))


# =============================================================================================
# Mixup
# =============================================================================================


def sample_lambdas(rng: np.random.Generator, alpha: float, n: int) -> Tensor:
    """n mixing weights from Beta(alpha, alpha), float32."""
    if alpha <= 0:
        raise UserError(f"the mixup Beta(a, a) needs a > 0, got {alpha}", option="mixup_alpha")
    return torch.from_numpy(rng.beta(alpha, alpha, size=n).astype(np.float32))


def sample_pairs(rng: np.random.Generator, n: int) -> Tensor:
    """A permutation of the batch: row i is mixed with row perm[i]."""
    return torch.from_numpy(rng.permutation(n).astype(np.int64))


def pad_to_length(embeds: Tensor, mask: Tensor, length: int, pad_embedding: Tensor) -> tuple[Tensor, Tensor]:
    """Right-pad [B, T, d] embeddings (with the pad token's embedding) and [B, T] mask to length."""
    b, t, d = embeds.shape
    if length < t:
        raise ValueError(f"cannot pad {t} positions down to {length}")
    if length == t:
        return embeds, mask
    fill = pad_embedding.to(embeds.dtype).expand(b, length - t, d)
    return torch.cat([embeds, fill], dim=1), torch.cat([mask, mask.new_zeros(b, length - t)], dim=1)


def mix_embeddings(embeds_a: Tensor, mask_a: Tensor, embeds_b: Tensor, mask_b: Tensor, lam: Tensor, pad_embedding: Tensor) -> tuple[Tensor, Tensor]:
    """lam * a + (1 - lam) * b position by position after padding both to one length; mask = union.

    lam: [B] (or a scalar). Returns (embeds [B, T, d], mask [B, T])."""
    length = max(embeds_a.shape[1], embeds_b.shape[1])
    embeds_a, mask_a = pad_to_length(embeds_a, mask_a, length, pad_embedding)
    embeds_b, mask_b = pad_to_length(embeds_b, mask_b, length, pad_embedding)
    lam = torch.as_tensor(lam, dtype=embeds_a.dtype, device=embeds_a.device).reshape(-1, 1, 1)
    mixed = lam * embeds_a + (1 - lam) * embeds_b
    return mixed, ((mask_a != 0) | (mask_b != 0)).to(mask_a.dtype)


def mix_batch(embeds: Tensor, mask: Tensor, perm: Tensor, lam: Tensor, pad_embedding: Tensor) -> tuple[Tensor, Tensor]:
    """Mix each row of a padded batch with row perm[i] (see `mix_embeddings`)."""
    perm = perm.to(embeds.device)
    return mix_embeddings(embeds, mask, embeds[perm], mask[perm], lam, pad_embedding)


def mix_targets(targets_a: Tensor, targets_b: Tensor, lam: Tensor) -> Tensor:
    """lam * a + (1 - lam) * b for per-row distributions [B, C] or [B, T, C]."""
    lam = torch.as_tensor(lam, dtype=targets_a.dtype, device=targets_a.device)
    lam = lam.reshape(-1, *([1] * (targets_a.dim() - 1)))
    return lam * targets_a + (1 - lam) * targets_b


def mixed_labels(labels: Tensor, perm: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """lam_i * onehot(y_i) + (1 - lam_i) * onehot(y_perm[i]), [B, C] float32."""
    onehot = F.one_hot(labels, num_classes).float()
    return mix_targets(onehot, onehot[perm.to(labels.device)], lam)


# =============================================================================================
# Augmentation (an offline stand-in for back-translation)
# =============================================================================================


def perturb_tokens(ids: Sequence[int], rng: np.random.Generator, *, vocab_size: int, special_ids: set[int],
                   mask_id: int | None, mask_prob: float = 0.1, replace_prob: float = 0.1) -> list[int]:
    """A copy of `ids` with ordinary tokens masked (prob `mask_prob`, when the tokenizer has a mask
    token) or replaced by a random ordinary token (prob `replace_prob`); specials stay."""
    if not 0 <= mask_prob + replace_prob <= 1:
        raise UserError(f"augmentation probabilities must sum to at most 1, got {mask_prob} + {replace_prob}")
    out = list(ids)
    draws = rng.random(len(out))
    for pos, token in enumerate(out):
        if token in special_ids:
            continue
        if mask_id is not None and draws[pos] < mask_prob:
            out[pos] = mask_id
        elif draws[pos] < mask_prob + replace_prob:
            new = int(rng.integers(0, vocab_size))
            while new in special_ids or new == token:
                new = int(rng.integers(0, vocab_size))
            out[pos] = new
    return out


def augment_examples(rows: Sequence[Sequence[int]], labels: Sequence[int], copies: int, seed: int, **options: Any) -> tuple[list[list[int]], list[int]]:
    """`copies` perturbed versions of every row (label kept), from a generator seeded by `seed`."""
    rng = np.random.default_rng([seed, 0xA06])
    out_rows, out_labels = [], []
    for _ in range(copies):
        for ids, label in zip(rows, labels):
            out_rows.append(perturb_tokens(ids, rng, **options))
            out_labels.append(label)
    return out_rows, out_labels


# =============================================================================================
# Objective
# =============================================================================================


@dataclass
class LossWeights:
    ce: float = 1.0      # student CE on originals
    kd: float = 1.0      # KD on originals
    mix: float = 1.0     # KD on mixed inputs
    smix: float = 0.0    # student CE on mixed inputs, mixed labels

    def __post_init__(self) -> None:
        for name in ("ce", "kd", "mix", "smix"):
            if getattr(self, name) < 0:
                raise UserError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.ce + self.kd + self.mix + self.smix == 0:
            raise UserError("every loss weight is 0: nothing to train")

    @property
    def needs_mixup(self) -> bool:
        return self.mix > 0 or self.smix > 0

    @property
    def needs_teacher(self) -> bool:
        return self.kd > 0 or self.mix > 0


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Temperature KD: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over rows (positions)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * t * t


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-sum_c targets_c log softmax(logits)_c, mean over rows: CE against a mixed label."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def mixkd_loss(
    weights: LossWeights,
    temperature: float,
    *,
    student: Tensor,
    labels: Tensor,
    teacher: Tensor | None = None,
    student_mix: Tensor | None = None,
    teacher_mix: Tensor | None = None,
    targets_mix: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum of the four terms over classification logits [B, C]; terms with weight 0
    are skipped (their inputs may be None). Returns (loss, {term: value})."""
    terms: dict[str, Tensor] = {}
    if weights.ce:
        terms["ce"] = F.cross_entropy(student.float(), labels)
    if weights.kd:
        terms["kd"] = kd_loss(student, teacher, temperature)
    if weights.mix:
        terms["mix"] = kd_loss(student_mix, teacher_mix, temperature)
    if weights.smix:
        terms["smix"] = soft_cross_entropy(student_mix, targets_mix)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}


# =============================================================================================
# Teacher-logits cache
# =============================================================================================

CACHE_META = "cache.json"
CACHE_LOGITS = "logits.npy"
CACHE_FORMAT = "cpmctl-teacher-logits"


def examples_hash(rows: Sequence[Sequence[int]]) -> str:
    """sha256 over the token ids of every example, in order: what the teacher sees."""
    digest = hashlib.sha256()
    for ids in rows:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"\xff" * 8)
    return digest.hexdigest()


class TeacherLogitsCache:
    """The teacher's logits [N, C] for the N un-mixed training examples, memory-mapped.

    Directory: logits.npy (float32) + cache.json {format, teacher (content hash), examples
    (hash of the example ids), rows, classes}. A cache is only used for the teacher and examples
    it was built from; anything else is a UserError rather than silently wrong targets.
    """

    def __init__(self, path: Path, logits: np.ndarray, meta: dict[str, Any]):
        self.path, self.logits, self.meta = path, logits, meta

    @staticmethod
    def build(path: str | os.PathLike, logits: np.ndarray, *, teacher: str, examples: str) -> "TeacherLogitsCache":
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        meta = {"format": CACHE_FORMAT, "version": 1, "teacher": teacher, "examples": examples,
                "rows": int(logits.shape[0]), "classes": int(logits.shape[1])}
        with atomic_directory(path) as tmp:
            np.save(tmp / CACHE_LOGITS, logits)
            (tmp / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n")
            write_checksums(tmp, [CACHE_LOGITS, CACHE_META])
        return TeacherLogitsCache.open(path, teacher=teacher, examples=examples)

    @staticmethod
    def open(path: str | os.PathLike, *, teacher: str, examples: str) -> "TeacherLogitsCache":
        path = Path(path)
        if (path / CACHE_META).is_file():
            verify_checksums(path, "teacher-logits cache")
        try:
            meta = json.loads((path / CACHE_META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is not a teacher-logits cache ({exc}); give a new cache path", option="teacher_cache") from None
        if meta.get("format") != CACHE_FORMAT:
            raise UserError(f"{path} is not a teacher-logits cache; give a new cache path", option="teacher_cache")
        if meta.get("teacher") != teacher:
            raise UserError(f"teacher-logits cache {path} was built from another teacher; delete it or give a new path")
        if meta.get("examples") != examples:
            raise UserError(f"teacher-logits cache {path} was built from other training examples; delete it or give a new path")
        logits = np.load(path / CACHE_LOGITS, mmap_mode="r")
        if logits.shape != (meta["rows"], meta["classes"]):
            raise UserError(f"teacher-logits cache {path} is damaged: {logits.shape} logits for {meta['rows']} rows")
        return TeacherLogitsCache(path, logits, meta)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def get(self, indices: Sequence[int] | Tensor) -> Tensor:
        idx = np.asarray(indices.tolist() if isinstance(indices, Tensor) else indices, dtype=np.int64)
        return torch.from_numpy(np.array(self.logits[idx], dtype=np.float32))


# =============================================================================================
# Objectives for the training core: batches keyed for their mixup draws, the trained modules
# (one forward over originals and mixed inputs together) and the losses
# =============================================================================================


class TaskBatches(EpochBatches):
    """Training batches of encoded task rows, reshuffled every epoch by (seed, epoch).

    Batch `position` of epoch `epoch` is fixed by those numbers alone, so (epoch, position) is
    the whole resumable state. Unlike `tasks.TrainBatches`, each batch carries its rows'
    indices (`index`, for the teacher-logits cache) and its (epoch, position) (`key`, to seed its
    mixup draws), and the last partial batch of an epoch is kept (small data sets)."""

    def __init__(self, rows, batch_size: int, pad_id: int, seed: int):
        if not rows:
            raise UserError("no training examples")
        self.rows, self.batch_size, self.pad_id, self.seed = rows, batch_size, pad_id, seed
        self.epoch = self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def batch_at(self, epoch: int, position: int) -> dict[str, Any]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        picked = order[position * self.batch_size:(position + 1) * self.batch_size]
        batch = collate([self.rows[int(i)] for i in picked], self.pad_id)
        batch["index"] = torch.as_tensor(picked, dtype=torch.long)
        batch["key"] = (epoch, position)
        return batch


def mixup_draws(seed: int, key: tuple[int, int], n: int, alpha: float) -> tuple[Tensor, Tensor]:
    """(perm, lambdas) of one batch, from a generator seeded by (seed, epoch, position)."""
    rng = np.random.default_rng([seed, int(key[0]), int(key[1]), 0x313])
    return sample_pairs(rng, n), sample_lambdas(rng, alpha, n)


def mixed_task_inputs(scorer, batch: dict[str, Any], perm: Tensor, lam: Tensor, *, originals: bool) -> tuple[dict[str, Tensor], Tensor]:
    """A task batch and its input embeddings: [originals;] mixed rows, in `scorer`'s own word
    embeddings. Mixed rows attend to (and pool over) the union of their pair's positions."""
    embed = scorer.model.embed.tokens
    ids, mask, text, types = batch["input_ids"], batch["attention_mask"], batch["text_mask"], batch["token_type_ids"]
    words = embed(ids)
    pad = embed.weight[scorer.model.config.pad_token_id]
    mixed, mixed_mask = mix_batch(words, mask, perm, lam, pad)
    perm = perm.to(ids.device)
    mix = {"input_ids": ids, "attention_mask": mixed_mask, "text_mask": ((text != 0) | (text[perm] != 0)).long(),
           "token_type_ids": torch.where(mask != 0, types, types[perm])}
    if not originals:
        return mix, mixed
    both = {k: torch.cat([batch[k], mix[k]]) for k in mix}
    return both, torch.cat([words, mixed])


class MixKDClassifier(nn.Module):
    """The trained module: a `tasks.Scorer` (backbone + linear head) whose forward returns the
    logits of the originals and, given a pairing, of the mixed rows, in one pass."""

    def __init__(self, scorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, batch: dict[str, Any], perm: Tensor | None = None, lam: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if perm is None:
            return self.scorer(batch), None
        both, embeds = mixed_task_inputs(self.scorer, batch, perm, lam, originals=True)
        logits = self.scorer(both, embeds)
        n = batch["input_ids"].shape[0]
        return logits[:n], logits[n:]


@dataclass
class ClassificationObjective:
    """`loss_fn(model, batch)` for the shared trainer."""

    weights: LossWeights
    temperature: float
    alpha: float
    seed: int
    n_classes: int
    teacher: Any = None                       # tasks.Scorer in eval mode, or None
    cache: TeacherLogitsCache | None = None
    teacher_flops_per_token: float = 0.0

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        b = batch
        perm = lam = None
        if self.weights.needs_mixup:
            perm, lam = mixup_draws(self.seed, batch["key"], b["input_ids"].shape[0], self.alpha)
        student, student_mix = model(b, perm, lam)
        teacher = teacher_mix = targets_mix = None
        teacher_tokens = 0
        with torch.no_grad():
            if self.weights.kd:
                if self.cache is not None:
                    teacher = self.cache.get(batch["index"]).to(student.device)
                else:
                    teacher = self.teacher(b).float()
                    teacher_tokens += int(b["attention_mask"].sum())
            if self.weights.mix:
                mix, embeds = mixed_task_inputs(self.teacher, b, perm, lam, originals=False)
                teacher_mix = self.teacher(mix, embeds).float()
                teacher_tokens += int(mix["attention_mask"].sum())
        if self.weights.smix:
            targets_mix = mixed_labels(b["labels"], perm, lam.to(student.device), self.n_classes)
        loss, terms = mixkd_loss(self.weights, self.temperature, student=student, labels=b["labels"], teacher=teacher,
                                         student_mix=student_mix, teacher_mix=teacher_mix, targets_mix=targets_mix)
        stats: dict[str, float] = {f"loss_{k}": v for k, v in terms.items()}
        stats["flops"] = self.teacher_flops_per_token * teacher_tokens
        tokens = float(b["attention_mask"].sum())
        stats["tokens"] = tokens * (2 if student_mix is not None else 1)
        return loss, stats


class MixKDLanguageModel(nn.Module):
    """A `Transformer` whose forward takes a cpmctl.data batch and, given a pairing, also runs the
    mixed sequences (encoder and decoder inputs mixed with the same lambda) in the same pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor], perm: Tensor | None = None, lam: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        inputs = lm_inputs(self.model, batch, perm, lam)
        logits = self.model(**inputs)
        if perm is None:
            return logits, None
        n = batch["input_ids"].shape[0]
        return logits[:n], logits[n:]


def lm_inputs(model: nn.Module, batch: dict[str, Tensor], perm: Tensor | None, lam: Tensor | None) -> dict[str, Tensor]:
    """Forward arguments for [originals; mixed] (or the originals alone when perm is None)."""
    config = model.config
    embed = model.embed.tokens
    pad = embed.weight[config.pad_token_id]
    out: dict[str, Tensor] = {}
    pairs = [("input_ids", "attention_mask", "inputs_embeds")]
    if config.arch == "encoder-decoder":
        pairs.append(("decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds"))
    for ids_key, mask_key, embeds_key in pairs:
        ids = batch[ids_key]
        mask = batch.get(mask_key, torch.ones_like(ids))
        if perm is None:
            out[ids_key], out[mask_key] = ids, mask
            continue
        words = embed(ids)
        mixed, mixed_mask = mix_batch(words, mask, perm, lam, pad)
        out[embeds_key] = torch.cat([words, mixed])
        out[mask_key] = torch.cat([mask, mixed_mask])
    return out


@dataclass
class LMObjective:
    weights: LossWeights
    temperature: float
    alpha: float
    seed: int
    teacher: torch.nn.Module | None = None
    teacher_flops_per_token: float = 0.0

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        labels = batch["labels"]
        n = labels.shape[0]
        perm = lam = None
        if self.weights.needs_mixup:
            key = batch.get("key", (0, 0))
            perm, lam = mixup_draws(self.seed, key, n, self.alpha)
        student, student_mix = model(batch, perm, lam)
        targets = losses.target_mask(labels)
        terms: dict[str, Tensor] = {}
        teacher_tokens = 0
        if self.weights.ce:
            terms["ce"] = losses.lm_loss(student, labels)
        with torch.no_grad():
            teacher = teacher_mix = None
            cached = "teacher_ids" in batch  # top-K from the teacher cache (cpmctl.teacher_cache)
            if self.weights.kd and not cached:
                teacher = losses.lm_forward(self.teacher, batch).float()
                teacher_tokens += int(batch.get("attention_mask", labels).numel())
            if self.weights.mix:
                mixed = lm_inputs(self.teacher, batch, perm, lam)
                teacher_mix = self.teacher(**mixed).float()[n:]
                teacher_tokens += 2 * int(labels.numel())
        if self.weights.kd and cached:
            ids, values = batch["teacher_ids"].to(student.device), batch["teacher_logits"].to(student.device)
            terms["kd"] = losses.kd_loss_topk(student, ids, values, targets, self.temperature)
        elif self.weights.kd:
            terms["kd"] = losses.kd_loss(student, teacher, targets, self.temperature)
        if perm is not None:
            perm_d = perm.to(labels.device)
            lam_d = lam.to(student.device)
            union = targets | targets[perm_d]
            if self.weights.mix:
                terms["mix"] = losses.kd_loss(student_mix, teacher_mix, union, self.temperature)
            if self.weights.smix:
                terms["smix"] = mixed_lm_cross_entropy(student_mix, labels, labels[perm_d], lam_d)
        total = sum(getattr(self.weights, k) * v for k, v in terms.items())
        stats = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        stats["flops"] = self.teacher_flops_per_token * teacher_tokens
        return total, stats


def mixed_lm_cross_entropy(logits: Tensor, labels_a: Tensor, labels_b: Tensor, lam: Tensor) -> Tensor:
    """Mean over positions targeted by either sequence of lam * CE(a) + (1 - lam) * CE(b)."""
    logp = torch.log_softmax(logits.float(), dim=-1)

    def nll(labels: Tensor) -> Tensor:
        picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return -picked * (labels != IGNORE_INDEX)

    lam = lam.reshape(-1, 1)
    per_position = lam * nll(labels_a) + (1 - lam) * nll(labels_b)
    union = (labels_a != IGNORE_INDEX) | (labels_b != IGNORE_INDEX)
    return per_position.sum() / union.sum().clamp(min=1)


class KeyedBatches:
    """cpmctl.data.Batches with each batch's (epoch, position) attached, to seed its mixup draws."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.inner.position >= self.inner.batches_per_epoch:
            key = (self.inner.epoch + 1, 0)
        else:
            key = (self.inner.epoch, self.inner.position)
        batch = dict(next(self.inner))
        batch["key"] = key
        return batch
