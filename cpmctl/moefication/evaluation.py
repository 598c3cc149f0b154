"""Measuring a MoEfied model against its dense parent: router recall and executed compute per
layer, held-out embedding cosine or perplexity, and task accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cpmctl import task_model, tasks
from cpmctl.errors import UserError
from cpmctl.generate import embed
from cpmctl.losses import lm_loss
from cpmctl.moefication.batches import length_sorted, lm_targets, model_inputs, real_tokens
from cpmctl.moefication.routers import recall
from cpmctl.prompt import encode_for


class RecallMeter:
    """Forward hooks on MoE layers: per layer, mean router recall over real tokens and executed
    compute (token-expert pairs x d_e over tokens x d_ff)."""

    def __init__(self, moes: dict[str, Any], d_ff: int) -> None:
        self.moes, self.d_ff = moes, d_ff
        self.sums = {name: [0.0, 0] for name in moes}
        self.keep = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in moes.items()]
        for m in moes.values():
            m.counts = [0, 0]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            keep = self.keep.get(name.split(".")[0])
            if keep is not None and keep.numel() == x.shape[0]:
                x = x[keep.reshape(-1)]
            with torch.no_grad():
                selected, _ = module.route(x)
                r = recall(module.expert_scores(x), selected)
            self.sums[name][0] += float(r.sum())
            self.sums[name][1] += r.numel()

        return hook

    def results(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, m in self.moes.items():
            total, count = self.sums[name]
            tokens, pairs = m.counts
            out[name] = {
                "recall": round(total / max(1, count), 4),
                "compute_fraction": round(pairs * m.expert_size / max(1, tokens * self.d_ff), 4),
                "experts": m.num_experts, "top_k": m.top_k,
            }
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def evaluate(model, rows: list[list[int]], batch_size: int, meter: RecallMeter | None = None) -> dict[str, Any]:
    """Sentence embeddings (encoders) or LM loss (models with an LM head) on held-out rows."""
    config = model.config
    embeddings, loss_sum, loss_count = [], 0.0, 0
    with torch.no_grad():
        for batch in length_sorted(rows, batch_size):
            inputs = model_inputs(config, batch)
            if meter is not None:
                meter.keep = {stack: real_tokens(stack, inputs) for stack in ("encoder", "decoder")}
            if config.arch == "encoder":
                embeddings.append((batch, embed(model, inputs["input_ids"], inputs["attention_mask"])))
                continue
            logits, labels = lm_targets(config, model(**inputs), inputs)
            n = int((labels != -100).sum())
            loss_sum += float(lm_loss(logits, labels)) * n
            loss_count += n
    if config.arch == "encoder":
        # Back to the original row order so dense and MoE vectors pair up.
        vectors = {}
        for batch, vecs in embeddings:
            for row, vec in zip(batch, vecs):
                vectors.setdefault(tuple(row), vec)
        return {"embeddings": torch.stack([vectors[tuple(r)] for r in rows])}
    return {"loss": loss_sum / max(1, loss_count), "perplexity": math.exp(min(50.0, loss_sum / max(1, loss_count)))}


def quality(dense: dict[str, Any], moe: dict[str, Any]) -> dict[str, Any]:
    """Dense vs MoE on held-out documents: embedding cosine (encoders) or perplexity."""
    if "embeddings" in dense:
        cos = F.cosine_similarity(dense["embeddings"], moe["embeddings"], dim=-1)
        return {"metric": "embedding cosine", "mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}
    return {
        "metric": "perplexity", "dense_perplexity": round(dense["perplexity"], 4), "moe_perplexity": round(moe["perplexity"], 4),
        "perplexity_increase": round(moe["perplexity"] / dense["perplexity"] - 1, 5),
    }


@dataclass
class TaskSet:
    """A task file encoded for this model, and how its classes are scored."""

    path: Path
    rows: list          # tasks.EncodedExample, one per example
    labels: Any         # tasks.LabelSet
    scoring: str        # "lm": label words by the LM head; "linear": the checkpoint's own task head
    label_ids: list[list[int]] | None
    head: Any           # tasks.LinearHead (linear scoring) or None
    pad_id: int


def _task_model(given: Path, checkpoint: Path) -> task_model.TaskModel | None:
    """The task model (head, labels, words, scoring) when the checkpoint carries a task head or
    label words (distill's task.json, or a `prompt-tune --full` output), else None."""
    if not (checkpoint / task_model.TASK_FILE).is_file() and checkpoint == given:
        return None
    return task_model.load_task_model(given)


def load_task_set(task: Path, model, given: Path, checkpoint: Path, tok, *, verbalizer: Path | None = None,
                  max_examples: int | None = None, seed: int = 0) -> TaskSet:
    """Read, label and encode a task file before any work, so a bad file costs nothing.

    Classes are scored as the checkpoint was trained to: by its linear task head when it carries
    one; otherwise by the log-probability of each label word (the `verbalizer` file, else the task
    model's words, else the label itself) under the LM head. An encoder-only model with neither
    has nothing that could answer the task (its pooled embeddings are not class scores).
    `given` is the directory the user named, `checkpoint` the model directory inside it."""
    if tok is None:
        raise UserError(f"checkpoint {checkpoint} has no tokenizer/ to read the task file {task}", option="task")
    examples = tasks.subsample(tasks.load_examples(task), max_examples, seed)
    verbalizer_path, verbalizer = verbalizer, (tasks.load_verbalizer(verbalizer) if verbalizer else None)
    found = _task_model(given, checkpoint)
    head = None
    if found is not None and found.head is not None:
        if verbalizer is not None:
            raise UserError(f"label words ({verbalizer_path}) are for LM scoring, but {given} scores its task with a linear head",
                          option="verbalizer")
        labels = tasks.LabelSet(tuple(found.labels), tuple(found.words))
        head = found.head.float().eval()
        scoring = "linear"
    else:
        if model.lm_head is None:
            raise UserError(
                f"scoring a task needs class scores, and {given} has neither an LM head (to score label words) nor a task "
                "head: give a task model (a distilled student, or a model fully fine-tuned with a linear head) fine-tuned on "
                "this task", option="task"
            )
        if verbalizer is None and found is not None and found.labels is not None:
            verbalizer = dict(zip(found.labels, found.words))
        labels = tasks.LabelSet.from_examples(examples, verbalizer)
        scoring = "lm"
    label_ids = tasks.label_token_ids(tok, labels.words) if scoring == "lm" else None
    rows = encode_for(tok, model.config, examples, labels, scoring=scoring, plan=None, max_length=None, what="task")
    tasks.Scorer(model, label_ids=label_ids, head=head)  # refuses label words it cannot score, now
    return TaskSet(Path(task), rows, labels, scoring, label_ids, head, tok.pad_id)


def evaluate_task(model, task: TaskSet, batch_size: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and predictions of `model` on the task (tasks.evaluate)."""
    scorer = tasks.Scorer(model, label_ids=task.label_ids, head=task.head).eval()
    return tasks.evaluate(scorer, tasks.eval_batches(task.rows, batch_size, task.pad_id), len(task.labels))


def task_quality(task: TaskSet, dense: dict[str, Any], moe: dict[str, Any]) -> dict[str, Any]:
    """Dense vs MoE accuracy and macro-F1 on the task, and how often they predict the same class."""
    agree = sum(a == b for a, b in zip(dense["predictions"], moe["predictions"])) / max(1, len(dense["predictions"]))
    return {
        "file": str(task.path), "examples": dense["examples"], "classes": len(task.labels), "scoring": task.scoring,
        "dense_accuracy": dense["accuracy"], "moe_accuracy": moe["accuracy"],
        "dense_macro_f1": dense["macro_f1"], "moe_macro_f1": moe["macro_f1"], "agreement": agree,
    }


def quality_at_ratios(model, moes: dict[str, Any], ratios: list[float], d_ff: int, *, rows: list[list[int]],
                      dense_eval: dict[str, Any] | None, task: TaskSet | None, dense_task: dict[str, Any] | None,
                      batch_size: int, calibration=None) -> list[dict[str, Any]]:
    """Dense vs MoE quality with each fraction of experts per token in `ratios`: the same experts,
    routers and fill, only each layer's k changes (routers score every expert; k picks how many
    run), and every layer's k is put back afterwards. Per ratio: k, the executed FFN compute
    fraction, held-out quality (when `rows`) and task accuracy (when `task`).

    `calibration` (a calibration.PerRatioCalibration, when the run calibrated): calibrated
    down projections are tuned to one k, so at any other k they are calibrated again for that k
    from the same uncalibrated experts, as a separate run at that ratio would be; the written
    k's weights are put back afterwards. Each figure is then the one a separate run reports."""
    from cpmctl.moefication.routers import top_k_for

    kept = {name: moe.top_k for name, moe in moes.items()}
    results = []
    try:
        for ratio in ratios:
            entry: dict[str, Any] = {"ratio": ratio}
            for moe in moes.values():
                moe.top_k = top_k_for(moe.num_experts, top_k=None, ratio=ratio)
                moe.counts = [0, 0]
            ks = {moe.top_k for moe in moes.values()}
            entry["top_k"] = ks.pop() if len(ks) == 1 else sorted(ks)
            if calibration is not None:
                recalibrated = calibration.prepare(written=all(moe.top_k == kept[name] for name, moe in moes.items()))
                if recalibrated is not None:
                    entry["calibration"] = recalibrated
                for moe in moes.values():
                    moe.counts = [0, 0]
            if rows:
                entry["quality"] = quality(dense_eval, evaluate(model, rows, batch_size))
            if task is not None:
                entry["task"] = task_quality(task, dense_task, evaluate_task(model, task, batch_size))
            tokens = sum(m.counts[0] for m in moes.values())
            pairs_neurons = sum(m.counts[1] * m.expert_size for m in moes.values())
            entry["compute_fraction"] = (round(pairs_neurons / (tokens * d_ff), 4) if tokens else
                                         round(sum(m.top_k * m.expert_size for m in moes.values()) / (len(moes) * d_ff), 4))
            results.append(entry)
    finally:
        for name, moe in moes.items():
            moe.top_k = kept[name]
        if calibration is not None:
            calibration.restore()
    return results
