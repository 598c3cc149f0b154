"""BERT (encoder-only): BertModel, BertForMaskedLM / ForPreTraining, and the encoder of task models.

BERT's pooler and task heads (a classifier, the next-sentence head) are not imported: cpmctl's
encoder ends at the last hidden states, which they do not change. They are named in a log line;
an exported BertModel therefore has no pooler, and transformers initialises one at random.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.hf.family import ACT_TO_HF, Family, Rule, WeightFacts, activation, fused, integer, linear, norm, number, register, special_ids


def to_config(hf: Mapping[str, Any], facts: WeightFacts) -> dict[str, Any]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"unsupported BERT position_embedding_type {hf.get('position_embedding_type')!r}; only 'absolute' is supported")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise UserError("unsupported BERT variant: is_decoder/add_cross_attention models are not supported")
    archs = [a for a in hf.get("architectures") or [] if isinstance(a, str)]
    has_mlm = facts.has_mlm
    if has_mlm is None:
        has_mlm = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)
    tied = bool(hf.get("tie_word_embeddings", True)) if facts.head_tied is None else facts.head_tied
    return {
        "init_std": number(hf, "initializer_range", 0.02),
        "arch": "encoder",
        "vocab_size": integer(hf, "vocab_size", 30522),
        "d_model": integer(hf, "hidden_size", 768),
        "n_heads": integer(hf, "num_attention_heads", 12),
        "d_ff": integer(hf, "intermediate_size", 3072),
        "n_layers": integer(hf, "num_hidden_layers", 12),
        "norm": "layer",
        "norm_position": "post",
        "norm_eps": number(hf, "layer_norm_eps", 1e-12),
        "position": "absolute",
        "max_positions": integer(hf, "max_position_embeddings", 512),
        "activation": activation(hf.get("hidden_act", "gelu"), "hidden_act"),
        "gated": False,
        "bias": True,
        "attn_scale": True,
        "type_vocab_size": integer(hf, "type_vocab_size", 2),
        "tie_embeddings": bool(has_mlm and tied),
        "scale_tied_logits": False,
        "lm_head": bool(has_mlm),
        "lm_head_transform": bool(has_mlm),
        "lm_head_bias": bool(has_mlm),
        "dropout": number(hf, "hidden_dropout_prob", 0.1),
        **special_ids(hf, {"pad_token_id": 0}),
    }


def from_config(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["BertForMaskedLM" if c.lm_head else "BertModel"],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers,
        "layer_norm_eps": c.norm_eps,
        "position_embedding_type": "absolute",
        "max_position_embeddings": c.max_positions,
        "hidden_act": ACT_TO_HF[c.activation],
        "type_vocab_size": c.type_vocab_size,
        "tie_word_embeddings": c.tie_embeddings if c.lm_head else True,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "initializer_range": c.init_std,
        "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id, "bos_token_id": c.bos_token_id,
    }


def rules(c: ModelConfig, p: str) -> list[Rule]:
    out = [Rule("embed.tokens.weight", (f"{p}embeddings.word_embeddings.weight",))]
    out += [Rule("embed.positions.weight", (f"{p}embeddings.position_embeddings.weight",))]
    if c.type_vocab_size:
        out += [Rule("embed.token_types.weight", (f"{p}embeddings.token_type_embeddings.weight",))]
    out += norm("embed.norm", f"{p}embeddings.LayerNorm", c)
    for i in range(c.n_layers):
        ours, hf = f"encoder.blocks.{i}", f"{p}encoder.layer.{i}"
        out += fused(f"{ours}.attn.qkv", tuple(f"{hf}.attention.self.{n}" for n in ("query", "key", "value")), True)
        out += linear(f"{ours}.attn.o", f"{hf}.attention.output.dense", True)
        out += norm(f"{ours}.attn_norm", f"{hf}.attention.output.LayerNorm", c)
        out += linear(f"{ours}.ffn.w_in", f"{hf}.intermediate.dense", True)
        out += linear(f"{ours}.ffn.w_out", f"{hf}.output.dense", True)
        out += norm(f"{ours}.ffn_norm", f"{hf}.output.LayerNorm", c)
    if c.lm_head:
        out += linear("lm_head.transform", "cls.predictions.transform.dense", True)
        out += norm("lm_head.transform_norm", "cls.predictions.transform.LayerNorm", c)
        out += [Rule("lm_head.bias", ("cls.predictions.bias",))]
        if not c.tie_embeddings:
            out += [Rule("lm_head.proj.weight", ("cls.predictions.decoder.weight",))]
    return out


FAMILY = register(Family(
    model_type="bert",
    to_config=to_config,
    from_config=from_config,
    rules=rules,
    prefix="bert.",
    head=("embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
    # position_ids is a buffer of arange(max_positions); the decoder bias aliases cls.predictions.bias.
    redundant=("embeddings.position_ids", "cls.predictions.decoder.bias"),
    task_heads=("pooler.", "bert.pooler.", "classifier.", "cls.seq_relationship.", "qa_outputs."),
    unused_fields=frozenset({"relative_buckets", "relative_max_distance", "rope_theta", "decoder_start_token_id"}),
    export_prefix=lambda c: "bert." if c.lm_head else "",
))
