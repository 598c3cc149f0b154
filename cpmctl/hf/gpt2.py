"""GPT-2 (decoder-only, learned positions, LayerNorm, Conv1D weights stored as [in, out])."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.hf.family import ACT_TO_HF, Family, Rule, WeightFacts, activation, integer, linear, norm, number, register, special_ids


def to_config(hf: Mapping[str, Any], facts: WeightFacts) -> dict[str, Any]:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise UserError("unsupported GPT-2 variant: scale_attn_by_inverse_layer_idx is true")
    if hf.get("reorder_and_upcast_attn"):
        raise UserError("unsupported GPT-2 variant: reorder_and_upcast_attn is true")
    if hf.get("add_cross_attention"):
        raise UserError("unsupported GPT-2 variant: add_cross_attention is true")
    d_model = integer(hf, "n_embd", 768)
    return {
        "init_std": number(hf, "initializer_range", 0.02),
        "arch": "decoder",
        "vocab_size": integer(hf, "vocab_size", 50257),
        "d_model": d_model,
        "n_heads": integer(hf, "n_head", 12),
        "d_ff": integer(hf, "n_inner", 4 * d_model),
        "n_layers": integer(hf, "n_layer", 12),
        "norm": "layer",
        "norm_position": "pre",
        "norm_eps": number(hf, "layer_norm_epsilon", 1e-5),
        "position": "absolute",
        "max_positions": integer(hf, "n_positions", 1024),
        "activation": activation(hf.get("activation_function", "gelu_new"), "activation_function"),
        "gated": False,
        "bias": True,
        "attn_scale": bool(hf.get("scale_attn_weights", True)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)) if facts.head_tied is None else facts.head_tied,
        "scale_tied_logits": False,
        "lm_head": True,
        "dropout": number(hf, "resid_pdrop", 0.1),
        **special_ids(hf, {"bos_token_id": 50256, "eos_token_id": 50256}),
    }


def from_config(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_embd": c.d_model,
        "n_head": c.n_heads,
        "n_inner": c.d_ff,
        "n_layer": c.n_layers,
        "layer_norm_epsilon": c.norm_eps,
        "n_positions": c.max_positions,
        "activation_function": ACT_TO_HF[c.activation],
        "scale_attn_weights": c.attn_scale,
        "tie_word_embeddings": c.tie_embeddings,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": c.init_std,
        "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id, "bos_token_id": c.bos_token_id,
    }


def rules(c: ModelConfig, p: str) -> list[Rule]:
    out = [Rule("embed.tokens.weight", (f"{p}wte.weight",)), Rule("embed.positions.weight", (f"{p}wpe.weight",))]
    for i in range(c.n_layers):
        ours, hf = f"decoder.blocks.{i}", f"{p}h.{i}"
        out += norm(f"{ours}.attn_norm", f"{hf}.ln_1", c)
        out += linear(f"{ours}.attn.qkv", f"{hf}.attn.c_attn", True, "t")  # already fused q, k, v
        out += linear(f"{ours}.attn.o", f"{hf}.attn.c_proj", True, "t")
        out += norm(f"{ours}.ffn_norm", f"{hf}.ln_2", c)
        out += linear(f"{ours}.ffn.w_in", f"{hf}.mlp.c_fc", True, "t")
        out += linear(f"{ours}.ffn.w_out", f"{hf}.mlp.c_proj", True, "t")
    out += norm("decoder.final_norm", f"{p}ln_f", c)
    if not c.tie_embeddings:
        out += [Rule("lm_head.proj.weight", ("lm_head.weight",))]
    return out


FAMILY = register(Family(
    model_type="gpt2",
    to_config=to_config,
    from_config=from_config,
    rules=rules,
    prefix="transformer.",
    head=("wte.weight", "lm_head.weight"),
    redundant=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers
    unused_fields=frozenset({"relative_buckets", "relative_max_distance", "rope_theta", "decoder_start_token_id"}),
))
