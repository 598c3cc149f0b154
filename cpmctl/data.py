"""Token shards on disk, and the three pre-training objectives that read them.

`prepare` tokenizes a corpus once into a directory of memory-mappable shards:

    index.json          {"format": "cpmctl-token-shards", "version": 1, "dtype": "uint16",
                         "vocab_size": N, "eos_id": 1, "tokenizer_kind": "sentencepiece",
                         "tokenizer_hash": "<sha256>", "total_tokens": T, "total_docs": D,
                         "shards": [{"file": "tokens-00000.bin", "offsets": "docs-00000.npy",
                                     "tokens": t, "docs": d}, ...],
                         "source": "/abs/corpus.txt", "source_format": "text" | "jsonl",
                         "field": "text" | null, "source_bytes": B}
    tokens-00000.bin    the shard's token ids back to back, raw little-endian uint16 (uint32 when
                        the vocabulary has more than 65536 ids); every document ends with eos
    docs-00000.npy      int64 offsets, one more than the shard's documents: document i of the
                        shard is tokens[offsets[i]:offsets[i + 1]]

A document never straddles two shards. `TokenShards` opens such a directory lazily.

The objectives are pure functions of a token array and an explicit `np.random.Generator`:
`span_corruption` (T5/CPM-2), `mlm_mask` (BERT) and `causal_lm`. `Batches` packs the token
stream into fixed-length chunks, applies an objective and collates torch batches; its state is
(epoch, position), enough to resume at the exact batch an interrupted run would have produced.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import bisect
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from cpmctl.corpus import DocumentReader
from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory

if TYPE_CHECKING:
    import torch

    from cpmctl.tokenizer import Tokenizer

FORMAT = "cpmctl-token-shards"
VERSION = 1
INDEX_FILE = "index.json"
IGNORE_INDEX = -100  # the label torch's cross-entropy skips
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# -- prepare ------------------------------------------------------------------------------------
class _Progress:
    """A rich bar by bytes when stdout is a terminal, else a plain line every tenth of the file."""

    def __init__(self, enabled: bool, total_bytes: int, label: str):
        self.enabled = enabled
        self.total = max(total_bytes, 1)
        self.label = label
        self._bar = None
        self._next_report = 0.1
        self._started = time.monotonic()
        if enabled and sys.stdout.isatty():
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(label, total=self.total)
            self._bar.start()

    def update(self, done_bytes: int, docs: int, tokens: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done_bytes, description=f"{self.label}: {tokens:,} tokens")
            return
        fraction = done_bytes / self.total
        if fraction >= self._next_report:
            while self._next_report <= fraction:
                self._next_report += 0.1
            print(f"{self.label}: {fraction:.0%} of {self.total / 1e6:.1f} MB, {docs:,} documents, "
                  f"{tokens:,} tokens, {time.monotonic() - self._started:.1f}s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class _ShardWriter:
    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory = directory
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh = None
        self._offsets: list[int] = []

    def _open(self) -> None:
        name = f"tokens-{len(self.shards):05d}.bin"
        self._fh = open(self.directory / name, "wb")
        self._offsets = [0]
        self.shards.append({"file": name, "offsets": f"docs-{len(self.shards):05d}.npy", "tokens": 0, "docs": 0})

    def add(self, ids: list[int]) -> None:
        shard = self.shards[-1] if self.shards else None
        # A document goes whole into one shard; one longer than a shard gets a shard of its own.
        if shard is None or (shard["tokens"] and shard["tokens"] + len(ids) > self.shard_tokens):
            self._close()
            self._open()
            shard = self.shards[-1]
        self._fh.write(np.asarray(ids, dtype=self.dtype).tobytes())
        shard["tokens"] += len(ids)
        shard["docs"] += 1
        self._offsets.append(shard["tokens"])

    def _close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        np.save(self.directory / self.shards[-1]["offsets"], np.asarray(self._offsets, dtype=np.int64))

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def prepare(corpus_path: str | os.PathLike, tokenizer: "Tokenizer", out_dir: str | os.PathLike, *,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, field: str = "text", progress: bool = True,
            overwrite: bool = False, batch_lines: int = 1024) -> dict[str, Any]:
    """Tokenize a corpus into token shards in `out_dir`; returns the index (see module docstring).

    Plain text holds one document per line (blank lines skipped); a `.jsonl`/`.json` file holds
    one JSON object per line with the text under `field`. The file is streamed `batch_lines`
    lines at a time, each document gets eos appended, and the directory appears only complete.
    """
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if tokenizer.eos_id is None:
        raise UserError("the tokenizer has no end-of-sequence token to separate documents")
    reader = DocumentReader(corpus_path, field=field)
    dtype = token_dtype(tokenizer.vocab_size)
    bar = _Progress(progress, reader.total_bytes, f"prepare {reader.path.name}")
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            writer = _ShardWriter(tmp, dtype, shard_tokens)
            docs = tokens = 0
            batch: list[str] = []

            def flush() -> None:
                nonlocal docs, tokens
                for ids in tokenizer.encode_many(batch, add_eos=True):
                    writer.add(ids)
                    tokens += len(ids)
                docs += len(batch)
                batch.clear()
                bar.update(reader.bytes_read, docs, tokens)

            for _, text in reader:
                batch.append(text)
                if len(batch) >= batch_lines:
                    flush()
            if batch:
                flush()
            if docs == 0:
                raise UserError(f"corpus {reader.path} has no documents (every line is blank)")
            index = {
                "format": FORMAT, "version": VERSION, "dtype": dtype.name,
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "tokenizer_kind": tokenizer.kind, "tokenizer_hash": tokenizer.content_hash(),
                "total_tokens": tokens, "total_docs": docs, "shards": writer.finish(),
                "source": str(reader.path.resolve()), "source_format": "jsonl" if reader.jsonl else "text",
                "field": field if reader.jsonl else None, "source_bytes": reader.total_bytes,
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    finally:
        bar.close()
    return index


# -- reading shards -----------------------------------------------------------------------------
class TokenShards:
    """A prepared token-shard directory; shards are memory-mapped on first use."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise UserError(f"{self.directory} is not a token-shard directory (no {INDEX_FILE}); run prepare first")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            fmt, version = index["format"], index["version"]
            self.dtype = np.dtype(index["dtype"])
            self.shard_info = list(index["shards"])
            self.vocab_size = int(index["vocab_size"])
            self.tokenizer_hash = str(index["tokenizer_hash"])
            self.eos_id = index.get("eos_id")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{index_path} is corrupt ({exc}); run prepare again") from None
        if fmt != FORMAT or version != VERSION:
            raise UserError(f"{index_path} is {fmt} version {version}; this cpmctl reads {FORMAT} version {VERSION}")
        self.index = index
        for shard in self.shard_info:
            path = self.directory / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise UserError(f"shard {path} is missing or not {expected} bytes; run prepare again")
        self._doc_starts = np.cumsum([0] + [s["docs"] for s in self.shard_info]).tolist()
        self._token_starts = np.cumsum([0] + [s["tokens"] for s in self.shard_info]).tolist()
        self._tokens: list[np.ndarray | None] = [None] * len(self.shard_info)
        self._offsets: list[np.ndarray | None] = [None] * len(self.shard_info)

    def __len__(self) -> int:
        return self._doc_starts[-1]

    @property
    def num_tokens(self) -> int:
        return self._token_starts[-1]

    def shard_tokens(self, k: int) -> np.ndarray:
        if self._tokens[k] is None:
            self._tokens[k] = np.memmap(self.directory / self.shard_info[k]["file"], dtype=self.dtype,
                                        mode="r", shape=(self.shard_info[k]["tokens"],))
        return self._tokens[k]

    def _shard_offsets(self, k: int) -> np.ndarray:
        if self._offsets[k] is None:
            offsets = np.load(self.directory / self.shard_info[k]["offsets"], mmap_mode="r")
            if offsets.shape != (self.shard_info[k]["docs"] + 1,):
                raise UserError(f"{self.shard_info[k]['offsets']} in {self.directory} does not match "
                                "index.json; run prepare again")
            self._offsets[k] = offsets
        return self._offsets[k]

    def document(self, i: int) -> np.ndarray:
        """Document i's ids (a read-only view into the memory map), its eos included."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range 0..{len(self) - 1}")
        k = bisect.bisect_right(self._doc_starts, i) - 1
        offsets = self._shard_offsets(k)
        j = i - self._doc_starts[k]
        return self.shard_tokens(k)[offsets[j]:offsets[j + 1]]

    def iter_documents(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.document(i)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Ids [start, stop) of the whole stream (all shards end to end), as int64."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range {start}:{stop} outside 0:{self.num_tokens}")
        parts = []
        k = bisect.bisect_right(self._token_starts, start) - 1
        while start < stop:
            base = self._token_starts[k]
            end = min(stop, self._token_starts[k + 1])
            parts.append(self.shard_tokens(k)[start - base:end - base])
            start, k = end, k + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def sequences(self, seq_len: int, *, split: str = "train", valid_fraction: float = 0.01,
                  seed: int = 0) -> "PackedSequences":
        """The stream cut into consecutive chunks of `seq_len` ids (the tail shorter than one is
        dropped), documents running on across chunk borders with their eos between them.

        A chunk belongs to "valid" when a hash of (seed, chunk index) falls below
        `valid_fraction`, so the held-out set is fixed by the seed alone; with a non-zero
        fraction and at least two chunks it holds at least one chunk, and "train" is the rest.
        """
        if split not in ("train", "valid"):
            raise UserError(f"split must be 'train' or 'valid', got {split!r}")
        if seq_len < 1:
            raise UserError(f"sequence length must be >= 1, got {seq_len}")
        if not 0.0 <= valid_fraction < 1.0:
            raise UserError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        count = self.num_tokens // seq_len
        position = _hash_unit(np.arange(count, dtype=np.uint64), seed)
        valid = position < valid_fraction
        if valid_fraction > 0 and count >= 2 and not valid.any():
            valid[int(np.argmin(position))] = True
        chosen = np.flatnonzero(valid if split == "valid" else ~valid)
        return PackedSequences(self, seq_len, chosen)


def _hash_unit(values: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per value (splitmix64 of value and seed)."""
    with np.errstate(over="ignore"):
        x = values.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class PackedSequences(Sequence):
    """Fixed-length chunks of a token stream; item i is chunk `chunk_ids[i]` as int64 ids."""

    def __init__(self, shards: TokenShards, seq_len: int, chunk_ids: np.ndarray):
        self.shards = shards
        self.seq_len = seq_len
        self.chunk_ids = chunk_ids

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        chunk = int(self.chunk_ids[i])
        return self.shards.tokens(chunk * self.seq_len, (chunk + 1) * self.seq_len)


def check_tokenizer(shards: TokenShards, tokenizer: "Tokenizer") -> None:
    """UserError unless `shards` were prepared with this very tokenizer."""
    if shards.tokenizer_hash != tokenizer.content_hash():
        raise UserError(
            f"token shards in {shards.directory} were made with tokenizer {shards.tokenizer_hash[:12]}, "
            f"not this one ({tokenizer.content_hash()[:12]}); run prepare again with the model's tokenizer"
        )


# -- objectives ---------------------------------------------------------------------------------
def _span_plan(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length`, as T5 counts them."""
    noise = int(round(length * noise_density))
    noise = min(max(noise, 1), length - 1)  # at least one token corrupted, at least one kept
    spans = max(1, int(round(noise / mean_span)))
    return noise, min(spans, noise, length - noise)


def span_corruption_lengths(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(encoder length, decoder length) that `span_corruption` makes of `length` raw tokens."""
    noise, spans = _span_plan(length, noise_density, mean_span)
    return length - noise + spans + 1, noise + spans + 1


def random_spans_helper(inputs_length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(raw chunk length, decoder length) for a wanted encoder length, like T5's helper of the
    same name: the longest raw chunk whose corrupted input fits `inputs_length` (512 -> 568, 114)."""
    if inputs_length < 3:
        raise UserError(f"span corruption needs an encoder length of at least 3, got {inputs_length}")
    length = 2
    while span_corruption_lengths(length + 1, noise_density, mean_span)[0] <= inputs_length:
        length += 1
    return length, span_corruption_lengths(length, noise_density, mean_span)[1]


def _random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive lengths summing to `total`, uniformly over all such compositions."""
    cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1 if parts > 1 else np.zeros(0, np.int64)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def span_corruption(tokens: Sequence[int] | np.ndarray, *, noise_density: float = 0.15, mean_span: float = 3.0,
                    sentinel_ids: Sequence[int], eos_id: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """T5's span corruption: `(inputs, targets)` as int64 arrays.

    round(len * noise_density) tokens are corrupted, in max(1, round(noise / mean_span)) spans;
    noise and kept tokens are each cut into that many non-empty runs at random and interleaved,
    kept first. inputs = kept runs with each noise span replaced by the next sentinel, then eos;
    targets = each sentinel followed by the span it replaced, then eos.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2:
        raise ValueError("span corruption needs at least 2 tokens")
    noise, spans = _span_plan(len(tokens), noise_density, mean_span)
    if spans > len(sentinel_ids):
        raise UserError(f"{spans} noise spans need {spans} sentinel tokens but the tokenizer has "
                        f"{len(sentinel_ids)}; use shorter sequences or a tokenizer with more sentinels")
    noise_lengths = _random_segmentation(noise, spans, rng)
    kept_lengths = _random_segmentation(len(tokens) - noise, spans, rng)
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    start = 0
    for k in range(spans):
        kept_end = start + kept_lengths[k]
        noise_end = kept_end + noise_lengths[k]
        sentinel = np.array([sentinel_ids[k]], dtype=np.int64)
        inputs += [tokens[start:kept_end], sentinel]
        targets += [sentinel, tokens[kept_end:noise_end]]
        start = noise_end
    eos = np.array([eos_id], dtype=np.int64)
    return np.concatenate([*inputs, eos]), np.concatenate([*targets, eos])


def mlm_mask(tokens: Sequence[int] | np.ndarray, *, mask_prob: float = 0.15, mask_id: int, vocab_size: int,
             special_ids: Sequence[int] | set[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking: `(inputs, labels)` as int64 arrays.

    round(mask_prob * candidates) positions (at least one when there are candidates) are drawn
    without replacement among the non-special tokens; of those, 80% become `mask_id`, 10% a
    random non-special token, 10% stay. labels hold the original id at drawn positions, -100
    elsewhere.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    specials = np.fromiter(sorted(special_ids), dtype=np.int64)
    candidates = np.flatnonzero(~np.isin(tokens, specials))
    count = int(round(len(candidates) * mask_prob))
    if mask_prob > 0 and len(candidates):
        count = max(1, count)
    chosen = np.sort(rng.choice(candidates, size=count, replace=False)) if count else np.zeros(0, np.int64)
    action = rng.random(count)
    inputs = tokens.copy()
    labels = np.full_like(tokens, IGNORE_INDEX)
    labels[chosen] = tokens[chosen]
    inputs[chosen[action < 0.8]] = mask_id
    randomized = chosen[(action >= 0.8) & (action < 0.9)]
    inputs[randomized] = _random_ordinary_ids(len(randomized), vocab_size, specials, rng)
    return inputs, labels


def _random_ordinary_ids(count: int, vocab_size: int, specials: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ids = rng.integers(0, vocab_size, size=count)
    # Specials are a handful of a large vocabulary, so redrawing the few hits ends quickly.
    while (bad := np.isin(ids, specials)).any():
        ids[bad] = rng.integers(0, vocab_size, size=int(bad.sum()))
    return ids


def causal_lm(tokens: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) for next-token prediction: labels[t] is the token after inputs[t]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens[:-1], tokens[1:]


# -- collators ----------------------------------------------------------------------------------
def pad_rows(rows: Sequence[Sequence[int] | np.ndarray], value: int, *, left: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ids, attention mask) [rows, width] LongTensors of token rows padded with `value` on the
    right (on the left with `left`, as batched decoding needs); width is at least 1."""
    import torch  # here, not at the top: `cpmctl data prepare` never needs torch

    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) == 0:
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.as_tensor(np.asarray(row, dtype=np.int64))
        mask[i, span] = 1
    return ids, mask


def collate_causal(examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 under padding)."""
    ids, mask = pad_rows([x for x, _ in examples], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": pad_rows([y for _, y in examples], IGNORE_INDEX)[0]}


def collate_mlm(examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 where nothing is predicted)."""
    return collate_causal(examples, pad_id)


def collate_span_corruption(examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int,
                            decoder_start_id: int | None = None) -> dict[str, "torch.Tensor"]:
    """Encoder `input_ids`/`attention_mask`, decoder `labels` (-100 under padding) and the
    teacher-forced `decoder_input_ids` (labels shifted right after the start id, pad by default
    as in T5) with their `decoder_attention_mask`."""
    start = pad_id if decoder_start_id is None else decoder_start_id
    inputs = [x for x, _ in examples]
    targets = [y for _, y in examples]
    decoder_inputs = [np.concatenate([[start], y[:-1]]) for y in targets]
    ids, mask = pad_rows(inputs, pad_id)
    labels, decoder_mask = pad_rows(targets, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "decoder_input_ids": pad_rows(decoder_inputs, pad_id)[0], "decoder_attention_mask": decoder_mask}


# -- batches ------------------------------------------------------------------------------------
class EpochBatches(ABC):
    """Batches addressed by (epoch, position): batch `position` of epoch `epoch` is fixed by those
    numbers (and the subclass's seed) alone, so {"epoch", "position"} of the next batch is the
    whole resumable state (the training core's contract). Subclasses give `batches_per_epoch`
    and `batch_at(epoch, position)`; `epochs=None` repeats forever."""

    epochs: int | None = None
    epoch: int = 0
    position: int = 0

    @property
    @abstractmethod
    def batches_per_epoch(self) -> int: ...

    @abstractmethod
    def batch_at(self, epoch: int, position: int) -> Any: ...

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise UserError(f"data position {state} is outside this data set "
                            f"({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.position = epoch, position

    def __iter__(self) -> "EpochBatches":
        return self

    def __next__(self) -> Any:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        batch = self.batch_at(self.epoch, self.position)
        self.position += 1
        return batch


OBJECTIVES = ("span", "mlm", "causal")


class Batches(EpochBatches):
    """Training batches for one objective, resumable at an exact position.

    Each epoch visits the chunks of `split` in an order shuffled by (seed, epoch); batch
    `position` of an epoch is chunks [position * batch_size, ...) of that order, and its random
    masking draws from a generator seeded by (seed, epoch, position). So `state_dict()` —
    {"epoch", "position"} of the next batch — is all a restarted run needs to continue with
    exactly the batches the interrupted one would have produced. `epochs=None` repeats forever.

    `seq_len` is what the model sees: the encoder length for "span" (the raw chunk is longer,
    see `random_spans_helper`), the input length for "causal" (chunks of seq_len + 1 ids), and
    the full length for "mlm" including [CLS]/[SEP] when the tokenizer has them.
    """

    def __init__(self, shards: TokenShards, tokenizer: "Tokenizer", *, objective: str, batch_size: int,
                 seq_len: int, split: str = "train", valid_fraction: float = 0.01, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, epochs: int | None = None,
                 noise_density: float = 0.15, mean_span: float = 3.0, mask_prob: float = 0.15,
                 decoder_start_id: int | None = None, state: dict[str, int] | None = None):
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        check_tokenizer(shards, tokenizer)
        if tokenizer.pad_id is None:
            raise UserError("the tokenizer has no padding token; batches need one")
        self.tokenizer = tokenizer
        self.objective = objective
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epochs = epochs
        self.noise_density = noise_density
        self.mean_span = mean_span
        self.mask_prob = mask_prob
        self.decoder_start_id = decoder_start_id
        self._wrap = objective == "mlm" and tokenizer.cls_id is not None and tokenizer.sep_id is not None
        if objective == "span":
            if not tokenizer.sentinel_ids:
                raise UserError("span corruption needs sentinel tokens (<extra_id_0>, ...); this tokenizer has none")
            raw_len, self.target_len = random_spans_helper(seq_len, noise_density, mean_span)
        elif objective == "mlm":
            if tokenizer.mask_id is None:
                raise UserError("masked-LM needs a mask token; this tokenizer has none")
            raw_len = seq_len - 2 if self._wrap else seq_len
        else:
            raw_len = seq_len + 1
        if raw_len < 2:
            raise UserError(f"sequence length {seq_len} is too short for the {objective} objective")
        self.sequences = shards.sequences(raw_len, split=split, valid_fraction=valid_fraction, seed=seed)
        if len(self.sequences) == 0:
            raise UserError(f"the {split} split of {shards.directory} ({shards.num_tokens:,} tokens) holds no "
                            f"sequence of {raw_len} tokens; prepare more text or shorten the sequences")
        if drop_last and len(self.sequences) < batch_size:
            raise UserError(f"the {split} split holds {len(self.sequences)} sequences, "
                            f"fewer than one batch of {batch_size}")
        self.epoch = 0
        self.position = 0
        if state is not None:
            self.load_state_dict(state)

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.sequences)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.sequences)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def batch_at(self, epoch: int, position: int) -> dict[str, "torch.Tensor"]:
        """The batch at (epoch, position), independent of the iterator's own state."""
        picked = self._order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        examples = [self._example(self.sequences[int(i)], rng) for i in picked]
        tok = self.tokenizer
        if self.objective == "span":
            return collate_span_corruption(examples, tok.pad_id, self.decoder_start_id)
        if self.objective == "mlm":
            return collate_mlm(examples, tok.pad_id)
        return collate_causal(examples, tok.pad_id)

    def _example(self, chunk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer
        if self.objective == "span":
            return span_corruption(chunk, noise_density=self.noise_density, mean_span=self.mean_span,
                                   sentinel_ids=tok.sentinel_ids, eos_id=tok.eos_id, rng=rng)
        if self.objective == "mlm":
            if self._wrap:
                chunk = np.concatenate([[tok.cls_id], chunk, [tok.sep_id]]).astype(np.int64)
            return mlm_mask(chunk, mask_prob=self.mask_prob, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                            special_ids=tok.special_ids, rng=rng)
        return causal_lm(chunk)


def make_batches(shards: TokenShards | str | os.PathLike, tokenizer: "Tokenizer", **options: Any) -> Batches:
    """`Batches` over a shard directory or an open `TokenShards` (options as for Batches)."""
    if not isinstance(shards, TokenShards):
        shards = TokenShards(shards)
    return Batches(shards, tokenizer, **options)
