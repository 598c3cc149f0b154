"""Qwen3: Qwen2 without the q/k/v biases, with a per-head RMSNorm on q and k and an explicit head_dim."""

from cpmctl.hf.decoder import DecoderSpec, first_sliding_layer, is_true, register_decoder, upper_layer_types

DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096,
    "max_window_layers": 28, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}

FAMILY = register_decoder(DecoderSpec(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    defaults=DEFAULTS,
    qk_norm=True,
    sliding="layer_types",
    default_layer_types=upper_layer_types,
    sliding_switch=True,
    write_extra=first_sliding_layer,
    refusals=(("attention_bias", is_true, "attention_bias is true; cpmctl's Qwen3 has no biases on q, k, v and o"),),
))
