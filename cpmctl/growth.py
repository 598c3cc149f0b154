"""Growing a model: width and depth (bert2BERT FPI/AKI, exact tiling, stacking), vocabulary
expansion (CPM-2's longest-prefix rule) and dense -> MoE upcycling. Pure functions on state dicts.

Width growth maps every widened axis with an index map g: new unit j copies old unit g(j); old
units keep their index (g(j) = j for j < old). Output axes (rows of a Linear, embedding columns,
norm weights) copy; input axes (columns of a Linear) copy *and divide* by the number of copies of
their source unit, so a layer's output is unchanged (bert2BERT's function-preserving init). One
map serves the residual stream everywhere; attention heads are copied whole (groups of heads
under grouped-query attention, so each query head keeps its key/value head); FFN neurons are
units of d_ff.

Maps: the residual stream is always balanced (each old unit copied equally often) when d_new is a
multiple of d: equal copies keep the mean and variance of the hidden state, so RMS and LayerNorm
outputs are exactly preserved; with random copies no norm would be. Heads and FFN neurons copy a
random old unit under fpi/aki/stack (breaking symmetry as bert2BERT does) and the unit j mod n
under tile. So `fpi` and `tile` are exact (up to float error) for pre-norm models whenever each
width is a multiple of the old one (any width under fpi for heads and d_ff).

Methods:
    fpi    width as above; depth by inserting copies of layers whose output projections (attention
           `o`, FFN `w_out`) are zero, so each new layer starts as the identity (Net2Net-style);
    tile   as fpi but every map is the exact repetition j mod n (needs multiples);
    aki    bert2BERT's advanced KI: new units of layer l are taken from layer l+1 (the top layer
           from the one below), breaking symmetry, then depth by stacking;
    stack  fpi width, then depth by stacking the widened layers (StackBERT: layer i copies old
           layer i mod L).
aki and stack do not preserve the function; they are starting points for KI pre-training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cpmctl.config import PRESETS, ModelConfig, MoEConfig
from cpmctl.errors import UserError

METHODS = ("fpi", "aki", "tile", "stack")
GROWTH_FIELDS = ("d_model", "n_heads", "n_kv_heads", "d_head", "d_ff", "n_layers", "n_decoder_layers")
OUTPUT_PROJECTIONS = ("attn.o.", "cross_attn.o.", "ffn.w_out.")
BLOCK_RE = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)$")


# -- configs ------------------------------------------------------------------------------------
def target_config(spec: str, src_config: ModelConfig) -> ModelConfig:
    """The shape to grow into, from its spec: a preset name, a config.json or checkpoint directory,
    or KEY=INTEGER pairs changing `src_config` ("d_model=512,n_layers=8")."""
    if spec in PRESETS:
        return ModelConfig.from_preset(spec)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        try:
            return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
    if "=" in spec:
        changes: dict[str, Any] = {}
        for part in spec.split(","):
            key, _, value = part.partition("=")
            try:
                changes[key.strip()] = int(value)
            except ValueError:
                raise UserError(f"target shape {spec!r}: {part!r} is not KEY=INTEGER", option="to") from None
        if "n_heads" in changes and "n_kv_heads" not in changes:  # keep the grouping of query heads
            changes["n_kv_heads"] = max(changes["n_heads"] * src_config.n_kv_heads // src_config.n_heads, 1)
        return src_config.replace(**changes)
    raise UserError(f"target shape {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}), a config file, "
                    "nor KEY=VALUE pairs", option="to")


def grown_config(src: ModelConfig, target: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """The source config with the target's widths and depths; returns it and the names of other
    target fields that differ and were kept from the source (for the log)."""
    if target.arch != src.arch:
        raise UserError(f"cannot grow a {src.arch} model into a {target.arch} one")
    if src.moe is not None:
        raise UserError("growing an MoE model is not supported; grow the dense model, then upcycle it into experts", option="to_moe")
    changes = {f: getattr(target, f) for f in GROWTH_FIELDS}
    kept = sorted(f for f in ("norm", "norm_position", "position", "activation", "gated", "bias", "tie_embeddings",
                              "lm_head_transform", "share_layers", "share_groups", "max_positions", "norm_eps", "init_std")
                  if getattr(target, f) != getattr(src, f))
    new = src.replace(**changes)
    shrink = [f for f in GROWTH_FIELDS if getattr(new, f) is not None and getattr(src, f) is not None and getattr(new, f) < getattr(src, f)]
    if shrink:
        raise UserError(f"inherit only grows models; the target is smaller in {', '.join(shrink)}")
    if new.d_head != src.d_head:
        raise UserError(f"heads are copied whole, so d_head must stay {src.d_head} (target has {new.d_head}); "
                        "widen attention with more heads")
    if new.n_heads // new.n_kv_heads != src.n_heads // src.n_kv_heads:
        raise UserError("the ratio of query heads to key/value heads must stay the same "
                        f"({src.n_heads // src.n_kv_heads}, target {new.n_heads // new.n_kv_heads})")
    return new, kept


# -- index maps ----------------------------------------------------------------------------------
def index_map(old: int, new: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """g: new unit -> old unit. kind "tile": j mod old (needs new % old == 0); "balanced": tile
    when new is a multiple of old, else random; "random": old units keep their index, the rest
    copy a uniformly drawn old unit."""
    if new == old:
        return np.arange(old)
    multiple = new % old == 0
    if kind == "tile" and not multiple:
        raise UserError(f"tile needs every new width to be a multiple of the old one ({new} is not a multiple of {old})")
    if kind == "tile" or (kind == "balanced" and multiple):
        return np.arange(new) % old
    return np.concatenate([np.arange(old), rng.integers(0, old, new - old)])


def copy_counts(g: np.ndarray, old: int) -> np.ndarray:
    """For each new unit, how many new units copy its source (the divisor of input axes)."""
    return np.bincount(g, minlength=old)[g]


@dataclass
class WidthMaps:
    d: np.ndarray          # residual stream
    ff: np.ndarray         # FFN neurons
    q: np.ndarray          # query dims (heads * d_head)
    kv: np.ndarray         # key/value dims (kv heads * d_head)
    heads: np.ndarray      # query heads (relative position bias columns)
    old: ModelConfig

    def split(self, axis_map: np.ndarray, old_size: int) -> Tensor:
        return torch.as_tensor(copy_counts(axis_map, old_size), dtype=torch.float64)


def width_maps(src: ModelConfig, new: ModelConfig, method: str, rng: np.random.Generator) -> WidthMaps:
    inner = "tile" if method == "tile" else "random"
    d = index_map(src.d_model, new.d_model, "tile" if method == "tile" else "balanced", rng)
    ff = index_map(src.d_ff, new.d_ff, inner, rng)
    rep = src.n_heads // src.n_kv_heads
    kv_heads = index_map(src.n_kv_heads, new.n_kv_heads, inner, rng)
    heads = (kv_heads[:, None] * rep + np.arange(rep)[None, :]).reshape(-1)  # query heads follow their kv group
    dh = src.d_head
    expand = lambda h: (h[:, None] * dh + np.arange(dh)[None, :]).reshape(-1)  # noqa: E731
    return WidthMaps(d=d, ff=ff, q=expand(heads), kv=expand(kv_heads), heads=heads, old=src)


# -- tensor operations ------------------------------------------------------------------------------
def copy_rows(t: Tensor, g: np.ndarray, new_source: Tensor | None = None, old: int | None = None) -> Tensor:
    """Rows g of t; with `new_source`, rows for new units (j >= old) come from it instead (AKI)."""
    idx = torch.as_tensor(g, dtype=torch.long)
    out = t.index_select(0, idx)
    if new_source is not None and old is not None and len(g) > old:
        out[old:] = new_source.index_select(0, idx[old:])
    return out


def split_cols(t: Tensor, g: np.ndarray, old: int) -> Tensor:
    """Columns g of t divided by their copy counts (input axes)."""
    idx = torch.as_tensor(g, dtype=torch.long)
    counts = torch.as_tensor(copy_counts(g, old), dtype=torch.float64)
    return (t.double().index_select(1, idx) / counts).to(t.dtype)


def copy_cols(t: Tensor, g: np.ndarray) -> Tensor:
    return t.index_select(1, torch.as_tensor(g, dtype=torch.long))


def _qkv_rows(maps: WidthMaps) -> np.ndarray:
    c = maps.old
    q, kv = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
    return np.concatenate([maps.q, q + maps.kv, q + kv + maps.kv])


def _kv_rows(maps: WidthMaps) -> np.ndarray:
    kv = maps.old.n_kv_heads * maps.old.d_head
    return np.concatenate([maps.kv, kv + maps.kv])


def _block_rule(suffix: str, maps: WidthMaps) -> tuple[np.ndarray | None, np.ndarray | None, int, int]:
    """(row map, column-split map, old rows, old cols) for a block parameter by its suffix."""
    c = maps.old
    q, kv = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
    d, ff = c.d_model, c.d_ff
    module, _, kind = suffix.rpartition(".")
    rows_of = {
        "attn.qkv": (_qkv_rows(maps), maps.d, q + 2 * kv, d),
        "attn.o": (maps.d, maps.q, d, q),
        "cross_attn.q": (maps.q, maps.d, q, d),
        "cross_attn.kv": (_kv_rows(maps), maps.d, 2 * kv, d),
        "cross_attn.o": (maps.d, maps.q, d, q),
        "ffn.w_in": (maps.ff, maps.d, ff, d),
        "ffn.w_gate": (maps.ff, maps.d, ff, d),
        "ffn.w_out": (maps.d, maps.ff, d, ff),
    }
    if module in ("attn_norm", "cross_norm", "ffn_norm"):
        return maps.d, None, d, 0
    if module not in rows_of:
        raise UserError(f"inherit does not know how to widen {suffix}")
    rows, cols, n_rows, n_cols = rows_of[module]
    return rows, (cols if kind == "weight" else None), n_rows, n_cols


def widen_tensor(name: str, t: Tensor, maps: WidthMaps, next_layer: Mapping[str, Tensor] | None = None) -> Tensor:
    """One parameter of the source model at the new width. `next_layer`: the same block's
    parameters in the layer whose units the new units copy (AKI), by suffix."""
    c = maps.old
    block = BLOCK_RE.match(name)
    if block:
        suffix = block.group(3)
        rows, cols, n_rows, n_cols = _block_rule(suffix, maps)
        source = next_layer.get(suffix) if next_layer is not None else None
        out = copy_rows(t, rows, source, n_rows)
        return split_cols(out, cols, n_cols) if cols is not None else out
    if name.endswith("relative_bias.weight"):
        return copy_cols(t, maps.heads)
    if name.endswith("final_norm.weight") or name.endswith("final_norm.bias") or name.startswith("embed.norm.") \
            or name.startswith("lm_head.transform_norm."):
        return copy_rows(t, maps.d)
    if name in ("embed.tokens.weight", "embed.positions.weight", "embed.token_types.weight"):
        return copy_cols(t, maps.d)
    if name == "lm_head.proj.weight":
        return split_cols(t, maps.d, c.d_model)
    if name == "lm_head.transform.weight":
        return split_cols(copy_rows(t, maps.d), maps.d, c.d_model)
    if name == "lm_head.transform.bias":
        return copy_rows(t, maps.d)
    if name == "lm_head.bias":
        return t.clone()
    raise UserError(f"inherit does not know how to widen {name}")


def _layer_params(state: Mapping[str, Tensor], stack: str, i: int) -> dict[str, Tensor]:
    prefix = f"{stack}.blocks.{i}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def widen(state: Mapping[str, Tensor], src: ModelConfig, new: ModelConfig, method: str, rng: np.random.Generator) -> dict[str, Tensor]:
    """Every tensor at the new width (depth unchanged)."""
    maps = width_maps(src, new, method, rng)
    counts = {s: sum(1 for k in state if k.startswith(f"{s}.blocks.") and k.endswith(".attn_norm.weight")) for s in ("encoder", "decoder")}
    out = {}
    for name, t in state.items():
        next_layer = None
        block = BLOCK_RE.match(name)
        if method == "aki" and block:
            stack, i = block.group(1), int(block.group(2))
            n = counts[stack]
            j = i + 1 if i + 1 < n else max(i - 1, 0)
            next_layer = _layer_params(state, stack, j)
        out[name] = widen_tensor(name, t, maps, next_layer)
    return out


def deepen(state: Mapping[str, Tensor], src: ModelConfig, new: ModelConfig, method: str) -> dict[str, Tensor]:
    """Depth growth of the (already widened) state: stacking for aki/stack, identity-initialised
    copies (zero output projections) for fpi/tile."""
    if src.share_layers:
        return dict(state)
    out = {k: v for k, v in state.items() if not BLOCK_RE.match(k)}
    old_depth = {"encoder": src.n_layers if src.has_encoder else 0,
                 "decoder": (src.n_decoder_layers if src.arch == "encoder-decoder" else src.n_layers) if src.has_decoder else 0}
    new_depth = {"encoder": new.n_layers if new.has_encoder else 0,
                 "decoder": (new.n_decoder_layers if new.arch == "encoder-decoder" else new.n_layers) if new.has_decoder else 0}
    for stack in ("encoder", "decoder"):
        old_n, new_n = old_depth[stack], new_depth[stack]
        for j in range(new_n):
            if method in ("aki", "stack"):
                source, identity = j % old_n, False
            else:
                # Interleave: new layer j copies old layer floor(j * L / L'); every copy after the
                # first of an old layer starts as the identity.
                source = j * old_n // new_n
                identity = j > 0 and (j - 1) * old_n // new_n == source
            for suffix, t in _layer_params(state, stack, source).items():
                t = t.clone()
                if identity and any(suffix.startswith(p) for p in OUTPUT_PROJECTIONS):
                    t.zero_()
                out[f"{stack}.blocks.{j}.{suffix}"] = t
    return out


# -- vocabulary ----------------------------------------------------------------------------------
def vocab_source_ids(old_tok, new_tok, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """For every id of the new tokenizer, the old id whose embedding it starts from (CPM-2):
    the same piece if the old vocabulary has it, else its longest prefix that it has, else a
    random existing piece. Returns the map and counts of each case."""
    specials = set(old_tok.special_ids)
    ordinary = np.array([i for i in range(old_tok.vocab_size) if i not in specials])
    src = np.empty(new_tok.vocab_size, dtype=np.int64)
    stats = {"same": 0, "prefix": 0, "random": 0}
    for i in range(new_tok.vocab_size):
        piece = new_tok.id_to_token(i)
        found = old_tok.token_to_id(piece)
        if found is not None:
            src[i], stats["same"] = found, stats["same"] + 1
            continue
        for end in range(len(piece) - 1, 0, -1):
            found = old_tok.token_to_id(piece[:end])
            if found is not None and found not in specials:
                src[i], stats["prefix"] = found, stats["prefix"] + 1
                break
        else:
            src[i], stats["random"] = int(rng.choice(ordinary)), stats["random"] + 1
    return src, stats


def remap_vocab(state: Mapping[str, Tensor], source_ids: np.ndarray) -> dict[str, Tensor]:
    idx = torch.as_tensor(source_ids, dtype=torch.long)
    out = dict(state)
    for name in ("embed.tokens.weight", "lm_head.proj.weight", "lm_head.bias"):
        if name in out:
            out[name] = out[name].index_select(0, idx)
    return out


def resize_vocab(state: Mapping[str, Tensor], vocab_size: int, std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Keep the first rows; new rows (padding ids) drawn from N(0, std)."""
    out = dict(state)
    for name in ("embed.tokens.weight", "lm_head.proj.weight", "lm_head.bias"):
        if name in out and out[name].shape[0] != vocab_size:
            t = out[name]
            fresh = torch.zeros((vocab_size, *t.shape[1:]), dtype=t.dtype)
            n = min(vocab_size, t.shape[0])
            fresh[:n] = t[:n]
            if vocab_size > n and t.dim() == 2:
                fresh[n:] = torch.randn((vocab_size - n, *t.shape[1:]), generator=generator, dtype=torch.float32).to(t.dtype) * std
            out[name] = fresh
    return out


# -- MoE upcycling ---------------------------------------------------------------------------------
def upcycle_moe(state: Mapping[str, Tensor], config: ModelConfig, experts: int, generator: torch.Generator) -> tuple[dict[str, Tensor], ModelConfig]:
    """CPM-2's dense -> MoE: every expert a copy of the layer's FFN (expert_size = d_ff, top-1),
    router weights orthogonal with gain 0.01. With top-1 routing the combine weight is exactly
    1, so the MoE model computes what the dense one did."""
    if experts < 1:
        raise UserError(f"upcycling needs at least 1 expert, got {experts}", option="to_moe")
    if config.moe is not None:
        raise UserError("the model is already MoE")
    out = {}
    for name, t in state.items():
        m = re.match(r"^(.*\.ffn)\.(w_in|w_gate|w_out)\.(weight|bias)$", name)
        if not m:
            out[name] = t
            continue
        prefix, proj, kind = m.groups()
        if kind == "weight":
            block = t.T if proj == "w_out" else t  # w_out is stored transposed: [d_ff, d]
            out[f"{prefix}.{proj}"] = block.unsqueeze(0).repeat(experts, 1, 1).contiguous()
            if proj == "w_in":
                router = torch.empty(experts, config.d_model)
                torch.nn.init.orthogonal_(router, gain=0.01, generator=generator)
                out[f"{prefix}.router.weight"] = router.to(t.dtype)
        else:
            key = {"w_in": "b_in", "w_gate": "b_gate", "w_out": "b_out"}[proj]
            out[f"{prefix}.{key}"] = t.clone() if proj == "w_out" else t.unsqueeze(0).repeat(experts, 1).contiguous()
    moe_config = config.replace(moe=MoEConfig(experts=experts, expert_size=config.d_ff, top_k=1, router="linear").__dict__)
    return out, moe_config


# -- all together ----------------------------------------------------------------------------------
def grow_state(state: Mapping[str, Tensor], src: ModelConfig, new: ModelConfig, method: str, seed: int = 0) -> dict[str, Tensor]:
    """Width then depth growth of a source state dict to config `new` (same vocabulary)."""
    if method not in METHODS:
        raise UserError(f"unknown growth method {method!r}; expected one of {', '.join(METHODS)}")
    rng = np.random.default_rng(seed)
    state = {k: v.detach() for k, v in state.items()}
    widened = widen(state, src, new, method, rng)
    return deepen(widened, src, new, method)


def logit_difference(a: Tensor, b: Tensor) -> float:
    n = min(a.shape[-1], b.shape[-1])
    return float((a[..., :n].double() - b[..., :n].double()).abs().max())


def is_exact(method: str, config: ModelConfig) -> bool:
    """Whether the method is meant to preserve the function for this architecture."""
    return method in ("fpi", "tile") and config.norm_position == "pre" and not config.tie_embeddings
