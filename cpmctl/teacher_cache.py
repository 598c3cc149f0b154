"""The top-K teacher cache of LM distillation, shared by `cpmctl pretrain --teacher-cache` (knowledge
inheritance) and `cpmctl distill --data --teacher-cache` (MixKD on a corpus).

The teacher runs once over the first `micro_batches` batches of a deterministic `cpmctl.data`
batch stream and its top-K logits at every target position are stored (memory-mapped .npy):

    DIR/ids.npy      int32   [M, K]   token ids of the K largest teacher logits, entry per target
    DIR/logits.npy   float32 [M, K]   those logits (any temperature follows from them)
    DIR/rows.npy     int64   [R + 1]  entries of global row r are [rows[r], rows[r+1]), row-major
    DIR/meta.json    {format, version, micro_batches, batch_size, entries, fingerprint, flops, tokens}

The fingerprint names everything the cached targets depend on (teacher weights, tokenizer, data,
objective, batch layout, seed, K); a cache built for anything else is refused, never reused.
`CachedTeacherBatches` replays the stream with `teacher_ids`/`teacher_logits` [B, T, K] attached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory, verify_checksums, write_checksums
from cpmctl.losses import lm_forward, teacher_topk
from cpmctl.training import default_tokens, forward_flops_per_token

CACHE_FORMAT = "cpmctl-teacher-cache"


class CachedTeacherBatches:
    """Wraps a batch stream: micro-batch j (counted from the start of the data) gets the cached
    teacher top-K as `teacher_ids`/`teacher_logits` [B, T, K] (zeros off target positions);
    past the cache's end batches pass through unchanged. Resumable like the batches it wraps."""

    def __init__(self, batches, cache_dir: Path):
        cache_dir = Path(cache_dir)
        self.batches = batches
        self.ids = np.load(cache_dir / "ids.npy", mmap_mode="r")
        self.logits = np.load(cache_dir / "logits.npy", mmap_mode="r")
        self.rows = np.load(cache_dir / "rows.npy", mmap_mode="r")
        self.meta = json.loads((cache_dir / "meta.json").read_text())
        self.index = 0

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.batches.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["inner"])
        self.index = int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.batches)
        j, self.index = self.index, self.index + 1
        if j < self.meta["micro_batches"]:
            batch.update(cached_topk(batch["labels"], self.ids, self.logits, self.rows, j * self.meta["batch_size"]))
        return batch


def cached_topk(labels: torch.Tensor, ids: np.ndarray, logits: np.ndarray, rows: np.ndarray, first_row: int) -> dict[str, torch.Tensor]:
    """Scatter the cache entries of rows first_row.. into [B, T, K] tensors aligned with labels."""
    b, t = labels.shape
    k = ids.shape[1]
    start, stop = int(rows[first_row]), int(rows[first_row + b])
    mask = labels != -100
    if int(mask.sum()) != stop - start:
        raise UserError("the teacher cache does not match the data (target counts differ); rebuild it")
    out_ids = torch.zeros(b, t, k, dtype=torch.long)
    out_logits = torch.zeros(b, t, k, dtype=torch.float32)
    out_ids[mask] = torch.from_numpy(np.asarray(ids[start:stop], dtype=np.int64))
    out_logits[mask] = torch.from_numpy(np.array(logits[start:stop], dtype=np.float32))
    return {"teacher_ids": out_ids, "teacher_logits": out_logits}


def cache_fingerprint(teacher_hash: str | None, data_batches, k: int, **settings: Any) -> dict[str, Any]:
    """What the cached targets depend on: the teacher's content hash, the data (tokenizer, size,
    objective), K, and the caller's batch-layout `settings` (seq_len, batch_size, seed, ...)."""
    shards = data_batches.sequences.shards
    return {"teacher_content_hash": teacher_hash, "tokenizer_hash": shards.tokenizer_hash,
            "data_tokens": shards.num_tokens, "objective": data_batches.objective, **settings, "k": k,
            "temperature_free": True}


def build_teacher_cache(out: Path, teacher: torch.nn.Module, batches, micro_batches: int, k: int,
                        fingerprint: dict[str, Any], device: torch.device, student_vocab: int) -> dict[str, Any]:
    """Run the teacher over the first `micro_batches` batches of `batches` (a fresh stream, the
    one training will replay) and write the cache to `out` atomically; returns its meta."""
    ids_parts, logit_parts, counts = [], [], []
    tokens = 0
    teacher = teacher.to(device)
    with torch.no_grad():
        for _ in range(micro_batches):
            batch = next(batches)
            tokens += default_tokens(batch)
            labels = batch["labels"]
            logits = lm_forward(teacher, {k_: v.to(device) for k_, v in batch.items()}).cpu()
            mask = labels != -100
            top_ids, top_logits = teacher_topk(logits[mask], k, student_vocab)
            ids_parts.append(top_ids.to(torch.int32).numpy())
            logit_parts.append(top_logits.numpy())
            counts.extend(mask.sum(1).tolist())
    rows = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flops = forward_flops_per_token(teacher) * tokens
    meta = {"format": CACHE_FORMAT, "version": 1, "micro_batches": micro_batches, "batch_size": int(len(counts) // max(micro_batches, 1)),
            "entries": int(rows[-1]), "fingerprint": fingerprint, "flops": flops, "tokens": tokens}
    with atomic_directory(out, overwrite=False) as tmp:
        np.save(tmp / "ids.npy", np.concatenate(ids_parts))
        np.save(tmp / "logits.npy", np.concatenate(logit_parts))
        np.save(tmp / "rows.npy", rows)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_checksums(tmp, ["ids.npy", "logits.npy", "rows.npy", "meta.json"])
    return meta


def check_cache(path: Path, fingerprint: dict[str, Any], micro_batches: int) -> dict[str, Any]:
    """The cache's meta, or a UserError when `path` is no cache, a stale one (another fingerprint)
    or one too short for `micro_batches`."""
    path = Path(path)
    if (path / "meta.json").is_file():
        verify_checksums(path, "teacher cache")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path} exists but is not a teacher cache; choose another cache path", option="teacher_cache") from None
    if meta.get("format") != CACHE_FORMAT:
        raise UserError(f"{path} is not a teacher cache; choose another cache path", option="teacher_cache")
    if meta["fingerprint"] != fingerprint:
        keys = set(fingerprint) | set(meta["fingerprint"])
        diff = sorted(k for k in keys if meta["fingerprint"].get(k) != fingerprint.get(k))
        raise UserError(f"teacher cache {path} was built for other settings ({', '.join(diff)} differ); use a new path")
    if meta["micro_batches"] < micro_batches:
        raise UserError(f"teacher cache {path} covers {meta['micro_batches']} batches, this run needs {micro_batches}; use a new path")
    return meta
