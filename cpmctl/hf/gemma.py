"""Gemma: embeddings scaled by sqrt(d), (1 + w) RMSNorm, gated tanh-GELU, a head_dim of its own, tied head."""

from cpmctl.hf.decoder import DecoderSpec, is_true, register_decoder

DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 2,
    "eos_token_id": 1, "pad_token_id": 0,
}

FAMILY = register_decoder(DecoderSpec(
    model_type="gemma",
    architecture="GemmaForCausalLM",
    defaults=DEFAULTS,
    gemma=True,
    refusals=(
        ("attention_bias", is_true, "attention_bias is true; cpmctl's Gemma has no attention biases"),
        ("use_bidirectional_attention", is_true, "cpmctl's Gemma is a causal decoder"),
    ),
))
