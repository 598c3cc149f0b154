"""Task models on disk: a checkpoint with a task head or label words beside it.

A task model is what `cpmctl distill` writes (OUT/checkpoint: a regular checkpoint plus
task.json, and head.safetensors for a linear head) or what `cpmctl prompt-tune --full` writes
(OUT/model beside a prompt-free adapter holding labels and head). Distillation reads teachers and
students this way, MoEfication carries the head along and scores tasks with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cpmctl.checkpoint import SafetensorsFile, content_hash, load_model, save_checkpoint_with, write_safetensors
from cpmctl.errors import UserError
from cpmctl.plan import is_assumed
from cpmctl.prompt import load_adapter
from cpmctl.tasks import LinearHead
from cpmctl.tokenizer import load_tokenizer

TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"
MODEL_DIR = "checkpoint"
PROMPT_TUNE_MODEL_DIR = "model"          # cpmctl prompt-tune --full writes OUT/model + an adapter in OUT
TASK_FORMAT = "cpmctl-task-model"


@dataclass
class TaskModel:
    """A loaded task model (see the module docstring)."""

    path: Path                       # the checkpoint directory
    model: nn.Module
    head: nn.Module | None
    labels: tuple[str, ...] | None
    words: tuple[str, ...] | None
    pooling: str
    tokenizer_hash: str | None
    identity: str                    # content hash of backbone and head: keys the logits cache
    scoring: str = "linear"          # how task.json says its classes are scored: linear | lm


def resolve_task_model(path: Path) -> Path:
    """A task model directory, a run directory holding one (OUT/checkpoint), the output of
    `cpmctl prompt-tune --full` (OUT/model beside its adapter), or a plain checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"teacher {path} does not exist")
    for inner in (MODEL_DIR, PROMPT_TUNE_MODEL_DIR):
        if (path / inner / "config.json").is_file():
            return path / inner
    return path


def load_task_model(path: Path) -> TaskModel:
    """The model, its head (None for label-word scoring or a plain checkpoint), labels and words
    of what `resolve_task_model(path)` finds, with the identity that keys a teacher-logits cache."""
    given = Path(path)
    path = resolve_task_model(given)
    model, ckpt = load_model(path)
    head_state, labels, words, pooling, scoring = None, None, None, "mean", "linear"
    task_file = path / TASK_FILE
    if task_file.is_file():
        try:
            task = json.loads(task_file.read_text())
            labels, words, pooling = tuple(task["labels"]), tuple(task["words"]), task["pooling"]
            scoring = task.get("scoring", "linear")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{task_file} is not a valid task description ({exc})") from None
        if scoring == "linear":
            st = SafetensorsFile(path / task.get("head", HEAD_FILE))
            head_state = {name: st.get(name).clone() for name in st.names()}
    elif path.name == PROMPT_TUNE_MODEL_DIR and (given / "adapter_config.json").is_file():
        head_state, labels, words, pooling, scoring = _prompt_tune_head(given)
    head = None
    if head_state is not None:
        head = LinearHead(model.config.d_model, len(labels), pooling)
        try:
            head.load_state_dict(head_state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"the task head of {given} does not fit {len(labels)} labels and d_model {model.config.d_model}: {exc}") from None
    weights_hash = ckpt.provenance.get("content_hash") or content_hash(ckpt.state_dict())
    head_hash = content_hash(head.state_dict()) if head is not None else ""
    identity = f"{weights_hash}:{head_hash}"
    return TaskModel(path, model, head, labels, words, pooling, tokenizer_hash(path), identity, scoring)


def _prompt_tune_head(directory: Path):
    """(head state or None, labels, words, pooling, scoring) of a `cpmctl prompt-tune --full`
    output (--head linear: the head; --head lm: the label words alone)."""
    adapter = load_adapter(directory)
    meta = adapter.meta
    if not meta.get("full_fine_tuning") or meta.get("scoring") not in ("linear", "lm") or adapter.prompt.shape[0]:
        raise UserError(f"teacher {directory} is a prompt adapter; distillation takes a fully fine-tuned model "
                        "(full fine-tuning with cpmctl prompt-tune, or a distilled student)")
    labels = tuple(meta["labels"])
    words = tuple(meta["verbalizer"][label] for label in labels)
    if meta["scoring"] == "lm":
        return None, labels, words, "mean", "lm"
    return adapter.head, labels, words, meta["head"]["pooling"], "linear"


def tokenizer_hash(path: Path) -> str | None:
    """The content hash of the checkpoint's tokenizer/ (None without one)."""
    tok_dir = path / "tokenizer"
    return load_tokenizer(tok_dir).content_hash() if tok_dir.is_dir() else None


def save_task_model(out: Path, model: nn.Module, head: nn.Module | None, *, labels=None, words=None, pooling="mean",
                    tokenizer_dir: Path | None, parents, options: dict, metrics: dict) -> dict:
    """Write OUT atomically: the checkpoint files, then task.json (labels, words; scoring "linear"
    with head.safetensors beside it, or "lm" when the LM head scores the label words)."""
    def write_task(tmp: Path) -> None:
        write_task_files(tmp, head.state_dict() if head is not None else None, labels=labels, words=words, pooling=pooling,
                         metrics=metrics)

    return save_checkpoint_with(out, write_task, model.config, model.state_dict(), overwrite=True, tokenizer_dir=tokenizer_dir,
                                stage="distill", parents=parents, options=options, metrics=metrics)


def write_task_files(directory: Path, head_state: dict | None, *, labels, words, pooling: str, metrics: dict) -> None:
    """task.json (labels, words; scoring "linear" with head.safetensors beside it, or "lm" when the
    LM head scores the label words) into `directory`; nothing without labels."""
    if head_state is not None:
        write_safetensors(directory / HEAD_FILE, {k: v.detach().cpu().contiguous() for k, v in head_state.items()})
    if labels is not None:
        task = {"format": TASK_FORMAT, "version": 1, "labels": list(labels), "words": list(words),
                "scoring": "linear" if head_state is not None else "lm", "pooling": pooling,
                "head": HEAD_FILE if head_state is not None else None, "metrics": metrics}
        (directory / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n")


def full_run_task(given: Path):
    """(head state or None, labels, words, pooling) of a `cpmctl prompt-tune --full` output
    directory, or None when `given` is not one (its task then lives in the checkpoint itself)."""
    given = Path(given)
    if not ((given / PROMPT_TUNE_MODEL_DIR / "config.json").is_file() and (given / "adapter_config.json").is_file()):
        return None
    head_state, labels, words, pooling, _ = _prompt_tune_head(given)
    return head_state, labels, words, pooling


def planned_model_dir(path: Path, stand_ins=None) -> Path:
    """resolve_task_model for a dry run: for a path not there yet, a stand-in for the run
    directory's OUT/checkpoint (what an earlier pipeline step's plan gives), else the path."""
    path = Path(path)
    if path.exists():
        return resolve_task_model(path)
    return path / MODEL_DIR if is_assumed(path / MODEL_DIR, stand_ins) else path
