"""Phi-3: Llama's computation with fused qkv_proj and gate_up_proj weights, partial rotary when the
config names partial_rotary_factor, and a sliding window on every layer when it names one."""

from cpmctl.hf.decoder import DecoderSpec, register_decoder

DEFAULTS = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None, "bos_token_id": 1,
    "eos_token_id": 32000, "pad_token_id": 32000,
}

FAMILY = register_decoder(DecoderSpec(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    defaults=DEFAULTS,
    fused_qkv=True,
    fused_gate_up=True,
    sliding="all",
))
