"""T5 (v1.0 and v1.1) and mT5 (encoder-decoder).

T5's tied output head: in T5 v1.0 the decoder output is scaled by d_model**-0.5 before the tied
projection (`tie_embeddings=True, scale_tied_logits=True`); v1.1 and mT5 use an untied head and
no scaling. Old checkpoints' relative bias of the cross-attention is unused by transformers too,
and the encoder/decoder copies of the shared embedding are the same tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.hf.family import ACT_TO_HF, Family, Rule, WeightFacts, activation, fused, integer, linear, norm, number, register, special_ids


def _feed_forward(hf: Mapping[str, Any], default: str) -> tuple[str, bool]:
    proj = hf.get("feed_forward_proj", default)
    parts = proj.split("-") if isinstance(proj, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UserError(f"unsupported T5 feed_forward_proj {proj!r}; expected 'relu', 'gated-gelu' or 'gated-<activation>'")
    gated = len(parts) == 2
    # Hugging Face reads "gated-gelu" as the tanh approximation (T5 v1.1's gelu_new).
    name = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return activation(name, "feed_forward_proj"), gated


def _to_config(family: str):
    def to_config(hf: Mapping[str, Any], facts: WeightFacts) -> dict[str, Any]:
        act, gated = _feed_forward(hf, "relu" if family == "t5" else "gated-gelu")
        if family == "t5":
            # Hugging Face scales the decoder output when the config ties the embeddings (T5 v1.0);
            # configs it wrote itself state the choice as scale_decoder_outputs.
            scale = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))
        else:
            scale = False  # transformers never scales mT5's logits
        tied = (scale if family == "t5" else bool(hf.get("tie_word_embeddings", True))) if facts.head_tied is None else facts.head_tied
        if scale and not tied:
            raise UserError(
                "T5 config.json ties the output head to the embedding (tie_word_embeddings/scale_decoder_outputs true) "
                "but lm_head.weight differs from shared.weight; set tie_word_embeddings to false if the head is untied"
            )
        n_layers = integer(hf, "num_layers", 6 if family == "t5" else 8)
        return {
            "init_std": number(hf, "initializer_range", 0.02),
            "arch": "encoder-decoder",
            "vocab_size": integer(hf, "vocab_size", 32128 if family == "t5" else 250112),
            "d_model": integer(hf, "d_model", 512),
            "n_heads": integer(hf, "num_heads", 8 if family == "t5" else 6),
            "d_head": integer(hf, "d_kv", 64),
            "d_ff": integer(hf, "d_ff", 2048 if family == "t5" else 1024),
            "n_layers": n_layers,
            "n_decoder_layers": integer(hf, "num_decoder_layers", n_layers),
            "norm": "rms",
            "norm_position": "pre",
            "norm_eps": number(hf, "layer_norm_epsilon", 1e-6),
            "position": "relative",
            "max_positions": integer(hf, "n_positions", 512),
            "relative_buckets": integer(hf, "relative_attention_num_buckets", 32),
            "relative_max_distance": integer(hf, "relative_attention_max_distance", 128),
            "activation": act,
            "gated": gated,
            "bias": False,
            "attn_scale": False,
            "tie_embeddings": tied,
            "scale_tied_logits": scale and tied,
            "lm_head": True,
            "dropout": number(hf, "dropout_rate", 0.1),
            **special_ids(hf, {"pad_token_id": 0, "eos_token_id": 1}),
            "decoder_start_token_id": integer(hf, "decoder_start_token_id", None if family == "t5" else 0),
        }

    return to_config


def _from_config(family: str):
    def from_config(c: ModelConfig) -> dict[str, Any]:
        ff = ACT_TO_HF[c.activation]
        hf = {
            "architectures": ["T5ForConditionalGeneration" if family == "t5" else "MT5ForConditionalGeneration"],
            "model_type": family,
            "is_encoder_decoder": True,
            "vocab_size": c.vocab_size,
            "d_model": c.d_model,
            "num_heads": c.n_heads,
            "d_kv": c.d_head,
            "d_ff": c.d_ff,
            "num_layers": c.n_layers,
            "num_decoder_layers": c.n_decoder_layers,
            "layer_norm_epsilon": c.norm_eps,
            "n_positions": c.max_positions,
            "relative_attention_num_buckets": c.relative_buckets,
            "relative_attention_max_distance": c.relative_max_distance,
            "feed_forward_proj": ("gated-gelu" if ff == "gelu_new" else f"gated-{ff}") if c.gated else ff,
            # Only a tied *and* scaled head is written as tied: with tie_word_embeddings false
            # every transformers version keeps the written lm_head and leaves the logits unscaled.
            "tie_word_embeddings": c.tie_embeddings and c.scale_tied_logits,
            "dropout_rate": c.dropout,
            "initializer_range": c.init_std,
            "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id, "bos_token_id": c.bos_token_id,
            "decoder_start_token_id": c.decoder_start_token_id,
        }
        if family == "t5":
            hf["scale_decoder_outputs"] = c.tie_embeddings and c.scale_tied_logits
        return hf

    return from_config


def rules(c: ModelConfig, p: str) -> list[Rule]:
    out = [Rule("embed.tokens.weight", ("shared.weight",))]
    for stack, n_layers in (("encoder", c.n_layers), ("decoder", c.n_decoder_layers)):
        out += [Rule(f"{stack}.relative_bias.weight", (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",))]
        for i in range(n_layers):
            ours, hf = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            out += fused(f"{ours}.attn.qkv", tuple(f"{hf}.0.SelfAttention.{n}" for n in "qkv"), False)
            out += linear(f"{ours}.attn.o", f"{hf}.0.SelfAttention.o", False)
            out += norm(f"{ours}.attn_norm", f"{hf}.0.layer_norm", c)
            f = 1
            if stack == "decoder":
                out += linear(f"{ours}.cross_attn.q", f"{hf}.1.EncDecAttention.q", False)
                out += fused(f"{ours}.cross_attn.kv", (f"{hf}.1.EncDecAttention.k", f"{hf}.1.EncDecAttention.v"), False)
                out += linear(f"{ours}.cross_attn.o", f"{hf}.1.EncDecAttention.o", False)
                out += norm(f"{ours}.cross_norm", f"{hf}.1.layer_norm", c)
                f = 2
            if c.gated:
                out += linear(f"{ours}.ffn.w_gate", f"{hf}.{f}.DenseReluDense.wi_0", False)
                out += linear(f"{ours}.ffn.w_in", f"{hf}.{f}.DenseReluDense.wi_1", False)
            else:
                out += linear(f"{ours}.ffn.w_in", f"{hf}.{f}.DenseReluDense.wi", False)
            out += linear(f"{ours}.ffn.w_out", f"{hf}.{f}.DenseReluDense.wo", False)
            out += norm(f"{ours}.ffn_norm", f"{hf}.{f}.layer_norm", c)
        out += norm(f"{stack}.final_norm", f"{stack}.final_layer_norm", c)
    if not c.tie_embeddings:
        out += [Rule("lm_head.proj.weight", ("lm_head.weight",))]
    return out


def _tied_unscaled_head(c: ModelConfig) -> dict[str, str]:
    """A tied but unscaled head is written out as an explicit lm_head.weight (see from_config)."""
    return {"lm_head.weight": "embed.tokens.weight"} if c.tie_embeddings and not c.scale_tied_logits else {}


for _name in ("t5", "mt5"):
    register(Family(
        model_type=_name,
        to_config=_to_config(_name),
        from_config=_from_config(_name),
        rules=rules,
        head=("shared.weight", "lm_head.weight"),
        redundant=("EncDecAttention.relative_attention_bias.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
        unused_fields=frozenset({"rope_theta"}),
        tokenizer_renames={"tokenizer.model": "spiece.model"},
        missing_head_is_tied=True,
        extra_exports=_tied_unscaled_head,
    ))
