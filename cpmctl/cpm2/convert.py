"""`cpmctl convert cpm2`: a released CPM-2 checkpoint -> an ordinary cpmctl checkpoint.

The source is either release (detected from what SRC holds, never from names the user types):
- the inference release: BMInf's `checkpoint.pt` (a file, or a directory holding one);
- the training release: a directory of `mp_rank_XX_model_states.pt` shards.

Memory stays near one tensor, not the model: tensors are produced one at a time (dequantized or
merged in float32, cast to the requested dtype) and spilled into scratch safetensors files beside
OUT in groups of at most `spill_bytes`; the checkpoint writer then streams the memory-mapped
scratch tensors into OUT. The price is writing the weights twice (the scratch files are deleted
at the end); the gain is that an 11B model converts on a machine with less RAM than its size.

The vocabulary (`--vocab`, else a vocab.txt beside the source) becomes the checkpoint's
tokenizer; its size must equal the embedding's rows and its special entries give the config's
pad/eos ids. Provenance records the source format and the sha256 of every source file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.fsutil import check_new_output

log = logging.getLogger(__name__)

STAGE = "convert-cpm2"
BMINF_FILE = "checkpoint.pt"
DEFAULT_SPILL_BYTES = 256 * 2**20
# What the Python process itself (interpreter, torch) occupies before any tensor, and what the
# allocator keeps of freed tensors instead of returning it: measured (BENCHMARKS.md).
PROCESS_BYTES = 350 * 2**20
ALLOCATOR_SLACK_BYTES = 256 * 2**20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def parse_dtype(name: str) -> torch.dtype:
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise UserError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass
class ConversionPlan:
    """What a conversion will write, and the memory it needs: the dry run's answer."""

    source_format: str
    source_files: list[Path]
    config: ModelConfig
    dtype: torch.dtype
    tensors: list[Any]  # layout.Planned, in write order
    spill_bytes: int
    vocab: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(p.shape) for p in self.tensors) * self.dtype.itemsize

    @property
    def largest_float32_bytes(self) -> int:
        return max(math.prod(p.shape) for p in self.tensors) * 4

    @property
    def peak_bytes(self) -> int:
        """Resident memory the conversion needs: the tensors waiting to be spilled, the one
        being made (float32, plus a second float32 buffer while dequantizing or merging and its
        cast), the process itself and the allocator's slack. Memory-mapped file pages come on top
        but are clean page cache the kernel can drop at any time, so they need no RAM of their own."""
        return self.spill_bytes + 3 * self.largest_float32_bytes + PROCESS_BYTES + ALLOCATOR_SLACK_BYTES

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "source_format": self.source_format,
            "source_files": [str(p) for p in self.source_files],
            "model": {"vocab_size": c.vocab_size, "d_model": c.d_model, "n_heads": c.n_heads, "d_head": c.d_head,
                      "d_ff": c.d_ff, "encoder_layers": c.n_layers, "decoder_layers": c.n_decoder_layers,
                      "relative_buckets": c.relative_buckets},
            "dtype": str(self.dtype).removeprefix("torch."),
            "tensors": len(self.tensors),
            "parameters": sum(math.prod(p.shape) for p in self.tensors),
            "output_bytes": self.output_bytes,
            "scratch_bytes": self.output_bytes,
            "peak_memory_bytes": self.peak_bytes,
            "largest_tensor": max(self.tensors, key=lambda p: math.prod(p.shape)).name,
            "vocab": str(self.vocab) if self.vocab else None,
            "notes": self.notes,
        }


# -- opening a source ------------------------------------------------------------------------------
def _source(src: Path) -> tuple[str, Path]:
    """("bminf", file) or ("megatron", directory) for what SRC holds."""
    from cpmctl.cpm2.megatron import MOE_SHARD_PATTERN, SHARD_PATTERN

    if not src.exists():
        raise UserError(f"{src} does not exist")
    if src.is_file():
        return "bminf", src
    if (src / BMINF_FILE).is_file():
        return "bminf", src / BMINF_FILE
    if any(SHARD_PATTERN.match(p.name) or MOE_SHARD_PATTERN.match(p.name) for p in src.iterdir()) or (src / "latest").is_file():
        return "megatron", src
    raise UserError(f"{src} holds neither BMInf's {BMINF_FILE} nor mp_rank_XX_model_states.pt shards")


def _find_vocab(vocab: str | os.PathLike | None, src: Path) -> Path | None:
    if vocab is not None:
        path = Path(vocab)
        if not path.is_file():
            raise UserError(f"vocabulary {path} does not exist or is not a file")
        return path
    beside = (src if src.is_dir() else src.parent) / "vocab.txt"
    return beside if beside.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def plan_conversion(src: str | os.PathLike, *, vocab: str | os.PathLike | None = None, dtype: str = "float32",
                    spill_bytes: int = DEFAULT_SPILL_BYTES) -> tuple[ConversionPlan, Any]:
    """Open the source (headers and shapes only) and plan the conversion.

    Returns the plan and the opened source (close it with `.close()` when it has one).
    """
    from cpmctl.cpm2 import layout
    from cpmctl.model import build_model

    target = parse_dtype(dtype)
    kind, path = _source(Path(src))
    if kind == "bminf":
        from cpmctl.cpm2.bminf import BMInfFile

        opened = BMInfFile(path)
        fields, tensors = layout.bminf_plan(opened, str(path))
        files = [path]
    else:
        from cpmctl.cpm2.megatron import Shards

        opened = Shards(path)
        fields, tensors = layout.megatron_plan(opened, str(path))
        files = list(opened.files)
    vocab_path = _find_vocab(vocab, Path(src))
    notes = []
    if vocab_path is not None:
        tok = load_vocab(vocab_path)
        if tok.vocab_size != fields["vocab_size"]:
            raise UserError(f"vocabulary {vocab_path} has {tok.vocab_size} entries, but the checkpoint's embedding "
                            f"has {fields['vocab_size']} rows; pass the vocab.txt released with these weights")
        fields.update(pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, decoder_start_token_id=tok.pad_id)
    else:
        notes.append("no vocab.txt: the checkpoint gets no tokenizer and the preset's pad/eos ids (0/1)")
    config = ModelConfig(**fields)
    expected = {n: tuple(t.shape) for n, t in build_model(config, device="meta").state_dict().items()}
    planned = {p.name: p for p in tensors}
    if set(planned) != set(expected):  # a gap in our own tables, not the user's mistake
        raise RuntimeError(f"cpm2 layout does not cover the model: {sorted(set(planned) ^ set(expected))[:5]}")
    for p in tensors:
        if p.shape != expected[p.name]:
            raise UserError(f"{p.source} gives {p.name} shape {list(p.shape)}, the model needs {list(expected[p.name])}")
    plan = ConversionPlan(kind, files, config, target, tensors, spill_bytes, vocab_path, notes)
    return plan, opened


def load_vocab(path: Path):
    from cpmctl.cpm2.tokenizer import CPM2Tokenizer

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read vocabulary {path}: {exc.strerror}") from None
    return CPM2Tokenizer(data, source=str(path))


# -- converting ------------------------------------------------------------------------------------
def _spilled(plan: ConversionPlan, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor made, cast and written to scratch files; returned as views of those files."""
    from cpmctl.checkpoint import SafetensorsFile, write_safetensors

    views: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}
    filled = 0

    parts = 0

    def flush() -> None:
        nonlocal pending, filled, parts
        if not pending:
            return
        path = scratch / f"part-{parts:05d}.safetensors"
        parts += 1
        write_safetensors(path, pending)
        opened = SafetensorsFile(path)
        views.update({name: opened.get(name) for name in pending})
        pending, filled = {}, 0

    for p in plan.tensors:
        tensor = p.make()
        if tensor.dtype != plan.dtype:
            tensor = tensor.to(plan.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if pending and filled + nbytes > plan.spill_bytes:
            flush()
        pending[p.name] = tensor
        filled += nbytes
        del tensor
    flush()
    return views


def convert_cpm2(src: str | os.PathLike, out: str | os.PathLike, *, vocab: str | os.PathLike | None = None,
                 dtype: str = "float32", overwrite: bool = False,
                 spill_bytes: int = DEFAULT_SPILL_BYTES) -> dict[str, Any]:
    """Convert a released CPM-2 checkpoint into a cpmctl checkpoint at `out`; returns the plan's summary."""
    from cpmctl.checkpoint import save_checkpoint

    out = Path(out)
    check_new_output(out, overwrite)
    plan, opened = plan_conversion(src, vocab=vocab, dtype=dtype, spill_bytes=spill_bytes)
    if plan.vocab is not None:
        from cpmctl.cpm2.tokenizer import require_jieba

        require_jieba()  # the tokenizer written into OUT is unusable without it
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.cpm2-scratch-", dir=parent))
    try:
        options = {
            "source": str(Path(src).resolve()),
            "source_format": {"bminf": "bminf-checkpoint", "megatron": "megatron-model-parallel"}[plan.source_format],
            "source_files": {str(p.resolve()): "sha256:" + _sha256(p) for p in plan.source_files},
            "dtype": str(plan.dtype).removeprefix("torch."),
            "vocab": None if plan.vocab is None else {str(plan.vocab.resolve()): "sha256:" + _sha256(plan.vocab)},
        }
        views = _spilled(plan, scratch)
        close = getattr(opened, "close", None)
        if close is not None:
            close()
        tokenizer_dir = None
        if plan.vocab is not None:
            tokenizer_dir = load_vocab(plan.vocab).save(scratch / "tokenizer")
        save_checkpoint(out, plan.config, views, tokenizer_dir=tokenizer_dir, stage=STAGE, options=options,
                        overwrite=overwrite)
        del views
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("converted CPM-2 (%s) from %s into %s", plan.source_format, src, out)
    return plan.summary()


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    raise AssertionError("unreachable")


def render_summary(summary: dict[str, Any], out: str | os.PathLike, dry_run: bool) -> str:
    """The summary as a few lines for the terminal."""
    m = summary["model"]
    lines = [
        f"{'would write' if dry_run else 'wrote'} {out}: CPM-2 from the {summary['source_format']} release",
        f"  model: {m['encoder_layers']}+{m['decoder_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads x {m['d_head']}, "
        f"d_ff {m['d_ff']}, vocabulary {m['vocab_size']}",
        f"  weights: {summary['tensors']} tensors, {summary['parameters']:,} parameters, {summary['dtype']}, "
        f"{_size(summary['output_bytes'])} (and as much scratch space beside OUT while converting)",
        f"  peak memory: {_size(summary['peak_memory_bytes'])} (largest tensor {summary['largest_tensor']})",
        f"  tokenizer: {summary['vocab'] or 'none'}",
    ]
    lines += [f"  note: {note}" for note in summary["notes"]]
    return "\n".join(lines)
