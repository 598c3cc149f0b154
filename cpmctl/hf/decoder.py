"""The Llama-shaped decoder families' shared translation: what Llama, Mistral, Qwen2, Qwen3, Gemma,
Gemma 2 and Phi-3 have in common, with each difference a `DecoderSpec` switch. Each family's own
module states its switches, defaults and refusals; this module turns them into a `Family`.

Layer tensors (under `model.layers.{i}.`), per switch:
    self_attn.{q,k,v}_proj (+ .bias with qkv_bias) | self_attn.qkv_proj (fused_qkv)
    self_attn.{q,k}_norm (qk_norm), self_attn.o_proj
    mlp.{gate,up,down}_proj | mlp.gate_up_proj (fused_gate_up: gate rows first, then up)
    MoE layers (moe): the family's MoESpec (cpmctl/hf/experts.py): router, experts, shared expert
    input_layernorm, post_attention_layernorm (the FFN's pre-norm; with sandwich norms it is the
    attention's post-norm and pre_/post_feedforward_layernorm surround the FFN)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.hf.experts import MoESpec, expert_rules
from cpmctl.hf.family import ACT_TO_HF, Family, Rule, WeightFacts, activation, fused, integer, linear, norm, number, register, special_ids

ROTARY_BUFFERS = ("rotary_emb.inv_freq",)  # recomputed from the config by transformers and by us


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    architecture: str
    defaults: Mapping[str, Any]  # the family's config-class defaults (keys absent from config.json)
    act_key: str = "hidden_act"
    qkv_bias: bool = False  # always biased q/k/v (Qwen2)
    qk_norm: bool = False  # Qwen3
    qk_norm_full: bool = False  # OLMoE: the q/k norms span all heads
    moe: MoESpec | None = None  # the MoE families' layers and router
    # Fields computed from the translated ones (DeepSeek's attention scale from its yarn scaling).
    derive: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    # A family's own attention tensors (DeepSeek's latent attention): (config, ours, hf) -> rules.
    attention_rules: Callable[[ModelConfig, str, str], list[Rule]] | None = None
    gemma: bool = False  # (1 + w) norms, embeddings scaled by sqrt(d), tied head
    sandwich: bool = False  # Gemma 2: pre- and post-norms around attention and FFN
    fused_qkv: bool = False  # Phi-3
    fused_gate_up: bool = False  # Phi-3
    # "none": no sliding window; "all": every layer slides when sliding_window is set (Mistral,
    # Phi-3, Mixtral, Qwen3-MoE); "layer_types": the layers config.json's layer_types names
    # "sliding_attention" (Qwen2, Qwen3, Qwen2-MoE, Gemma 2), or when it names none, those
    # `default_layer_types(config.json, n_layers, window)` gives (the family config class's rule).
    sliding: str = "none"
    default_layer_types: Callable[[Mapping[str, Any], int, int | None], list[str]] | None = None
    # The Qwen families: sliding_window counts only when use_sliding_window is true (and export
    # writes use_sliding_window).
    sliding_switch: bool = False
    # Family-specific fields read from / written to config.json beyond the shared ones.
    read_extra: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    write_extra: Callable[[ModelConfig], dict[str, Any]] | None = None
    # Decoder layers a published checkpoint carries after num_hidden_layers that the model does not
    # run: (the config.json keys that may give how many, what they are). Import drops them with a
    # log line; none are dropped when config.json names no count.
    extra_layers: tuple[tuple[str, ...], str] | None = None
    # config.json features of the family cpmctl does not implement: (key, is_bad(value), why).
    refusals: tuple[tuple[str, Callable[[Any], bool], str], ...] = ()
    unused_fields: frozenset[str] = field(default_factory=lambda: frozenset(
        {"relative_buckets", "relative_max_distance", "decoder_start_token_id"}))


def _rope(spec: DecoderSpec, hf: Mapping[str, Any]) -> dict[str, Any]:
    """rope_theta, rope_scaling and rotary_dim from config.json, in either transformers' newer
    `rope_parameters` or the older top-level `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for what, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise UserError(f"config.json field {what} must be an object, got {value!r}")
    def kind_of(value: dict | None) -> str:
        return (value or {}).get("rope_type", (value or {}).get("type", "default")) or "default"

    # Older configs state the scaling in rope_scaling beside a plain rope_parameters (or none):
    # whichever names a scaling decides, and two different ones are refused.
    kinds = {kind_of(params), kind_of(scaling)} - {"default"}
    if len(kinds) > 1:
        raise UserError(f"config.json names two rope scalings, {' and '.join(sorted(kinds))} (rope_parameters and rope_scaling)")
    kind = kinds.pop() if kinds else "default"
    merged = {**(params or {}), **(scaling or {})} if kind_of(scaling) != "default" else {**(scaling or {}), **(params or {})}
    theta = merged.get("rope_theta", hf.get("rope_theta", spec.defaults.get("rope_theta", 10000.0)))
    factor = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    d_head = _d_head(spec, hf)
    fields: dict[str, Any] = {"rope_theta": float(theta), "rotary_dim": None, "rope_scaling": None}
    if factor not in (None, 1, 1.0):
        if not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise UserError(f"unsupported partial_rotary_factor {factor!r}; expected a number in (0, 1]")
        fields["rotary_dim"] = int(d_head * factor)
    if kind == "default":
        return fields
    keys = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "yarn": ("original_max_position_embeddings",),
    }
    if kind not in keys:
        raise UserError(f"unsupported rope scaling {kind!r} in config.json; cpmctl implements rope_type "
                        "'default', 'linear', 'llama3' and 'yarn'")
    scaled = {"rope_type": kind}
    for key in (*keys[kind], "factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"):
        value = merged.get(key, hf.get(key) if key == "original_max_position_embeddings" else None)
        if key in keys[kind] and value is None:
            raise UserError(f"rope scaling {kind!r} needs {key} in config.json")
        if value is not None and (key in keys[kind] or kind == "yarn"):
            scaled[key] = value
    fields["rope_scaling"] = scaled
    return fields


def _d_head(spec: DecoderSpec, hf: Mapping[str, Any]) -> int:
    d_model = integer(hf, "hidden_size", spec.defaults["hidden_size"])
    n_heads = integer(hf, "num_attention_heads", spec.defaults["num_attention_heads"])
    default = spec.defaults.get("head_dim") or (d_model // n_heads if n_heads else None)
    return integer(hf, "head_dim", default)


def _sliding(spec: DecoderSpec, hf: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    none = {"sliding_window": None, "sliding_layers": None}
    if spec.sliding == "none":
        return none
    # an explicit null is no window (the class default applies only when the key is absent)
    window = integer(hf, "sliding_window") if "sliding_window" in hf else spec.defaults.get("sliding_window")
    switched_off = spec.sliding_switch and not hf.get("use_sliding_window", False)
    if switched_off:
        window = None  # transformers ignores sliding_window unless use_sliding_window
    types = hf.get("layer_types")
    if spec.sliding == "all":
        if types is not None and len(set(types)) > 1:
            raise UserError(f"unsupported {spec.model_type} feature layer_types={types!r}: cpmctl's {spec.model_type} "
                            "slides every layer (alternating layers are Gemma 2's)")
        return {"sliding_window": window, "sliding_layers": None}
    if types is None:
        types = spec.default_layer_types(hf, n_layers, window)
    if not isinstance(types, list) or len(types) != n_layers:
        raise UserError(f"config.json field layer_types must list {n_layers} layer types, got {types!r}")
    unknown = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if unknown:
        raise UserError(f"unsupported {spec.model_type} layer type(s) {', '.join(map(repr, unknown))} in layer_types; "
                        "cpmctl implements 'full_attention' and 'sliding_attention'")
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if layers and window is None and spec.sliding_switch:
        # transformers has no window for these layers: Qwen2-MoE gives them 0 positions, Qwen2 fails
        raise UserError(f"{spec.model_type} config.json names sliding_attention layers in layer_types but "
                        + ("use_sliding_window is false" if switched_off else "no sliding_window"))
    if window is None or not layers:
        return none
    return {"sliding_window": window, "sliding_layers": None if len(layers) == n_layers else layers}


def alternate_layer_types(hf: Mapping[str, Any], n_layers: int, window: int | None) -> list[str]:
    """Gemma 2: layers 0, 2, 4, ... slide."""
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]


def upper_layer_types(hf: Mapping[str, Any], n_layers: int, window: int | None) -> list[str]:
    """Qwen2, Qwen3: the layers from max_window_layers on slide (when there is a window)."""
    first = integer(hf, "max_window_layers", 28)  # both config classes' default
    return ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n_layers)]


def first_sliding_layer(c: ModelConfig) -> dict[str, Any]:
    """Qwen2's and Qwen3's max_window_layers for a config whose sliding layers are the last ones."""
    return {"max_window_layers": next((i for i in range(c.n_layers) if c.is_sliding_layer(i)), c.n_layers)}


def _to_config(spec: DecoderSpec):
    d = spec.defaults

    def to_config(hf: Mapping[str, Any], facts: WeightFacts) -> dict[str, Any]:
        for key, bad, why in spec.refusals:
            if key in hf and bad(hf[key]):
                raise UserError(f"unsupported {spec.model_type} feature {key}={hf[key]!r}: {why}")
        n_heads = integer(hf, "num_attention_heads", d["num_attention_heads"])
        n_layers = integer(hf, "num_hidden_layers", d["num_hidden_layers"])
        act_name = hf.get(spec.act_key, d[spec.act_key])
        if spec.gemma and act_name == "gelu":
            act_name = "gelu_pytorch_tanh"  # transformers reads Gemma's legacy "gelu" as the tanh approximation
        tie_default = d.get("tie_word_embeddings", False)
        fields = {
            "init_std": number(hf, "initializer_range", 0.02),
            "arch": "decoder",
            "vocab_size": integer(hf, "vocab_size", d["vocab_size"]),
            "d_model": integer(hf, "hidden_size", d["hidden_size"]),
            "n_heads": n_heads,
            "n_kv_heads": integer(hf, "num_key_value_heads", d.get("num_key_value_heads") or n_heads),
            "d_head": _d_head(spec, hf),
            "d_ff": integer(hf, "intermediate_size", d["intermediate_size"]),
            "n_layers": n_layers,
            "norm": "rms",
            "norm_position": "pre",
            "norm_eps": number(hf, "rms_norm_eps", d["rms_norm_eps"]),
            "position": "rotary",
            "max_positions": integer(hf, "max_position_embeddings", d["max_position_embeddings"]),
            **_rope(spec, hf),
            "activation": activation(act_name, spec.act_key),
            "gated": True,
            "bias": False,
            "qkv_bias": spec.qkv_bias,
            "qk_norm": spec.qk_norm,
            "qk_norm_full": spec.qk_norm_full,
            "norm_offset": 1.0 if spec.gemma else 0.0,
            "scale_embeddings": spec.gemma,
            "post_norms": spec.sandwich,
            "attn_scale": True,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", tie_default)) if facts.head_tied is None else facts.head_tied,
            "scale_tied_logits": False,
            "lm_head": True,
            "dropout": number(hf, "attention_dropout", 0.0),
            **_sliding(spec, hf, n_layers),
            **special_ids(hf, {k: d.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}),
        }
        if spec.read_extra is not None:
            fields.update(spec.read_extra(hf))
        if spec.moe is not None:
            fields.update(spec.moe.read(hf, n_layers))
        if spec.derive is not None:
            fields.update(spec.derive(fields))
        return fields

    return to_config


def _layer_types(c: ModelConfig) -> list[str]:
    return ["sliding_attention" if c.is_sliding_layer(i) else "full_attention" for i in range(c.n_layers)]


def _from_config(spec: DecoderSpec):
    def from_config(c: ModelConfig) -> dict[str, Any]:
        rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
        if c.rotary_dim is not None:
            rope["partial_rotary_factor"] = c.rotary_dim / c.d_head
        hf = {
            "architectures": [spec.architecture],
            "model_type": spec.model_type,
            "vocab_size": c.vocab_size,
            "hidden_size": c.d_model,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.d_head,
            "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layers,
            "rms_norm_eps": c.norm_eps,
            "max_position_embeddings": c.max_positions,
            "rope_theta": c.rope_theta,
            "rope_parameters": rope,
            spec.act_key: "gelu_pytorch_tanh" if c.activation == "gelu_tanh" else ACT_TO_HF[c.activation],
            "tie_word_embeddings": c.tie_embeddings,
            "attention_dropout": c.dropout,
            "initializer_range": c.init_std,
            "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id, "bos_token_id": c.bos_token_id,
        }
        if spec.model_type != "qwen2":
            hf["attention_bias"] = False
        if spec.model_type == "llama":
            hf["mlp_bias"] = False
        if spec.sliding == "all":
            hf["sliding_window"] = c.sliding_window
        elif spec.sliding == "layer_types":
            hf["sliding_window"] = c.sliding_window
            hf["layer_types"] = _layer_types(c)
        if spec.sliding_switch:
            hf["use_sliding_window"] = c.sliding_window is not None
        if spec.write_extra is not None:
            hf.update(spec.write_extra(c))
        if spec.moe is not None:
            hf.update(spec.moe.write(c))
        return hf

    return from_config


def _rules(spec: DecoderSpec):
    def rules(c: ModelConfig, p: str) -> list[Rule]:
        out = [Rule("embed.tokens.weight", (f"{p}embed_tokens.weight",))]
        for i in range(c.n_layers):
            ours, hf = f"decoder.blocks.{i}", f"{p}layers.{i}"
            attn = f"{hf}.self_attn"
            if spec.attention_rules is not None:
                out += spec.attention_rules(c, f"{ours}.attn", attn)
            elif spec.fused_qkv:
                out += linear(f"{ours}.attn.qkv", f"{attn}.qkv_proj", c.qkv_bias)
            else:
                out += fused(f"{ours}.attn.qkv", tuple(f"{attn}.{n}_proj" for n in "qkv"), c.qkv_bias)
            if c.qk_norm:
                out += norm(f"{ours}.attn.q_norm", f"{attn}.q_norm", c)
                out += norm(f"{ours}.attn.k_norm", f"{attn}.k_norm", c)
            if spec.attention_rules is None:
                out += linear(f"{ours}.attn.o", f"{attn}.o_proj", False)
            if c.is_moe_layer("decoder", i):
                out += expert_rules(spec.moe, c, f"{ours}.ffn", hf)
            elif spec.fused_gate_up:
                up = f"{hf}.mlp.gate_up_proj.weight"
                out += [Rule(f"{ours}.ffn.w_gate.weight", (up,), "split", 0, 2), Rule(f"{ours}.ffn.w_in.weight", (up,), "split", 1, 2)]
            else:
                out += linear(f"{ours}.ffn.w_gate", f"{hf}.mlp.gate_proj", False)
                out += linear(f"{ours}.ffn.w_in", f"{hf}.mlp.up_proj", False)
            if not c.is_moe_layer("decoder", i):
                out += linear(f"{ours}.ffn.w_out", f"{hf}.mlp.down_proj", False)
            out += norm(f"{ours}.attn_norm", f"{hf}.input_layernorm", c)
            if c.post_norms:
                out += norm(f"{ours}.attn_post_norm", f"{hf}.post_attention_layernorm", c)
                out += norm(f"{ours}.ffn_norm", f"{hf}.pre_feedforward_layernorm", c)
                out += norm(f"{ours}.ffn_post_norm", f"{hf}.post_feedforward_layernorm", c)
            else:
                out += norm(f"{ours}.ffn_norm", f"{hf}.post_attention_layernorm", c)
        out += norm("decoder.final_norm", f"{p}norm", c)
        if not c.tie_embeddings:
            out += [Rule("lm_head.proj.weight", ("lm_head.weight",))]
        return out

    return rules


def register_decoder(spec: DecoderSpec) -> Family:
    return register(Family(
        model_type=spec.model_type,
        to_config=_to_config(spec),
        from_config=_from_config(spec),
        rules=_rules(spec),
        prefix="model.",
        head=("embed_tokens.weight", "lm_head.weight"),
        redundant=ROTARY_BUFFERS,
        unused_fields=spec.unused_fields,
        moe=spec.moe is not None,
        extra_layers=None if spec.extra_layers is None else _extra_layers(spec),
    ))


def _extra_layers(spec: DecoderSpec) -> Callable[[Mapping[str, Any]], tuple[range, str]]:
    keys, what = spec.extra_layers

    def extra_layers(hf: Mapping[str, Any]) -> tuple[range, str]:
        n_layers = integer(hf, "num_hidden_layers", spec.defaults["num_hidden_layers"])
        key = next((k for k in keys if hf.get(k) is not None), keys[0])
        count = integer(hf, key, 0)
        if count < 0:
            raise UserError(f"config.json field {key} must be >= 0, got {count}")
        return range(n_layers, n_layers + count), what

    return extra_layers


def is_true(value: Any) -> bool:
    return bool(value)
