"""Mixtral: Mistral's decoder with every FFN a mixture of experts, each token sent to its top-k
experts (num_experts_per_tok of num_local_experts) weighted by a softmax over the chosen experts'
router logits. Published checkpoints name the layer block_sparse_moe, with experts w1 (gate),
w3 (up) and w2 (down); transformers' fused layout is read too (cpmctl/hf/experts.py)."""

from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.hf.decoder import DecoderSpec, register_decoder
from cpmctl.hf.experts import MoESpec, expert_count, moe_layers, top_k
from cpmctl.hf.family import integer

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": None, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2,
}


def read(hf: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    experts, key = expert_count(hf, ("num_local_experts", "num_experts"), "mixtral", DEFAULTS["num_local_experts"])
    size = integer(hf, "intermediate_size", DEFAULTS["intermediate_size"])
    # router_jitter_noise only perturbs training inputs; softmax over the chosen logits is the
    # weighting of cpmctl's linear router, so the routing fields keep their defaults.
    moe = dict(experts=experts, expert_size=size, top_k=top_k(hf, experts, key, "mixtral", DEFAULTS["num_experts_per_tok"]),
               router="linear", layers=moe_layers(n_layers, list(range(n_layers))))
    return {"moe": moe, "d_ff": size}


def write(c: ModelConfig) -> dict[str, Any]:
    if c.moe.layers is not None:
        raise KeyError("every Mixtral layer is MoE, and this model has dense layers")
    return {"num_local_experts": c.moe.experts, "num_experts_per_tok": c.moe.top_k, "intermediate_size": c.moe.expert_size,
            "router_jitter_noise": 0.0}


FAMILY = register_decoder(DecoderSpec(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    defaults=DEFAULTS,
    sliding="all",
    moe=MoESpec(read=read, write=write, block="block_sparse_moe", projections=("w1", "w3", "w2")),
))
