"""Mistral: Llama's layout with sliding-window attention on every layer."""

from cpmctl.hf.decoder import DecoderSpec, register_decoder

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": None,
}

FAMILY = register_decoder(DecoderSpec(
    model_type="mistral",
    architecture="MistralForCausalLM",
    defaults=DEFAULTS,
    sliding="all",
))
