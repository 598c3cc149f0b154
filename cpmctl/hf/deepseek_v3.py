"""DeepSeek-V3: multi-head latent attention (low-rank q and kv projections, decoupled rotary
dims, yarn rope scaling whose mscale also scales the attention scores), dense FFNs in the first
`first_k_dense_replace` layers, then MoE layers: sigmoid expert scores, experts chosen on the
scores plus e_score_correction_bias within each token's best `topk_group` of `n_group` groups,
weighted by the unbiased scores (renormalised with norm_topk_prob) times routed_scaling_factor,
plus `n_shared_experts` always-on experts (one FFN of n_shared_experts * moe_intermediate_size).

Published checkpoints also carry the multi-token-prediction module used in training and for
speculative decoding: `num_nextn_predict_layers` (transformers writes `num_mtp_layers`) layers
after the last, at `model.layers.{num_hidden_layers}.*`: enorm, hnorm, eh_proj, a full MoE decoder
layer, embed_tokens and shared_head. It never feeds the next-token logits, so import drops it with
a log line (as transformers does); any other unexpected tensor is still refused.

Not implemented, refused by name: other routers (scoring_func other than sigmoid, topk_method
other than noaux_tc), MoE every few layers (moe_layer_freq > 1), attention biases, and fp8
block-quantized weights (quantization_config: dequantize them first)."""

import math
from collections.abc import Mapping
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.hf.decoder import DecoderSpec, is_true, register_decoder
from cpmctl.hf.experts import MoESpec, expert_count, moe_layers, refuse_moe_features, sparse_layers, top_k
from cpmctl.hf.family import Rule, integer, linear, norm, number

DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
}

ROUTER_REFUSALS = {
    "scoring_func": lambda v: v != "sigmoid",
    "topk_method": lambda v: v not in ("noaux_tc", None),
    "moe_layer_freq": lambda v: v != 1,
}


def _mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def read_extra(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("quantization_config") is not None:
        method = (hf["quantization_config"] or {}).get("quant_method") if isinstance(hf["quantization_config"], dict) else None
        raise UserError(f"unsupported deepseek_v3 feature quantization_config (quant_method={method!r}): cpmctl reads "
                        "floating-point weights; dequantize the checkpoint to bfloat16 first")
    q_rank = hf.get("q_lora_rank", DEFAULTS["q_lora_rank"])
    mla = dict(kv_lora_rank=integer(hf, "kv_lora_rank", DEFAULTS["kv_lora_rank"]),
               qk_nope_dim=integer(hf, "qk_nope_head_dim", DEFAULTS["qk_nope_head_dim"]),
               qk_rope_dim=integer(hf, "qk_rope_head_dim", DEFAULTS["qk_rope_head_dim"]),
               v_head_dim=integer(hf, "v_head_dim", DEFAULTS["v_head_dim"]),
               q_lora_rank=None if q_rank is None else integer(hf, "q_lora_rank"),
               rope_interleave=bool(hf.get("rope_interleave", True)))
    qk = mla["qk_nope_dim"] + mla["qk_rope_dim"]
    return {"mla": mla, "d_head": qk, "rotary_dim": mla["qk_rope_dim"]}


def query_scale(fields: Mapping[str, Any]) -> dict[str, Any]:
    """query_scale: qk_head_dim ** -0.5, times yarn's mscale(factor, mscale_all_dim) squared
    (DeepSeek's softmax scale), from the translated fields."""
    scale = fields["d_head"] ** -0.5
    rope = fields.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = rope.get("factor") or fields["max_positions"] / rope["original_max_position_embeddings"]
        scale *= _mscale(factor, rope["mscale_all_dim"]) ** 2
    return {"query_scale": scale}


def read(hf: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    refuse_moe_features(hf, "deepseek_v3", ROUTER_REFUSALS)
    experts, key = expert_count(hf, ("n_routed_experts", "num_local_experts"), "deepseek_v3", DEFAULTS["n_routed_experts"])
    size = integer(hf, "moe_intermediate_size", DEFAULTS["moe_intermediate_size"])
    shared = integer(hf, "n_shared_experts", DEFAULTS["n_shared_experts"]) or 0
    first = integer(hf, "first_k_dense_replace", DEFAULTS["first_k_dense_replace"])
    groups = integer(hf, "n_group", DEFAULTS["n_group"]) or 1
    topk_groups = integer(hf, "topk_group", DEFAULTS["topk_group"]) or 1
    if experts % groups:
        raise UserError(f"deepseek_v3 config.json splits {experts} experts into n_group={groups} groups; they must divide")
    moe = dict(experts=experts, expert_size=size, top_k=top_k(hf, experts, key, "deepseek_v3", DEFAULTS["num_experts_per_tok"]),
               router="linear", scoring="sigmoid", norm_topk=bool(hf.get("norm_topk_prob", True)), score_bias=True,
               groups=groups, topk_groups=topk_groups,
               routed_scale=number(hf, "routed_scaling_factor", DEFAULTS["routed_scaling_factor"]),
               shared_size=size * shared, layers=moe_layers(n_layers, list(range(min(first, n_layers), n_layers))))
    return {"moe": moe}


def write(c: ModelConfig) -> dict[str, Any]:
    moe, mla = c.moe, c.mla
    if mla is None:
        raise KeyError("DeepSeek-V3 attends with multi-head latent attention, and this model does not")
    sparse = sparse_layers(c)
    if not sparse or sparse != list(range(sparse[0], c.n_layers)):
        raise KeyError("DeepSeek-V3's MoE layers are the last ones (first_k_dense_replace)")
    if moe.scoring != "sigmoid" or not moe.score_bias or moe.shared_gate or moe.shared_size % moe.expert_size:
        raise KeyError("DeepSeek-V3 routes with sigmoid scores and a selection bias, and its shared experts are "
                       "ungated multiples of the expert size")
    rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    return {
        "n_routed_experts": moe.experts, "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.expert_size,
        "n_shared_experts": moe.shared_size // moe.expert_size, "routed_scaling_factor": moe.routed_scale,
        "n_group": moe.groups, "topk_group": moe.topk_groups, "norm_topk_prob": moe.norm_topk,
        "first_k_dense_replace": sparse[0], "kv_lora_rank": mla.kv_lora_rank, "q_lora_rank": mla.q_lora_rank,
        "qk_nope_head_dim": mla.qk_nope_dim, "qk_rope_head_dim": mla.qk_rope_dim, "v_head_dim": mla.v_head_dim,
        "rope_interleave": mla.rope_interleave, "head_dim": mla.qk_rope_dim, "rope_parameters": rope,
        "attention_bias": False,
    }


def attention_rules(c: ModelConfig, ours: str, hf: str) -> list[Rule]:
    out = []
    if c.mla.q_lora_rank is None:
        out += linear(f"{ours}.q", f"{hf}.q_proj", False)
    else:
        out += linear(f"{ours}.q_a", f"{hf}.q_a_proj", False)
        out += norm(f"{ours}.q_a_norm", f"{hf}.q_a_layernorm", c)
        out += linear(f"{ours}.q_b", f"{hf}.q_b_proj", False)
    out += linear(f"{ours}.kv_a", f"{hf}.kv_a_proj_with_mqa", False)
    out += norm(f"{ours}.kv_a_norm", f"{hf}.kv_a_layernorm", c)
    out += linear(f"{ours}.kv_b", f"{hf}.kv_b_proj", False)
    out += linear(f"{ours}.o", f"{hf}.o_proj", False)
    return out


FAMILY = register_decoder(DecoderSpec(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    defaults=DEFAULTS,
    read_extra=read_extra,
    derive=query_scale,
    moe=MoESpec(read=read, write=write, shared="shared_experts", score_bias="e_score_correction_bias"),
    attention_rules=attention_rules,
    # the published configs' key, and the one transformers 5 writes
    extra_layers=(("num_nextn_predict_layers", "num_mtp_layers"), "multi-token-prediction layers"),
    refusals=(("attention_bias", is_true, "attention_bias is true; cpmctl's DeepSeek-V3 has no attention biases"),),
))
