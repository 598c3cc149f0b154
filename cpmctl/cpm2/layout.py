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

    d, f, h = d_model, d_ff, inner
    add("embed.tokens.weight", "input_embedding.weight", (vocab, d))
    kv_name = req("encoder_kv.w_project_kv")
    if ck.shape(kv_name)[0] != n_dec:
        raise UserError(f"{where}: {kv_name} stacks {ck.shape(kv_name)[0]} layers, the decoder has {n_dec}")
    for stack, count in (("encoder", n_enc), ("decoder", n_dec)):
        add(f"{stack}.relative_bias.weight", f"{stack}_position_bias.embedding.weight", (buckets, n_heads))
        for i in range(count):
            ours, theirs = f"{stack}.blocks.{i}", f"{stack}.{i}"
            add(f"{ours}.attn_norm.weight", f"{theirs}.layer_nrom_before_self_attn.weight", (d,))
            add(f"{ours}.attn.qkv.weight", f"{theirs}.self_attention.w_project_qkv", (3 * h, d))
            add(f"{ours}.attn.o.weight", f"{theirs}.self_attention.w_out", (d, h))
            if stack == "decoder":
                add(f"{ours}.cross_norm.weight", f"{theirs}.layer_nrom_before_cross_attn.weight", (d,))
                add(f"{ours}.cross_attn.q.weight", f"{theirs}.cross_attention.w_project_q", (h, d))
                add(f"{ours}.cross_attn.kv.weight", kv_name, (2 * h, d), index=i)
                add(f"{ours}.cross_attn.o.weight", f"{theirs}.cross_attention.w_out", (d, h))
            add(f"{ours}.ffn_norm.weight", f"{theirs}.layer_nrom_before_ff.weight", (d,))
            add(f"{ours}.ffn.w_gate.weight", f"{theirs}.dense_gelu_dense.wi_0.weight", (f, d))
            add(f"{ours}.ffn.w_in.weight", f"{theirs}.dense_gelu_dense.wi_1.weight", (f, d))
            add(f"{ours}.ffn.w_out.weight", f"{theirs}.dense_gelu_dense.wo.weight", (d, f))
        add(f"{stack}.final_norm.weight", f"{stack}_final_layer_nrom.weight", (d,))
    add("lm_head.proj.weight", "lm_head.weight", (vocab, d))
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

    def add(ours: str, theirs: str, shape: tuple[int, ...]) -> None:
        req(theirs)
        used.add(theirs)
        if tuple(shards.shape(theirs)) != shape:
            raise UserError(f"{where}: {theirs} merges to shape {list(shards.shape(theirs))}, but {ours} needs {list(shape)}")
        plan.append(Planned(ours, shape, theirs, lambda: shards.merged(theirs)))

    d, f, h = d_model, d_ff, inner
    add("embed.tokens.weight", "word_embeds.weight", (vocab, d))
    for stack, count in (("encoder", n_enc), ("decoder", n_dec)):
        add(f"{stack}.relative_bias.weight", f"{stack}.blocks.0.self_attn.self_attn.relative_attention_bias.weight", (buckets, n_heads))
        for i in range(count):
            ours, theirs = f"{stack}.blocks.{i}", f"{stack}.blocks.{i}"
            add(f"{ours}.attn_norm.weight", f"{theirs}.self_attn.layer_norm.weight", (d,))
            add(f"{ours}.attn.qkv.weight", f"{theirs}.self_attn.self_attn.project.weight", (3 * h, d))
            add(f"{ours}.attn.o.weight", f"{theirs}.self_attn.self_attn.dense.weight", (d, h))
            if stack == "decoder":
                add(f"{ours}.cross_norm.weight", f"{theirs}.cross_attn.layer_norm.weight", (d,))
                add(f"{ours}.cross_attn.q.weight", f"{theirs}.cross_attn.cross_attn.project_q.weight", (h, d))
                add(f"{ours}.cross_attn.kv.weight", f"{theirs}.cross_attn.cross_attn.project_kv.weight", (2 * h, d))
                add(f"{ours}.cross_attn.o.weight", f"{theirs}.cross_attn.cross_attn.dense.weight", (d, h))
            add(f"{ours}.ffn_norm.weight", f"{theirs}.ff.layer_norm.weight", (d,))
            add(f"{ours}.ffn.w_gate.weight", f"{theirs}.ff.dense_relu_dense.wi_0.weight", (f, d))
            add(f"{ours}.ffn.w_in.weight", f"{theirs}.ff.dense_relu_dense.wi_1.weight", (f, d))
            add(f"{ours}.ffn.w_out.weight", f"{theirs}.ff.dense_relu_dense.wo.weight", (d, f))
        add(f"{stack}.final_norm.weight", f"{stack}.final_layernorm.weight", (d,))
    add("lm_head.proj.weight", "lm_head.weight", (vocab, d))
    _refuse_leftovers(names - used, where)
    return fields, plan


def _refuse_leftovers(leftovers: set[str], where: str) -> None:
    """An unknown tensor is a feature cpmctl does not implement: refused by name, never dropped."""
    if leftovers:
        shown = ", ".join(sorted(leftovers)[:5]) + (f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else "")
        raise UserError(f"{where} holds tensors cpmctl's CPM-2 model has no place for: {shown}")
