"""Classification tasks: JSONL examples, labels and verbalizers, encoding, scoring, metrics.

Shared by prompt tuning, full fine-tuning and distillation. Nothing here knows about prompts:
a caller that wants extra embedded vectors in the input (soft prompts, mixup) inserts *virtual*
positions into encoded rows (`EncodedExample.insert`) and passes `inputs_embeds` to `Scorer`.

API
---
Data
    Example(text, label, text_pair=None)            one record
    load_examples(path, require_labels=True)         JSONL {"text", "text_pair"?, "label"} -> [Example]
    load_verbalizer(path)                            JSON {label: word} -> dict
    LabelSet.from_examples(examples, verbalizer)     sorted labels + one word each (default: the label)
    LabelSet.index(label) / .labels / .words / len()
    label_token_ids(tokenizer, words)                ids of each label word (no special tokens)

Encoding (one row per example, as Python lists; positions are 0-based)
    SCORING_MODES = ("lm", "linear")                 label words via the LM head, or a linear head
    encode_example(tokenizer, config, example, label, *, mode, max_length, reserve=0)
        -> EncodedExample(ids, token_types, text_mask, answer, marks, virtual, label, truncated)
        text_mask: 1 where the position holds input text (what a linear head pools over);
        answer: the mask position whose LM output scores the label word ("lm" mode with an
        encoder-only model), else -1 (decoder-only models answer after their last position);
        marks: named insertion points "start" (before everything, special tokens included),
        "between" (before text_pair; None for single texts), "end" (right after the text,
        before any mask/eos/[SEP] that closes the input); virtual: -1, or k for a position
        whose embedding is the caller's k-th vector. `reserve` positions are kept
        free (e.g. for virtual ones) when truncating to `max_length` (longest text first).
    EncodedExample.insert(mark, count, first) -> a new row with `count` virtual positions
        (vector indices first..first+count-1) inserted at that mark.
    encode_examples(...) -> (rows, number truncated)  the same over a list
    collate(rows, pad_id) -> dict of right-padded LongTensors: input_ids, attention_mask,
        token_type_ids, text_mask, virtual [B, T]; answer, labels [B] (label -1: unlabelled)
    eval_batches(rows, batch_size, pad_id)           length-sorted batches with "index" [B]
    TrainBatches(rows, batch_size, pad_id, seed=, epochs=)  shuffled per epoch, resumable
        (state_dict/load_state_dict), the iterable `cpmctl.training.Trainer.fit` takes

Scoring
    LinearHead(d_model, n_classes, pooling="mean"|"last")
    Scorer(model, *, label_ids=None, head=None)      nn.Module; forward(batch, inputs_embeds=None)
        -> class logits [B, C]. With a head: pooled hidden states (encoder side for
        encoder-decoder models). Without: the log-probability of each label word under the LM
        head (encoder-only: at the mask position; decoder-only: after the last position;
        encoder-decoder: summed over the word's tokens, decoded from the start token).
        `inputs_embeds` [B, T, d] replaces the token embeddings of batch["input_ids"].
    classification_loss(logits, labels)              cross-entropy over classes

Metrics
    accuracy_and_macro_f1(predictions, labels, n_classes) -> {"accuracy", "macro_f1"}
    evaluate(classify, batches, n_classes) -> {"accuracy", "macro_f1", "loss", "examples",
        "predictions"}; `classify(batch) -> class logits` (a Scorer, or anything wrapping one).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmctl.config import ModelConfig
from cpmctl.data import EpochBatches
from cpmctl.errors import UserError
from cpmctl.jsonl import iter_records

log = logging.getLogger("cpmctl")

SCORING_MODES = ("lm", "linear")
POOLINGS = ("mean", "last")


# =============================================================================================
# Data
# =============================================================================================


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None
    text_pair: str | None = None


def load_examples(path: str | Path, *, require_labels: bool = True) -> list[Example]:
    """Examples from a JSONL file of {"text": str, "text_pair": str (optional), "label": str|int}."""
    examples = []
    first_label: tuple[int, Any] | None = None  # (line, label): all labels are strings, or all integers
    for number, record in iter_records(path, what="task file"):
        pair = record.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise UserError(f"{path}:{number}: 'text_pair' must be a string")
        if isinstance(record.get("text"), str) and not record["text"].strip() and not (pair or "").strip():
            log.warning(f"warning: {path}:{number}: empty text (the example is scored on the prompt alone)")
        label = record.get("label")
        if label is None:
            if require_labels:
                raise UserError(f"{path}:{number} has no 'label'")
        elif isinstance(label, (str, int)) and not isinstance(label, bool):
            if first_label is None:
                first_label = (number, label)
            elif isinstance(label, str) != isinstance(first_label[1], str):
                line, seen = first_label
                raise UserError(f"{path}:{number}: label {label!r} is {'a string' if isinstance(label, str) else 'an integer'}, "
                                f"but line {line}'s label {seen!r} is {'a string' if isinstance(seen, str) else 'an integer'}; "
                                "write every label the same way (1 and \"1\" would be two classes)")
            label = str(label)
        else:
            raise UserError(f"{path}:{number}: 'label' must be a string or an integer")
        examples.append(Example(record["text"], label, pair))
    if not examples:
        raise UserError(f"task file {path} holds no examples")
    return examples


def load_verbalizer(path: str | Path) -> dict[str, str]:
    """A JSON object mapping each label to the word that names it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"verbalizer file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"verbalizer {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise UserError(f"verbalizer {path} must be a JSON object of label -> non-empty word")
    return {str(k): v for k, v in data.items()}


@dataclass(frozen=True)
class LabelSet:
    """The task's classes in a fixed (sorted) order and the word each is verbalised as."""

    labels: tuple[str, ...]
    words: tuple[str, ...]

    @classmethod
    def from_examples(cls, examples: Iterable[Example], verbalizer: dict[str, str] | None = None) -> "LabelSet":
        labels = sorted({ex.label for ex in examples if ex.label is not None})
        if len(labels) < 2:
            raise UserError(f"a classification task needs at least 2 labels, found {len(labels)}")
        if verbalizer is not None:
            missing = [label for label in labels if label not in verbalizer]
            if missing:
                raise UserError(f"the verbalizer has no word for label(s) {', '.join(missing[:5])}")
        words = tuple(verbalizer[label] if verbalizer else label for label in labels)
        return cls(tuple(labels), words)

    def index(self, label: str | None) -> int:
        if label is None:
            return -1
        try:
            return self.labels.index(label)
        except ValueError:
            raise UserError(f"label {label!r} is not one of the task's labels ({', '.join(self.labels)})") from None

    def __len__(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, str]:
        return dict(zip(self.labels, self.words))


def label_token_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Token ids of each label word (no special tokens); an empty or duplicate encoding is an error."""
    ids = [tokenizer.encode(word) for word in words]
    for word, row in zip(words, ids):
        if not row:
            raise UserError(f"label word {word!r} encodes to no tokens")
    seen: dict[tuple[int, ...], str] = {}
    for word, row in zip(words, ids):
        if tuple(row) in seen:
            raise UserError(f"label words {seen[tuple(row)]!r} and {word!r} encode to the same tokens; give distinct label words", option="verbalizer")
        seen[tuple(row)] = word
    return ids


# =============================================================================================
# Encoding
# =============================================================================================


@dataclass(frozen=True)
class EncodedExample:
    ids: list[int]
    token_types: list[int]
    text_mask: list[int]
    answer: int
    marks: dict[str, int | None]
    virtual: list[int]
    label: int
    truncated: bool = False

    def insert(self, mark: str, count: int, first: int) -> "EncodedExample":
        """Insert `count` virtual positions (vector indices first, first+1, ...) at `mark`.

        Inserted positions take the token type of the position before them, hold pad id 0
        (their embedding comes from the caller) and are not text. Marks and the answer position
        at or after the insertion point move right.
        """
        at = self.marks.get(mark)
        if at is None:
            raise ValueError(f"this example has no insertion point {mark!r}")
        if count == 0:
            return self
        token_type = self.token_types[at - 1] if at > 0 else (self.token_types[0] if self.token_types else 0)

        def spliced(values: list[int], fill: list[int]) -> list[int]:
            return values[:at] + fill + values[at:]

        # Marks after the insertion point move right; a mark at the same position moves too when
        # it comes later in reading order (start < between < end), so insertions keep that order.
        def moved(name: str, pos: int | None) -> int | None:
            if pos is None:
                return None
            later = pos > at or (pos == at and _order(name) > _order(mark))
            return pos + count if later else pos

        marks = {name: moved(name, pos) for name, pos in self.marks.items()}
        marks[mark] = at + count
        return replace(
            self,
            ids=spliced(self.ids, [0] * count),
            token_types=spliced(self.token_types, [token_type] * count),
            text_mask=spliced(self.text_mask, [0] * count),
            virtual=spliced(self.virtual, list(range(first, first + count))),
            answer=self.answer + count if self.answer >= at else self.answer,
            marks=marks,
        )


_MARK_ORDER = {"start": 0, "between": 1, "end": 2}


def _order(mark: str) -> int:
    return _MARK_ORDER.get(mark, 3)


def _truncate(first: list[int], second: list[int] | None, budget: int) -> tuple[list[int], list[int] | None, bool]:
    """Drop tokens from the end of the longer text until both fit in `budget` tokens."""
    total = len(first) + (len(second) if second is not None else 0)
    if total <= budget:
        return first, second, False
    first, second = list(first), (list(second) if second is not None else None)
    while len(first) + (len(second) if second is not None else 0) > budget:
        if second is not None and len(second) > len(first):
            second.pop()
        elif first:
            first.pop()
        else:
            second.pop()  # type: ignore[union-attr]
    return first, second, True


def position_limit(config: ModelConfig) -> int | None:
    """The longest sequence the model's position table allows (None: relative/rotary, no table)."""
    return config.max_positions if config.position == "absolute" else None


def encode_example(
    tokenizer, config: ModelConfig, example: Example, label: int, *, mode: str, max_length: int | None, reserve: int = 0,
    text_ids: tuple[Sequence[int], Sequence[int] | None] | None = None,
) -> EncodedExample:
    """One example as model input for `mode` ("lm" or "linear"); see the module docstring.

    `text_ids`: the plain encodings of (text, text_pair) when the caller has them already.
    """
    if mode not in SCORING_MODES:
        raise UserError(f"unknown scoring mode {mode!r}; expected one of {', '.join(SCORING_MODES)}")
    prefix, suffix = tokenizer._special_affixes()
    arch = config.arch
    if arch != "encoder":
        # Encoder-decoder inputs end with eos, as in pre-training; decoder-only inputs start
        # with bos when the model has one and never end with eos (the answer comes next).
        prefix = [config.bos_token_id] if arch == "decoder" and config.bos_token_id is not None else []
        suffix = [tokenizer.eos_id] if arch == "encoder-decoder" and tokenizer.eos_id is not None else []
    separator = [tokenizer.sep_id] if tokenizer.sep_id is not None else []
    mask_slot = []
    if mode == "lm" and arch == "encoder":
        if tokenizer.mask_id is None:
            raise UserError("label-word scoring with an encoder-only model needs a tokenizer with a mask token; use a linear head", option="head")
        mask_slot = [tokenizer.mask_id]

    first = tokenizer.encode(example.text) if text_ids is None else list(text_ids[0])
    second = None
    if example.text_pair is not None:
        second = tokenizer.encode(example.text_pair) if text_ids is None else list(text_ids[1])
    fixed = len(prefix) + len(suffix) + len(mask_slot) + (len(separator) if second is not None else 0) + reserve
    truncated = False
    if max_length is not None:
        budget = max_length - fixed
        if budget < 1:
            raise UserError(f"the model's {max_length} positions leave no room for text after {fixed} fixed positions; use a shorter prompt")
        first, second, truncated = _truncate(first, second, budget)

    ids, types, text = list(prefix), [0] * len(prefix), [0] * len(prefix)
    ids += first
    types += [0] * len(first)
    text += [1] * len(first)
    between = None
    if second is not None:
        ids += separator
        types += [0] * len(separator)
        text += [0] * len(separator)
        between = len(ids)
        ids += second
        types += [1] * len(second)
        text += [1] * len(second)
    end = len(ids)  # right after the text: where a "back" insertion goes
    answer = -1
    if mask_slot:
        answer = len(ids)
        ids += mask_slot
        types += [types[-1] if types else 0] * len(mask_slot)
        text += [0] * len(mask_slot)
    last_type = types[-1] if types else 0
    ids += suffix
    types += [last_type] * len(suffix)
    text += [0] * len(suffix)
    marks = {"start": 0, "between": between, "end": end}
    return EncodedExample(ids, types, text, answer, marks, [-1] * len(ids), label, truncated)


def encode_examples(
    tokenizer, config: ModelConfig, examples: Sequence[Example], labels: LabelSet, *, mode: str,
    max_length: int | None, reserve: int = 0,
) -> tuple[list[EncodedExample], int]:
    """`encode_example` over many examples, tokenizing in one batch; returns (rows, number truncated)."""
    firsts = tokenizer.encode_many([ex.text for ex in examples])
    pairs = [ex.text_pair for ex in examples if ex.text_pair is not None]
    seconds = iter(tokenizer.encode_many(pairs)) if pairs else iter(())
    rows = []
    for ex, first in zip(examples, firsts):
        second = next(seconds) if ex.text_pair is not None else None
        rows.append(encode_example(tokenizer, config, ex, labels.index(ex.label), mode=mode, max_length=max_length,
                                   reserve=reserve, text_ids=(first, second)))
    return rows, sum(row.truncated for row in rows)


BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "text_mask", "virtual", "answer", "labels")


def collate(rows: Sequence[EncodedExample], pad_id: int) -> dict[str, Tensor]:
    """Right-padded LongTensors (see the module docstring); decoder-only models read their
    answer after the last real position, which right padding leaves in place."""
    width = max(1, max(len(r.ids) for r in rows))
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    types = torch.zeros((b, width), dtype=torch.long)
    text = torch.zeros((b, width), dtype=torch.long)
    virtual = torch.full((b, width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids, dtype=torch.long)
        mask[i, :n] = 1
        types[i, :n] = torch.tensor(r.token_types, dtype=torch.long)
        text[i, :n] = torch.tensor(r.text_mask, dtype=torch.long)
        virtual[i, :n] = torch.tensor(r.virtual, dtype=torch.long)
    answer = torch.tensor([r.answer for r in rows], dtype=torch.long)
    labels = torch.tensor([r.label for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "text_mask": text,
            "virtual": virtual, "answer": answer, "labels": labels}


def eval_batches(rows: Sequence[EncodedExample], batch_size: int, pad_id: int) -> Iterator[dict[str, Tensor]]:
    """Length-sorted batches (little padding); each carries "index", the rows' positions in `rows`."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([rows[i] for i in chunk], pad_id)
        batch["index"] = torch.tensor(chunk, dtype=torch.long)
        yield batch


def subsample(examples: list, limit: int | None, seed: int) -> list:
    """A reproducible random subset of at most `limit` examples (all of them when None)."""
    if limit is None or len(examples) <= limit:
        return examples
    picked = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in picked]


class TrainBatches(EpochBatches):
    """Shuffled training batches over epochs, resumable at an exact position.

    Epoch e visits the rows in an order shuffled by (seed, e); `state_dict()` ({"epoch",
    "position"} of the next batch) is all a restarted run needs (the training core's contract).
    The last partial batch of an epoch is dropped so every step sees `batch_size` rows.
    `epochs=None` repeats forever.
    """

    def __init__(self, rows: Sequence[EncodedExample], batch_size: int, pad_id: int, *, seed: int = 0, epochs: int | None = None):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if len(rows) < batch_size:
            raise UserError(f"the training set has {len(rows)} examples, fewer than the batch size {batch_size}")
        self.rows, self.batch_size, self.pad_id, self.seed, self.epochs = rows, batch_size, pad_id, seed, epochs
        self.epoch, self.position = 0, 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order): one shuffle per epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.rows) // self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self)

    def batch_at(self, epoch: int, position: int) -> dict[str, Tensor]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._order = (epoch, order)
        chunk = self._order[1][position * self.batch_size : (position + 1) * self.batch_size]
        return collate([self.rows[i] for i in chunk], self.pad_id)


# =============================================================================================
# Scoring
# =============================================================================================


class LinearHead(nn.Module):
    """Pooled hidden state -> class logits (mean over text positions, or the last text position)."""

    def __init__(self, d_model: int, n_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.proj = nn.Linear(d_model, n_classes)
        nn.init.normal_(self.proj.weight, std=d_model**-0.5)
        nn.init.zeros_(self.proj.bias)

    def pool(self, hidden: Tensor, text_mask: Tensor) -> Tensor:
        weights = text_mask.to(hidden.dtype)
        if self.pooling == "last":
            last = (torch.arange(text_mask.shape[1], device=text_mask.device) * text_mask).argmax(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)

    def forward(self, hidden: Tensor, text_mask: Tensor) -> Tensor:
        return self.proj(self.pool(hidden, text_mask))


class Scorer(nn.Module):
    """Class logits [B, C] from a backbone, by label words (LM head) or by a linear head."""

    def __init__(self, model: nn.Module, *, label_ids: list[list[int]] | None = None, head: LinearHead | None = None) -> None:
        super().__init__()
        if (label_ids is None) == (head is None):
            raise ValueError("give either label_ids (LM scoring) or a head")
        self.model = model
        self.head = head
        config = model.config
        self.arch = config.arch
        if head is None:
            if model.lm_head is None:
                raise UserError("this model has no LM head to score label words with; use a linear head", option="head")
            if self.arch != "encoder-decoder" and any(len(ids) != 1 for ids in label_ids):
                long = [i for i, ids in enumerate(label_ids) if len(ids) != 1]
                raise UserError(f"{self.arch}-only models score single-token label words; {len(long)} label word(s) "
                                "take several tokens: give label words of one token each (or use a linear head)", option="verbalizer")
        self.label_ids = label_ids

    def hidden_states(self, batch: Mapping[str, Tensor], inputs_embeds: Tensor | None = None) -> Tensor:
        ids = None if inputs_embeds is not None else batch["input_ids"]
        if self.arch == "decoder":
            return self.model.decode(ids, attention_mask=batch["attention_mask"], inputs_embeds=inputs_embeds)
        types = batch["token_type_ids"] if self.arch == "encoder" else None
        return self.model.encode(ids, batch["attention_mask"], types, inputs_embeds=inputs_embeds)

    def forward(self, batch: Mapping[str, Tensor], inputs_embeds: Tensor | None = None) -> Tensor:
        hidden = self.hidden_states(batch, inputs_embeds)
        if self.head is not None:
            return self.head(hidden, batch["text_mask"])
        if self.arch == "encoder-decoder":
            return self._decoder_scores(hidden, batch["attention_mask"])
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        # Decoder-only models predict the label word after their last (right-padded) position.
        where = batch["attention_mask"].sum(1) - 1 if self.arch == "decoder" else batch["answer"]
        logits = self.model.logits(hidden[rows, where]).float().log_softmax(-1)
        first = torch.tensor([ids[0] for ids in self.label_ids], device=logits.device)
        return logits[:, first]

    def _decoder_scores(self, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Sum of log p(label word tokens) with the decoder fed [start] + the word, per class."""
        config = self.model.config
        b, c = memory.shape[0], len(self.label_ids)
        width = max(len(ids) for ids in self.label_ids)
        device = memory.device
        targets = torch.full((c, width), -1, dtype=torch.long, device=device)
        inputs = torch.full((c, width), config.pad_token_id, dtype=torch.long, device=device)
        for k, ids in enumerate(self.label_ids):
            targets[k, : len(ids)] = torch.tensor(ids, device=device)
            inputs[k, 0] = config.start_token_id
            inputs[k, 1 : len(ids)] = torch.tensor(ids[:-1], device=device)
        # Every class's word is decoded against every example: [B * C] rows sharing a memory.
        memory_rows = memory.repeat_interleave(c, dim=0)
        mask_rows = memory_mask.repeat_interleave(c, dim=0)
        hidden = self.model.decode(inputs.repeat(b, 1), memory=memory_rows, memory_mask=mask_rows)
        logp = self.model.logits(hidden).float().log_softmax(-1)  # [B*C, W, V]
        tgt = targets.repeat(b, 1)
        picked = logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt >= 0)
        return picked.sum(-1).view(b, c)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels)


# =============================================================================================
# Metrics
# =============================================================================================


def accuracy_and_macro_f1(predictions: Sequence[int], labels: Sequence[int], n_classes: int) -> dict[str, float]:
    """Accuracy and the unweighted mean of per-class F1 (a class absent from both counts as 0)."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    tp = [0] * n_classes
    fp = [0] * n_classes
    fn = [0] * n_classes
    correct = 0
    for p, y in zip(predictions, labels):
        if p == y:
            correct += 1
            tp[y] += 1
        else:
            fp[p] += 1
            fn[y] += 1
    f1 = [2 * tp[k] / (2 * tp[k] + fp[k] + fn[k]) if (2 * tp[k] + fp[k] + fn[k]) else 0.0 for k in range(n_classes)]
    return {"accuracy": correct / len(labels), "macro_f1": sum(f1) / n_classes}


@torch.no_grad()
def evaluate(
    classify: Callable[[dict[str, Tensor]], Tensor], batch_iter: Iterable[dict[str, Tensor]], n_classes: int, *,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1 and mean loss of `classify(batch) -> class logits` over labelled
    batches (from `eval_batches`); "predictions" come back in the rows' original order.
    The caller puts its module in eval mode."""
    predictions: dict[int, int] = {}
    gold: dict[int, int] = {}
    loss_sum, n = 0.0, 0
    for batch in batch_iter:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        logits = classify(batch)
        labels = batch["labels"]
        index = batch["index"].tolist() if "index" in batch else list(range(n, n + len(labels)))
        for i, p, y in zip(index, logits.argmax(-1).tolist(), labels.tolist()):
            predictions[i], gold[i] = p, y
        if bool((labels >= 0).all()):
            loss_sum += float(classification_loss(logits, labels)) * len(labels)
        n += len(labels)
    order = sorted(predictions)
    out: dict[str, Any] = {"examples": n, "predictions": [predictions[i] for i in order]}
    truth = [gold[i] for i in order]
    if truth and all(y >= 0 for y in truth):
        out.update(accuracy_and_macro_f1(out["predictions"], truth, n_classes))
        out["loss"] = loss_sum / n
    return out
