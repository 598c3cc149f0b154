"""The released CPM-2 tensors, named and shaped as cpmctl's encoder-decoder model holds them.

Both releases map onto the same model (cpmctl's T5 layout: fused `qkv` in q, k, v order, fused
cross-attention `kv` in k, v order, gated GELU with `w_gate` = wi_0 and `w_in` = wi_1, untied
head, no logit scaling). The BMInf names are those deepdialog/CPM-2.0-GEN maps onto
transformers' T5 (its `to_pytorch_new` notebook), which the parity tests use as the
independent reference; the training names are those of CPM-2-Finetune's model code.

A plan is a list of `Planned` tensors in the order they will be written: each knows its cpmctl
name, its shape, the source tensor(s) it comes from, and how to produce it in float32. Nothing
is read until `make()` is called, so the same plan serves `--dry-run` and the conversion.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cpmctl.config import PRESETS
from cpmctl.errors import UserError


@dataclass(frozen=True)
class Planned:
    name: str
    shape: tuple[int, ...]
    source: str
    make: Callable[[], torch.Tensor]


def model_fields(*, vocab: int, d_model: int, n_heads: int, d_head: int, d_ff: int, n_enc: int, n_dec: int,
                 buckets: int) -> dict:
    """ModelConfig fields of a CPM-2 model with these sizes (the rest as the paper's model:
    RMS norm eps 1e-6, max distance 128, gated tanh GELU, no attention scaling, untied head)."""
    return {
        **PRESETS["cpm2-11b"], "vocab_size": vocab, "d_model": d_model, "n_heads": n_heads, "d_head": d_head,
        "d_ff": d_ff, "n_layers": n_enc, "n_decoder_layers": n_dec, "relative_buckets": buckets,
    }


def _layer_count(names, pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    if not found:
        return 0
    missing = sorted(set(range(max(found) + 1)) - found)
    if missing:
        raise UserError(f"the checkpoint has no layer {missing[0]} matching {pattern!r} but has layer {max(found)}")
    return max(found) + 1


def _require(names, name: str, where: str) -> str:
    if name not in names:
        raise UserError(f"{where} is missing tensor {name}")
    return name


def _reshaped(get: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    return lambda: get().reshape(shape)


# -- our tensors, walked once for both releases -------------------------------------------------------
def _block_shapes(d: int, f: int, h: int, decoder: bool) -> dict[str, tuple[int, ...]]:
    """Our tensors of one block (names after `{stack}.blocks.{i}.`) and their shapes, in file order."""
    shapes = {"attn_norm.weight": (d,), "attn.qkv.weight": (3 * h, d), "attn.o.weight": (d, h)}
    if decoder:
        shapes.update({"cross_norm.weight": (d,), "cross_attn.q.weight": (h, d), "cross_attn.kv.weight": (2 * h, d),
                       "cross_attn.o.weight": (d, h)})
    shapes.update({"ffn_norm.weight": (d,), "ffn.w_gate.weight": (f, d), "ffn.w_in.weight": (f, d), "ffn.w_out.weight": (d, f)})
    return shapes


def _walk_model(add, names: dict[str, str], block_prefix: str, fields: dict, *, stacked: dict[str, str] | None = None) -> None:
    """Every tensor of the encoder-decoder `fields` describes (`model_fields`),
    through `add(ours, the release's name, shape, index)`.

    names: the release's name of each of our tensors (model level, stack level with `{stack}`, or
    block level after `block_prefix`, e.g. "{stack}.{i}."); stacked: block tensors the release
    keeps as one tensor for all layers ({ours: its name}), read at the layer's index."""
    stacked = stacked or {}
    d, f, h = fields["d_model"], fields["d_ff"], fields["n_heads"] * fields["d_head"]
    vocab, buckets, n_heads = fields["vocab_size"], fields["relative_buckets"], fields["n_heads"]

    def put(ours: str, suffix: str, shape: tuple[int, ...], stack: str | None = None, i: int | None = None) -> None:
        if suffix in stacked:
            add(ours, stacked[suffix], shape, index=i)
        else:
            prefix = block_prefix.format(stack=stack, i=i) if i is not None else ""
            add(ours, prefix + names[suffix].format(stack=stack), shape, index=None)

    put("embed.tokens.weight", "embed.tokens.weight", (vocab, d))
    for stack, count in (("encoder", fields["n_layers"]), ("decoder", fields["n_decoder_layers"])):
        put(f"{stack}.relative_bias.weight", "relative_bias.weight", (buckets, n_heads), stack)
        for i in range(count):
            for suffix, shape in _block_shapes(d, f, h, stack == "decoder").items():
                put(f"{stack}.blocks.{i}.{suffix}", suffix, shape, stack, i)
        put(f"{stack}.final_norm.weight", "final_norm.weight", (d,), stack)
    put("lm_head.proj.weight", "lm_head.proj.weight", (vocab, d))


# The releases' names for our tensors: model-level, stack-level ({stack}) and block-level (after the
# release's block prefix, `{stack}.{i}.` in BMInf, `{stack}.blocks.{i}.` in the training release).
BMINF_NAMES = {
    "embed.tokens.weight": "input_embedding.weight", "lm_head.proj.weight": "lm_head.weight",
    "relative_bias.weight": "{stack}_position_bias.embedding.weight", "final_norm.weight": "{stack}_final_layer_nrom.weight",
    "attn_norm.weight": "layer_nrom_before_self_attn.weight", "attn.qkv.weight": "self_attention.w_project_qkv",
    "attn.o.weight": "self_attention.w_out", "cross_norm.weight": "layer_nrom_before_cross_attn.weight",
    "cross_attn.q.weight": "cross_attention.w_project_q", "cross_attn.o.weight": "cross_attention.w_out",
    "ffn_norm.weight": "layer_nrom_before_ff.weight", "ffn.w_gate.weight": "dense_gelu_dense.wi_0.weight",
    "ffn.w_in.weight": "dense_gelu_dense.wi_1.weight", "ffn.w_out.weight": "dense_gelu_dense.wo.weight",
}
MEGATRON_NAMES = {
    "embed.tokens.weight": "word_embeds.weight", "lm_head.proj.weight": "lm_head.weight",
    "relative_bias.weight": "{stack}.blocks.0.self_attn.self_attn.relative_attention_bias.weight",
    "final_norm.weight": "{stack}.final_layernorm.weight",
    "attn_norm.weight": "self_attn.layer_norm.weight", "attn.qkv.weight": "self_attn.self_attn.project.weight",
    "attn.o.weight": "self_attn.self_attn.dense.weight", "cross_norm.weight": "cross_attn.layer_norm.weight",
    "cross_attn.q.weight": "cross_attn.cross_attn.project_q.weight", "cross_attn.kv.weight": "cross_attn.cross_attn.project_kv.weight",
    "cross_attn.o.weight": "cross_attn.cross_attn.dense.weight", "ffn_norm.weight": "ff.layer_norm.weight",
    "ffn.w_gate.weight": "ff.dense_relu_dense.wi_0.weight", "ffn.w_in.weight": "ff.dense_relu_dense.wi_1.weight",
    "ffn.w_out.weight": "ff.dense_relu_dense.wo.weight",
}


# -- the inference release (BMInf) -----------------------------------------------------------------
def bminf_plan(ck, where: str) -> tuple[dict, list[Planned]]:
    """(config fields, plan) for an opened `BMInfFile`."""
    names = set(ck.tensor_names())

    def req(name: str) -> str:
        return _require(names, name, where)

    vocab, d_model = ck.shape(req("input_embedding.weight"))
    buckets, n_heads = ck.shape(req("encoder_position_bias.embedding.weight"))
    n_enc = _layer_count(names, r"^encoder\.(\d+)\.")
    n_dec = _layer_count(names, r"^decoder\.(\d+)\.")
    if n_enc == 0 or n_dec == 0:
        raise UserError(f"{where} has no encoder or no decoder layers (encoder.N.* / decoder.N.*)")
    qkv = ck.shape(req("encoder.0.self_attention.w_project_qkv"))
    inner = torch.Size(qkv).numel() // (3 * d_model)
    if inner * 3 * d_model != torch.Size(qkv).numel() or inner % n_heads:
        raise UserError(f"{where}: encoder.0.self_attention.w_project_qkv {list(qkv)} is not 3 x (heads x d_head) x {d_model}")
    d_ff = ck.shape(req("encoder.0.dense_gelu_dense.wi_0.weight"))[0]
    fields = model_fields(vocab=vocab, d_model=d_model, n_heads=n_heads, d_head=inner // n_heads, d_ff=d_ff,
                          n_enc=n_enc, n_dec=n_dec, buckets=buckets)

    plan: list[Planned] = []
    used: set[str] = set()

    def add(ours: str, theirs: str, shape: tuple[int, ...], index: int | None = None) -> None:
        req(theirs)
        used.add(theirs)
        have = ck.shape(theirs)[1:] if index is not None else ck.shape(theirs)
        if torch.Size(have).numel() != torch.Size(shape).numel():
            raise UserError(f"{where}: {theirs} has shape {list(ck.shape(theirs))}, which cannot hold {ours} {list(shape)}")
        label = theirs if index is None else f"{theirs}[{index}]"
        plan.append(Planned(ours, shape, label, _reshaped(lambda: ck.value(theirs, index), shape)))

    kv_name = req("encoder_kv.w_project_kv")
    if ck.shape(kv_name)[0] != n_dec:
        raise UserError(f"{where}: {kv_name} stacks {ck.shape(kv_name)[0]} layers, the decoder has {n_dec}")

    # the cross-attention K/V of every decoder layer is one tensor, indexed by layer
    _walk_model(add, BMINF_NAMES, "{stack}.{i}.", fields, stacked={"cross_attn.kv.weight": kv_name})
    _refuse_leftovers(names - used, where)
    return fields, plan


# -- the training release (model-parallel shards) --------------------------------------------------
def megatron_plan(shards, where: str) -> tuple[dict, list[Planned]]:
    """(config fields, plan) for opened `Shards` (names after merging ranks)."""
    names = set(shards.names)

    def req(name: str) -> str:
        return _require(names, name, where)

    vocab, d_model = shards.shape(req("word_embeds.weight"))
    rel = "encoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight"
    buckets, n_heads = shards.shape(req(rel))
    n_enc = _layer_count(names, r"^encoder\.blocks\.(\d+)\.")
    n_dec = _layer_count(names, r"^decoder\.blocks\.(\d+)\.")
    if n_enc == 0 or n_dec == 0:
        raise UserError(f"{where} has no encoder or no decoder blocks (encoder.blocks.N.* / decoder.blocks.N.*)")
    qkv = shards.shape(req("encoder.blocks.0.self_attn.self_attn.project.weight"))
    if qkv[0] % 3 or (qkv[0] // 3) % n_heads:
        raise UserError(f"{where}: encoder.blocks.0.self_attn.self_attn.project.weight {list(qkv)} is not 3 x (heads x d_head) rows")
    inner = qkv[0] // 3
    d_ff = shards.shape(req("encoder.blocks.0.ff.dense_relu_dense.wi_0.weight"))[0]
    fields = model_fields(vocab=vocab, d_model=d_model, n_heads=n_heads, d_head=inner // n_heads, d_ff=d_ff,
                          n_enc=n_enc, n_dec=n_dec, buckets=buckets)

    plan: list[Planned] = []
    used: set[str] = set()

    def add(ours: str, theirs: str, shape: tuple[int, ...], index: None = None) -> None:
        req(theirs)
        used.add(theirs)
        if tuple(shards.shape(theirs)) != shape:
            raise UserError(f"{where}: {theirs} merges to shape {list(shards.shape(theirs))}, but {ours} needs {list(shape)}")
        plan.append(Planned(ours, shape, theirs, lambda: shards.merged(theirs)))

    _walk_model(add, MEGATRON_NAMES, "{stack}.blocks.{i}.", fields)
    _refuse_leftovers(names - used, where)
    return fields, plan


def _refuse_leftovers(leftovers: set[str], where: str) -> None:
    """An unknown tensor is a feature cpmctl does not implement: refused by name, never dropped."""
    if leftovers:
        shown = ", ".join(sorted(leftovers)[:5]) + (f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else "")
        raise UserError(f"{where} holds tensors cpmctl's CPM-2 model has no place for: {shown}")
