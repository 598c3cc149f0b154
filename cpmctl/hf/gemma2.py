"""Gemma 2: Gemma plus soft-capped attention scores and logits, norms before and after attention and
FFN, sliding-window attention on alternate layers, and scores scaled by query_pre_attn_scalar**-0.5."""

from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.hf.decoder import DecoderSpec, alternate_layer_types, is_true, register_decoder
from cpmctl.hf.family import number

DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "sliding_window": 4096,
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}


def _cap(hf: Mapping[str, Any], key: str, default: float) -> float | None:
    """A soft cap: the default when absent, none when config.json says null."""
    return None if key in hf and hf[key] is None else number(hf, key, default)


def read_extra(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "query_scale": number(hf, "query_pre_attn_scalar", 256) ** -0.5,
        "attn_softcap": _cap(hf, "attn_logit_softcapping", 50.0),
        "logit_softcap": _cap(hf, "final_logit_softcapping", 30.0),
    }


def write_extra(c: ModelConfig) -> dict[str, Any]:
    scalar = (c.query_scale if c.query_scale is not None else c.d_head**-0.5) ** -2
    return {
        # an integer in every released config; rounding off the float error keeps the round trip exact
        "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
        "attn_logit_softcapping": c.attn_softcap,
        "final_logit_softcapping": c.logit_softcap,
    }


FAMILY = register_decoder(DecoderSpec(
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    defaults=DEFAULTS,
    act_key="hidden_activation",
    gemma=True,
    sandwich=True,
    sliding="layer_types",
    default_layer_types=alternate_layer_types,
    read_extra=read_extra,
    write_extra=write_extra,
    refusals=(
        ("attention_bias", is_true, "attention_bias is true; cpmctl's Gemma 2 has no attention biases"),
        ("use_bidirectional_attention", is_true, "cpmctl's Gemma 2 is a causal decoder"),
    ),
))
