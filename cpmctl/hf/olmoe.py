"""OLMoE: a decoder whose every FFN routes each token to the top-k of many small experts (softmax
over all experts, renormalised over the chosen ones when norm_topk_prob), with RMSNorms over the
whole q and k projections (all heads at once) and an optional clamp of q, k and v (clip_qkv)."""

from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.hf.decoder import DecoderSpec, is_true, register_decoder
from cpmctl.hf.experts import MoESpec, expert_count, moe_layers, top_k
from cpmctl.hf.family import integer, number

DEFAULTS = {
    "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 50279, "pad_token_id": 1,
    "num_experts": 64, "num_experts_per_tok": 8,
}


def read(hf: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    experts, key = expert_count(hf, ("num_experts", "num_local_experts"), "olmoe", DEFAULTS["num_experts"])
    size = integer(hf, "intermediate_size", DEFAULTS["intermediate_size"])
    moe = dict(experts=experts, expert_size=size, top_k=top_k(hf, experts, key, "olmoe", DEFAULTS["num_experts_per_tok"]),
               router="linear", norm_topk=bool(hf.get("norm_topk_prob", False)), layers=moe_layers(n_layers, list(range(n_layers))))
    clip = hf.get("clip_qkv")
    return {"moe": moe, "d_ff": size, "clip_qkv": None if clip is None else number(hf, "clip_qkv", None)}


def write(c: ModelConfig) -> dict[str, Any]:
    if c.moe.layers is not None:
        raise KeyError("every OLMoE layer is MoE, and this model has dense layers")
    if c.d_head * c.n_heads != c.d_model:
        raise KeyError("OLMoE's q norm spans hidden_size, so n_heads * d_head must equal d_model")
    return {"num_experts": c.moe.experts, "num_experts_per_tok": c.moe.top_k, "intermediate_size": c.moe.expert_size,
            "norm_topk_prob": c.moe.norm_topk, "clip_qkv": c.clip_qkv, "attention_bias": False}


FAMILY = register_decoder(DecoderSpec(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    defaults=DEFAULTS,
    qk_norm=True,
    qk_norm_full=True,
    moe=MoESpec(read=read, write=write),
    refusals=(("attention_bias", is_true, "attention_bias is true; cpmctl's OLMoE has no attention biases"),),
))
