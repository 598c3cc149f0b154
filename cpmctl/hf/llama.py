"""Llama (1, 2, 3.x): SwiGLU, RMSNorm, rotary positions with default, linear, llama3 or yarn scaling."""

from cpmctl.hf.decoder import DecoderSpec, is_true, register_decoder

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
}

FAMILY = register_decoder(DecoderSpec(
    model_type="llama",
    architecture="LlamaForCausalLM",
    defaults=DEFAULTS,
    refusals=(
        ("attention_bias", is_true, "attention_bias is true; cpmctl's Llama has no biases on q, k, v and o"),
        ("mlp_bias", is_true, "mlp_bias is true; cpmctl's Llama has no FFN biases"),
    ),
))
