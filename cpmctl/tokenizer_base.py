"""The tokenizer interface every kind implements (SentencePiece, Hugging Face, CPM-2's own).

It stands apart from `cpmctl.tokenizer` (the kinds cpmctl ships and `load_tokenizer`) so that a
kind living elsewhere, such as `cpmctl.cpm2.tokenizer`, can subclass it without an import cycle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpmctl.errors import UserError

if TYPE_CHECKING:
    import torch

META_FILE = "cpmctl_tokenizer.json"


class Tokenizer(ABC):
    """Text <-> ids with the special ids spelled out. Ids absent from a tokenizer are None."""

    kind: str
    model_file: str

    def __init__(self, *, vocab_size: int, pad_id: int | None, eos_id: int | None, unk_id: int | None,
                 bos_id: int | None = None, mask_id: int | None = None, cls_id: int | None = None,
                 sep_id: int | None = None, sentinel_ids: Sequence[int] = ()):
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.unk_id = unk_id
        self.bos_id = bos_id
        self.mask_id = mask_id
        self.cls_id = cls_id
        self.sep_id = sep_id
        self.sentinel_ids = list(sentinel_ids)

    # -- what a backend provides --------------------------------------------------------------
    @abstractmethod
    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text with no special tokens added."""

    @abstractmethod
    def _special_affixes(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a single sequence (e.g. [CLS] ... [SEP])."""

    @abstractmethod
    def _decode(self, ids: list[int], skip_special: bool) -> str: ...

    @abstractmethod
    def _files(self) -> dict[str, bytes]:
        """The tokenizer's own files by name, the model file first."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    # -- the interface ------------------------------------------------------------------------
    @property
    def special_ids(self) -> set[int]:
        """Structural ids an objective must never mask or corrupt (unk is ordinary text)."""
        ids = {self.pad_id, self.eos_id, self.bos_id, self.mask_id, self.cls_id, self.sep_id, *self.sentinel_ids}
        ids.discard(None)
        return ids  # type: ignore[return-value]

    def encode(self, text: str, add_eos: bool = False, *, add_special: bool = False,
               max_length: int | None = None) -> list[int]:
        """Ids of `text`.

        `add_special` adds what the tokenizer's own template adds ([CLS] ... [SEP] for BERT,
        eos for a SentencePiece model); `add_eos` ends the ids with eos (not twice when the
        template already did). `max_length` truncates the text, keeping the special ids.
        """
        return self.encode_many([text], add_eos, add_special=add_special, max_length=max_length)[0]

    def encode_many(self, texts: Sequence[str], add_eos: bool = False, *, add_special: bool = False,
                    max_length: int | None = None) -> list[list[int]]:
        """`encode` over many texts at once (the backends batch the work)."""
        prefix, suffix = self._special_affixes() if add_special else ([], [])
        if add_eos:
            if self.eos_id is None:
                raise UserError(f"this {self.kind} tokenizer has no end-of-sequence token; encode without add_eos")
            if not suffix or suffix[-1] != self.eos_id:
                suffix = [*suffix, self.eos_id]
        budget = None
        if max_length is not None:
            budget = max_length - len(prefix) - len(suffix)
            if budget < 0:
                raise UserError(f"max_length {max_length} leaves no room for the "
                                f"{len(prefix) + len(suffix)} special tokens")
        out = []
        for ids in self._encode_plain(list(texts)):
            if budget is not None:
                ids = ids[:budget]
            out.append([*prefix, *ids, *suffix])
        return out

    def decode(self, ids: Iterable[int] | Any, skip_special: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        return self._decode([int(i) for i in ids], skip_special)

    def encode_batch(self, texts: Sequence[str], max_length: int, pad_to_multiple: int | None = None,
                     add_eos: bool = False, *, add_special: bool = False,
                     padding_side: str = "right") -> tuple["torch.Tensor", "torch.Tensor"]:
        """`(input_ids, attention_mask)`, both LongTensor [B, T], padded with pad_id.

        T is the longest encoding after truncation to `max_length`, rounded up to a multiple of
        `pad_to_multiple` if given. Left padding keeps every sequence's last token in the last
        column, which is what batched decoder-only generation needs.
        """
        import torch

        if padding_side not in ("right", "left"):
            raise UserError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if self.pad_id is None:
            raise UserError(f"this {self.kind} tokenizer has no padding token; batches need one")
        encoded = self.encode_many(texts, add_eos, add_special=add_special, max_length=max_length)
        width = max((len(ids) for ids in encoded), default=0)
        if pad_to_multiple:
            width = math.ceil(width / pad_to_multiple) * pad_to_multiple
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            cols = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
            input_ids[row, cols] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, cols] = 1
        return input_ids, attention_mask

    def content_hash(self) -> str:
        """sha256 of the model file's bytes: equal hashes mean the same tokenization."""
        return hashlib.sha256(self._files()[self.model_file]).hexdigest()

    def metadata(self) -> dict[str, Any]:
        return {
            "format": "cpmctl-tokenizer", "version": 1, "kind": self.kind, "file": self.model_file,
            "content_hash": self.content_hash(), "vocab_size": self.vocab_size,
            "pad_id": self.pad_id, "eos_id": self.eos_id, "unk_id": self.unk_id, "bos_id": self.bos_id,
            "mask_id": self.mask_id, "cls_id": self.cls_id, "sep_id": self.sep_id,
            "sentinel_ids": self.sentinel_ids,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the model file(s) and cpmctl_tokenizer.json into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self._files().items():
            (directory / name).write_bytes(data)
        (directory / META_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return directory

    def __repr__(self) -> str:
        return f"<{type(self).__name__} vocab_size={self.vocab_size} hash={self.content_hash()[:12]}>"
