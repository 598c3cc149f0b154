"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (biased q, k, v) with MoE FFNs:
softmax over all experts, the top-k kept (renormalised when norm_topk_prob), plus a shared expert
whose output is scaled by a sigmoid gate. Layers listed in mlp_only_layers, or not on the
decoder_sparse_step grid, are dense FFNs of intermediate_size.

Sliding windows as transformers' Qwen2MoeConfig gives them: only with use_sliding_window, on the
layers layer_types names "sliding_attention", or when config.json lists none, on the even layers
below max_window_layers (0, 2, 4, ...; not Qwen2's layers from max_window_layers on)."""

from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.hf.decoder import DecoderSpec, register_decoder
from cpmctl.hf.experts import MoESpec, expert_count, moe_layers, sparse_layers, top_k
from cpmctl.hf.family import integer

DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "decoder_sparse_step": 1,
}


def sparse_from_config(hf: Mapping[str, Any], n_layers: int, family: str) -> list[int]:
    """The MoE layers as transformers builds them: on the decoder_sparse_step grid, minus mlp_only_layers."""
    step = integer(hf, "decoder_sparse_step", 1)
    if step < 1:
        raise UserError(f"{family} config.json field decoder_sparse_step must be >= 1, got {step}")
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise UserError(f"{family} config.json field mlp_only_layers must list layer indices, got {dense!r}")
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


def sparse_to_config(c: ModelConfig) -> dict[str, Any]:
    sparse = sparse_layers(c)
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(c.n_layers) if i not in sparse]}


def read(hf: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    experts, key = expert_count(hf, ("num_experts", "num_local_experts"), "qwen2_moe", DEFAULTS["num_experts"])
    shared = integer(hf, "shared_expert_intermediate_size", DEFAULTS["shared_expert_intermediate_size"])
    if shared < 1:
        raise UserError(f"unsupported qwen2_moe feature shared_expert_intermediate_size={shared}: cpmctl's Qwen2-MoE "
                        "has a shared expert of at least one neuron")
    moe = dict(experts=experts, expert_size=integer(hf, "moe_intermediate_size", DEFAULTS["moe_intermediate_size"]),
               top_k=top_k(hf, experts, key, "qwen2_moe", DEFAULTS["num_experts_per_tok"]), router="linear",
               norm_topk=bool(hf.get("norm_topk_prob", False)), shared_size=shared, shared_gate=True,
               layers=moe_layers(n_layers, sparse_from_config(hf, n_layers, "qwen2_moe")))
    return {"moe": moe}


def write(c: ModelConfig) -> dict[str, Any]:
    if not c.moe.shared_gate:
        raise KeyError("Qwen2-MoE always has a sigmoid-gated shared expert, and this model has none")
    return {"num_experts": c.moe.experts, "num_experts_per_tok": c.moe.top_k, "moe_intermediate_size": c.moe.expert_size,
            "shared_expert_intermediate_size": c.moe.shared_size, "norm_topk_prob": c.moe.norm_topk,
            "qkv_bias": c.qkv_bias, "max_window_layers": 1 + max((i for i in range(c.n_layers) if c.is_sliding_layer(i)), default=-1),
            **sparse_to_config(c)}


def even_layer_types(hf: Mapping[str, Any], n_layers: int, window: int | None) -> list[str]:
    """Qwen2MoeConfig's layer types: layers 0, 2, 4, ... below max_window_layers slide, with use_sliding_window."""
    below = integer(hf, "max_window_layers", 28)  # the config class's default
    on = bool(hf.get("use_sliding_window", False))
    return ["sliding_attention" if on and i % 2 == 0 and i < below else "full_attention" for i in range(n_layers)]


FAMILY = register_decoder(DecoderSpec(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    defaults=DEFAULTS,
    read_extra=lambda hf: {"qkv_bias": bool(hf.get("qkv_bias", True))},
    moe=MoESpec(read=read, write=write, shared="shared_expert", shared_gate="shared_expert_gate"),
    sliding="layer_types",
    default_layer_types=even_layer_types,
    sliding_switch=True,
))
