"""The training release: DeepSpeed/Megatron model-parallel shards, merged into one state dict.

CPM-2-Finetune and CPM-2-Pretrain save one `mp_rank_XX_model_states.pt` per model-parallel rank
(DeepSpeed's layout: a dict whose "module" entry is the model's state dict). Each rank holds a
slice of the column- and row-parallel weights and a copy of the replicated ones; `merge_rule`
says which, following the public model code (mpu/transformer_enc_dec.py, model/enc_dec_modeling.py):

- column-parallel (output rows split): the vocabulary-parallel embeddings `word_embeds` and
  `lm_head`, `project_q`, `wi_0`, `wi_1`: concatenated along dim 0;
- column-parallel with a stride: `project` (q, k, v; stride 3) and `project_kv` (k, v; stride 2).
  Each rank's slice is its own [q_r; k_r; v_r], so the merge takes the j-th chunk of every rank
  in turn: [q_0 .. q_n; k_0 .. k_n; v_0 .. v_n];
- row-parallel (input columns split): attention `dense` and `wo`: concatenated along dim 1;
- the relative position bias, an Embedding(buckets, heads of this rank): concatenated along dim 1;
- layer norms: replicated; every rank must hold the same values.

Shards are read with `torch.load(weights_only=True)`, which refuses pickled code, memory-mapped
where the file format allows, so merging holds one merged tensor at a time.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpmctl.errors import UserError

log = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
# CPM-2-Pretrain's moe branch names one file per (data-parallel, model-parallel) rank: the MoE release.
MOE_SHARD_PATTERN = re.compile(r"^mp_rank_(\d+)_(\d+)_model_states\.pt$")
# The encoder and decoder hold the shared embedding as a submodule too: the same tensor saved
# under two more names.
ALIAS_SUFFIXES = ("encoder.word_embeds.weight", "decoder.word_embeds.weight")


@dataclass(frozen=True)
class MergeRule:
    kind: str  # "replicated", "cat" or "strided"
    dim: int = 0
    stride: int = 1


def merge_rule(name: str) -> MergeRule:
    """How the ranks' copies of tensor `name` (a training-release name) combine."""
    if name.endswith(("layer_norm.weight", "final_layernorm.weight")):
        return MergeRule("replicated")
    if name.endswith("self_attn.self_attn.project.weight"):
        return MergeRule("strided", 0, 3)
    if name.endswith("cross_attn.cross_attn.project_kv.weight"):
        return MergeRule("strided", 0, 2)
    if name.endswith(("relative_attention_bias.weight", ".dense.weight", "dense_relu_dense.wo.weight")):
        return MergeRule("cat", 1)
    if name in ("word_embeds.weight", "lm_head.weight") or name.endswith(
        ("project_q.weight", "dense_relu_dense.wi_0.weight", "dense_relu_dense.wi_1.weight")
    ):
        return MergeRule("cat", 0)
    raise UserError(f"unknown tensor {name} in the model-parallel shards; cpmctl does not know how its ranks combine")


def find_shards(src: Path) -> list[Path]:
    """The shard files of `src` in rank order; a missing rank is a UserError naming it.

    `src` is the directory holding the shards, or a DeepSpeed save directory whose `latest`
    file names the subdirectory to use.
    """
    if (src / "latest").is_file() and not any(SHARD_PATTERN.match(p.name) for p in src.iterdir()):
        tag = (src / "latest").read_text(encoding="utf-8", errors="replace").strip()
        if not tag or Path(tag).name != tag:
            raise UserError(f"{src / 'latest'} does not name a checkpoint subdirectory")
        src = src / tag
        if not src.is_dir():
            raise UserError(f"{src.parent / 'latest'} names {tag}, which is not a directory")
    ranks: dict[int, Path] = {}
    for path in src.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match:
            ranks[int(match.group(1))] = path
    if not ranks:
        if any(MOE_SHARD_PATTERN.match(p.name) for p in src.iterdir()):
            raise UserError(f"{src} holds mp_rank_DP_MP_model_states.pt files, the layout of CPM-2's MoE release, "
                            "which cpmctl cannot import: public code does not document where its experts sit (see the README)")
        raise UserError(f"{src} holds no mp_rank_XX_model_states.pt shards")
    missing = [r for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
        names = ", ".join(f"mp_rank_{r:02d}_model_states.pt" for r in missing)
        raise UserError(f"{src} is missing model-parallel rank(s) {', '.join(map(str, missing))} ({names})")
    return [ranks[r] for r in sorted(ranks)]


def _load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path} safely as tensors ({type(exc).__name__}: {first})") from None


def _state_dict(data: Any, path: Path) -> dict[str, torch.Tensor]:
    # DeepSpeed saves the model under "module", Megatron's own saver under "model".
    sd = data.get("module", data.get("model", data)) if isinstance(data, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"{path} holds no model state dict (expected {{'module': state_dict}} or {{'model': state_dict}})")
    out = {}
    for name, value in sd.items():
        if not isinstance(name, str):
            raise UserError(f"{path}: state dict key {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            continue  # bookkeeping entries a trainer may leave beside the weights
        out[name.removeprefix("module.")] = value
    return out


class Shards:
    """The ranks' state dicts, opened together; `merged(name)` builds one full tensor."""

    def __init__(self, src: str | os.PathLike) -> None:
        src = Path(src)
        self.files = find_shards(src)
        self.ranks: list[dict[str, torch.Tensor]] = []
        for i, path in enumerate(self.files):
            data = _load(path)
            world = data.get("mp_world_size") if isinstance(data, dict) else None
            if isinstance(world, int) and world != len(self.files):
                raise UserError(f"{path} was saved with {world} model-parallel ranks, but {src} holds {len(self.files)} shards")
            self.ranks.append(_state_dict(data, path))
        names = set(self.ranks[0])
        for path, sd in zip(self.files[1:], self.ranks[1:]):
            if set(sd) != names:
                diff = sorted(names ^ set(sd))
                raise UserError(f"{path.name} and {self.files[0].name} hold different tensors (e.g. {diff[0]})")
        self.names = [n for n in self.ranks[0] if not n.endswith(ALIAS_SUFFIXES)]
        for alias in sorted(set(self.ranks[0]) - set(self.names)):
            log.debug("skipped %s: the shared embedding saved once more under the encoder/decoder", alias)
        self._shapes = {name: self._merged_shape(name) for name in self.names}

    def _merged_shape(self, name: str) -> tuple[int, ...]:
        rule = merge_rule(name)
        shapes = [tuple(sd[name].shape) for sd in self.ranks]
        if rule.kind == "replicated" or len(shapes) == 1:
            if len(set(shapes)) != 1:
                raise UserError(f"model-parallel ranks disagree on the shape of replicated tensor {name}: "
                                + ", ".join(f"mp_rank_{r:02d} {list(s)}" for r, s in enumerate(shapes)))
            return shapes[0]
        first = shapes[0]
        for r, shape in enumerate(shapes[1:], start=1):
            if len(shape) != len(first) or shape != first:
                raise UserError(f"model-parallel ranks disagree on the shape of {name}: mp_rank_00 has "
                                f"{list(first)}, mp_rank_{r:02d} has {list(shape)}")
        if rule.dim >= len(first) or first[rule.dim] % rule.stride:
            raise UserError(f"{name} of shape {list(first)} cannot be split {rule.stride} ways along dim {rule.dim}")
        merged = list(first)
        merged[rule.dim] *= len(shapes)
        return tuple(merged)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def merged(self, name: str) -> torch.Tensor:
        """The full tensor in float32 (the ranks' slices put back together)."""
        rule = merge_rule(name)
        pieces = [sd[name] for sd in self.ranks]
        if rule.kind == "replicated" or len(pieces) == 1:
            for r, piece in enumerate(pieces[1:], start=1):
                if not torch.equal(piece, pieces[0]):
                    raise UserError(f"model-parallel ranks disagree on replicated tensor {name}: mp_rank_{r:02d} differs from mp_rank_00")
            return pieces[0].to(torch.float32)
        if rule.kind == "strided":
            chunks = [piece.chunk(rule.stride, dim=rule.dim) for piece in pieces]
            ordered = [chunks[r][j] for j in range(rule.stride) for r in range(len(pieces))]
        else:
            ordered = pieces
        return torch.cat([p.to(torch.float32) for p in ordered], dim=rule.dim)
