"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k RMSNorm, no biases)
with MoE FFNs: softmax over all experts, the top-k kept and renormalised when norm_topk_prob, no
shared expert. mlp_only_layers and decoder_sparse_step name the dense layers, as in Qwen2-MoE.
With use_sliding_window, every layer attends through sliding_window (transformers' Qwen3-MoE
builds one mask for all layers; max_window_layers is unused)."""

from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.hf.decoder import DecoderSpec, is_true, register_decoder
from cpmctl.hf.experts import MoESpec, expert_count, moe_layers, top_k
from cpmctl.hf.family import integer
from cpmctl.hf.qwen2_moe import sparse_from_config, sparse_to_config

DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096, "bos_token_id": None,
    "eos_token_id": None, "pad_token_id": None, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
}


def read(hf: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    experts, key = expert_count(hf, ("num_experts", "num_local_experts"), "qwen3_moe", DEFAULTS["num_experts"])
    moe = dict(experts=experts, expert_size=integer(hf, "moe_intermediate_size", DEFAULTS["moe_intermediate_size"]),
               top_k=top_k(hf, experts, key, "qwen3_moe", DEFAULTS["num_experts_per_tok"]), router="linear",
               norm_topk=bool(hf.get("norm_topk_prob", False)),
               layers=moe_layers(n_layers, sparse_from_config(hf, n_layers, "qwen3_moe")))
    return {"moe": moe}


def write(c: ModelConfig) -> dict[str, Any]:
    return {"num_experts": c.moe.experts, "num_experts_per_tok": c.moe.top_k, "moe_intermediate_size": c.moe.expert_size,
            "norm_topk_prob": c.moe.norm_topk, "attention_bias": False, **sparse_to_config(c)}


FAMILY = register_decoder(DecoderSpec(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    defaults=DEFAULTS,
    qk_norm=True,
    sliding="all",
    sliding_switch=True,
    moe=MoESpec(read=read, write=write),
    refusals=(
        ("attention_bias", is_true, "attention_bias is true; cpmctl's Qwen3-MoE has no biases on q, k, v and o"),
    ),
))
