"""Hugging Face import and export: BERT, T5 / mT5, Llama and GPT-2 checkpoints <-> cpmctl.

`import_hf(src, out)` reads a Hugging Face model directory (config.json plus model.safetensors,
a sharded safetensors index, or pytorch_model.bin loaded with `weights_only=True`) and writes a
cpmctl checkpoint; `export_hf(checkpoint, out)` writes it back in the family's own format so
`transformers`' `AutoModel*.from_pretrained(out)` loads it. The architecture always comes from
config.json's `model_type`, never from file names.

Both directions are driven by one table of rules per family (`_rules`): each rule names one of
our tensors and the Hugging Face tensor(s) it is made of, and how (copied, concatenated along
the output dimension into our fused `qkv`/`kv`, or transposed from GPT-2's Conv1D [in, out]
layout). Import and export read the same table, so a round trip is bit-exact by construction.

What is deliberately not carried over:
- BERT's pooler (and any task head such as a classifier or BertForPreTraining's next-sentence
  head): cpmctl's encoder ends at the last hidden states. The dropped tensors are logged; an
  exported BertModel therefore has no pooler, and transformers initialises one at random
  (hidden states are unaffected).
- T5's unused encoder/decoder copies of the shared embedding and, in old checkpoints, the
  relative bias of the decoder's cross-attention (Hugging Face ignores it too).

Special token ids come from config.json. A missing pad id becomes the eos id (else 0), because
cpmctl's config needs one for batching; a list of eos ids (Llama 3) keeps its first entry.

T5's tied output head: in T5 v1.0 the decoder output is scaled by d_model**-0.5 before the tied
projection (`tie_embeddings=True, scale_tied_logits=True`); v1.1 and mT5 use an untied head and
no scaling. An output head whose weights are bit-identical to the input embedding is imported
as tied (old pytorch_model.bin files store tied weights under both names).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bert", "gpt2", "llama", "mt5", "t5")
STAGE = "convert-hf"

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Tokenizer files copied into (and back out of) a checkpoint's tokenizer/ directory.
# Sentencepiece models are stored as tokenizer.model, the name cpmctl's loader reads.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
_TOKENIZER_RENAMES = {"spiece.model": "tokenizer.model"}

# Hugging Face activation names -> ours (gelu_new, gelu_fast and gelu_pytorch_tanh are all the
# tanh approximation), and the name export writes for each of ours.
_ACT_FROM_HF = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# =============================================================================================
# Configs
# =============================================================================================


def family_of(hf_config: Mapping[str, Any]) -> str:
    """The cpmctl family of a Hugging Face config.json: its `model_type`, checked."""
    model_type = hf_config.get("model_type")
    if not model_type:
        archs = hf_config.get("architectures") or []
        hint = f" (architectures: {', '.join(archs)})" if archs else ""
        raise UserError(f"config.json has no model_type{hint}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported model_type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def _activation(name: Any, key: str) -> str:
    act = _ACT_FROM_HF.get(name) if isinstance(name, str) else None
    if act is None:
        raise UserError(f"unsupported activation {key}={name!r}; supported: {', '.join(sorted(_ACT_FROM_HF))}")
    return act


def _int(hf: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"config.json field {key} must be an integer, got {value!r}")
    return value


def _float(hf: Mapping[str, Any], key: str, default: float) -> float:
    value = hf.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"config.json field {key} must be a number, got {value!r}")
    return float(value)


def _special_ids(hf: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    def one(key: str) -> int | None:
        value = hf.get(key, defaults.get(key))
        if isinstance(value, list):
            if value:
                log.info("config.json lists several %s values %s; using the first, %s", key, value, value[0])
            value = value[0] if value else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"config.json field {key} must be an integer, got {value!r}")
        return value

    eos, bos, pad = one("eos_token_id"), one("bos_token_id"), one("pad_token_id")
    if pad is None:
        pad = eos if eos is not None else 0
    return {"pad_token_id": pad, "eos_token_id": eos, "bos_token_id": bos}


def _t5_feed_forward(hf: Mapping[str, Any], default: str) -> tuple[str, bool]:
    proj = hf.get("feed_forward_proj", default)
    parts = proj.split("-") if isinstance(proj, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UserError(f"unsupported T5 feed_forward_proj {proj!r}; expected 'relu', 'gated-gelu' or 'gated-<activation>'")
    gated = len(parts) == 2
    # Hugging Face reads "gated-gelu" as the tanh approximation (T5 v1.1's gelu_new).
    name = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return _activation(name, "feed_forward_proj"), gated


def _rope_theta(hf: Mapping[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for what, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise UserError(f"config.json field {what} must be an object, got {value!r}")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind not in (None, "default"):
            raise UserError(f"unsupported rope scaling {kind!r} in {what}; cpmctl supports only plain rotary positions (rope_type 'default')")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise UserError(f"unsupported partial_rotary_factor {factor}; cpmctl rotates whole heads")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta if theta is not None else 10000.0)


def _config_fields(family: str, hf: Mapping[str, Any], head_tied: bool | None, has_mlm: bool | None) -> dict[str, Any]:
    """ModelConfig fields for a Hugging Face config.json; absent keys take Hugging Face's defaults.

    `head_tied`: whether the output head is the input embedding (None: decide from the config).
    `has_mlm`: whether BERT weights include the MLM head (None: decide from `architectures`).
    """
    archs = [a for a in hf.get("architectures") or [] if isinstance(a, str)]
    common = {"init_std": _float(hf, "initializer_range", 0.02)}
    if family == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"unsupported BERT position_embedding_type {hf.get('position_embedding_type')!r}; only 'absolute' is supported")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise UserError("unsupported BERT variant: is_decoder/add_cross_attention models are not supported")
        if has_mlm is None:
            has_mlm = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)
        tied = bool(hf.get("tie_word_embeddings", True)) if head_tied is None else head_tied
        return {
            **common,
            "arch": "encoder",
            "vocab_size": _int(hf, "vocab_size", 30522),
            "d_model": _int(hf, "hidden_size", 768),
            "n_heads": _int(hf, "num_attention_heads", 12),
            "d_ff": _int(hf, "intermediate_size", 3072),
            "n_layers": _int(hf, "num_hidden_layers", 12),
            "norm": "layer",
            "norm_position": "post",
            "norm_eps": _float(hf, "layer_norm_eps", 1e-12),
            "position": "absolute",
            "max_positions": _int(hf, "max_position_embeddings", 512),
            "activation": _activation(hf.get("hidden_act", "gelu"), "hidden_act"),
            "gated": False,
            "bias": True,
            "attn_scale": True,
            "type_vocab_size": _int(hf, "type_vocab_size", 2),
            "tie_embeddings": bool(has_mlm and tied),
            "scale_tied_logits": False,
            "lm_head": bool(has_mlm),
            "lm_head_transform": bool(has_mlm),
            "lm_head_bias": bool(has_mlm),
            "dropout": _float(hf, "hidden_dropout_prob", 0.1),
            **_special_ids(hf, {"pad_token_id": 0}),
        }
    if family in ("t5", "mt5"):
        activation, gated = _t5_feed_forward(hf, "relu" if family == "t5" else "gated-gelu")
        if family == "t5":
            # Hugging Face scales the decoder output when the config ties the embeddings (T5 v1.0);
            # configs it wrote itself state the choice as scale_decoder_outputs.
            scale = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))
        else:
            scale = False  # transformers never scales mT5's logits
        tied = (scale if family == "t5" else bool(hf.get("tie_word_embeddings", True))) if head_tied is None else head_tied
        if scale and not tied:
            raise UserError(
                "T5 config.json ties the output head to the embedding (tie_word_embeddings/scale_decoder_outputs true) "
                "but lm_head.weight differs from shared.weight; set tie_word_embeddings to false if the head is untied"
            )
        n_layers = _int(hf, "num_layers", 6 if family == "t5" else 8)
        return {
            **common,
            "arch": "encoder-decoder",
            "vocab_size": _int(hf, "vocab_size", 32128 if family == "t5" else 250112),
            "d_model": _int(hf, "d_model", 512),
            "n_heads": _int(hf, "num_heads", 8 if family == "t5" else 6),
            "d_head": _int(hf, "d_kv", 64),
            "d_ff": _int(hf, "d_ff", 2048 if family == "t5" else 1024),
            "n_layers": n_layers,
            "n_decoder_layers": _int(hf, "num_decoder_layers", n_layers),
            "norm": "rms",
            "norm_position": "pre",
            "norm_eps": _float(hf, "layer_norm_epsilon", 1e-6),
            "position": "relative",
            "max_positions": _int(hf, "n_positions", 512),
            "relative_buckets": _int(hf, "relative_attention_num_buckets", 32),
            "relative_max_distance": _int(hf, "relative_attention_max_distance", 128),
            "activation": activation,
            "gated": gated,
            "bias": False,
            "attn_scale": False,
            "tie_embeddings": tied,
            "scale_tied_logits": scale and tied,
            "lm_head": True,
            "dropout": _float(hf, "dropout_rate", 0.1),
            **_special_ids(hf, {"pad_token_id": 0, "eos_token_id": 1}),
            "decoder_start_token_id": _int(hf, "decoder_start_token_id", None if family == "t5" else 0),
        }
    if family == "llama":
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise UserError(f"unsupported Llama variant: {key} is true; cpmctl's Llama has no biases")
        n_heads = _int(hf, "num_attention_heads", 32)
        d_model = _int(hf, "hidden_size", 4096)
        return {
            **common,
            "arch": "decoder",
            "vocab_size": _int(hf, "vocab_size", 32000),
            "d_model": d_model,
            "n_heads": n_heads,
            "n_kv_heads": _int(hf, "num_key_value_heads", n_heads),
            "d_head": _int(hf, "head_dim", d_model // n_heads if n_heads else None),
            "d_ff": _int(hf, "intermediate_size", 11008),
            "n_layers": _int(hf, "num_hidden_layers", 32),
            "norm": "rms",
            "norm_position": "pre",
            "norm_eps": _float(hf, "rms_norm_eps", 1e-6),
            "position": "rotary",
            "max_positions": _int(hf, "max_position_embeddings", 2048),
            "rope_theta": _rope_theta(hf),
            "activation": _activation(hf.get("hidden_act", "silu"), "hidden_act"),
            "gated": True,
            "bias": False,
            "attn_scale": True,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)) if head_tied is None else head_tied,
            "scale_tied_logits": False,
            "lm_head": True,
            "dropout": _float(hf, "attention_dropout", 0.0),
            **_special_ids(hf, {"bos_token_id": 1, "eos_token_id": 2}),
        }
    if family == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise UserError("unsupported GPT-2 variant: scale_attn_by_inverse_layer_idx is true")
        if hf.get("add_cross_attention"):
            raise UserError("unsupported GPT-2 variant: add_cross_attention is true")
        d_model = _int(hf, "n_embd", 768)
        return {
            **common,
            "arch": "decoder",
            "vocab_size": _int(hf, "vocab_size", 50257),
            "d_model": d_model,
            "n_heads": _int(hf, "n_head", 12),
            "d_ff": _int(hf, "n_inner", 4 * d_model),
            "n_layers": _int(hf, "n_layer", 12),
            "norm": "layer",
            "norm_position": "pre",
            "norm_eps": _float(hf, "layer_norm_epsilon", 1e-5),
            "position": "absolute",
            "max_positions": _int(hf, "n_positions", 1024),
            "activation": _activation(hf.get("activation_function", "gelu_new"), "activation_function"),
            "gated": False,
            "bias": True,
            "attn_scale": bool(hf.get("scale_attn_weights", True)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)) if head_tied is None else head_tied,
            "scale_tied_logits": False,
            "lm_head": True,
            "dropout": _float(hf, "resid_pdrop", 0.1),
            **_special_ids(hf, {"bos_token_id": 50256, "eos_token_id": 50256}),
        }
    raise UserError(f"unsupported model_type {family!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")


def _prefix(family: str, names: Iterator[str] | Mapping[str, Any]) -> str:
    """The base-model prefix the weights use ("bert.", "model.", "transformer." or none)."""
    wanted = {"bert": "bert.", "llama": "model.", "gpt2": "transformer."}.get(family)
    if wanted is None:
        return ""
    return wanted if any(name.startswith(wanted) for name in names) else ""


def _head_names(family: str, prefix: str) -> tuple[str, str]:
    """(input embedding, output head) tensor names in the Hugging Face weights."""
    return {
        "bert": (f"{prefix}embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
        "t5": ("shared.weight", "lm_head.weight"),
        "mt5": ("shared.weight", "lm_head.weight"),
        "llama": (f"{prefix}embed_tokens.weight", "lm_head.weight"),
        "gpt2": (f"{prefix}wte.weight", "lm_head.weight"),
    }[family]


def _head_tied(family: str, hf: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bool | None:
    """Whether the weights tie the output head to the embedding; None when the config decides."""
    embed, head = _head_names(family, _prefix(family, tensors))
    embed = _find(tensors, embed)
    if head not in tensors or embed is None:
        # transformers ties a missing head when the config says so (always for T5 and mT5).
        return True if family in ("t5", "mt5") else None
    a, b = tensors[head], tensors[embed]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def config_from_hf(hf_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json (as a dict).

    With `tensors` (the Hugging Face weights, name -> tensor) the weights settle what the config
    cannot: whether the output head is tied to the embedding and whether a BERT checkpoint has
    its MLM head.
    """
    family = family_of(hf_config)
    head_tied = has_mlm = None
    if tensors is not None:
        head_tied = _head_tied(family, hf_config, tensors)
        if family == "bert":
            has_mlm = "cls.predictions.transform.dense.weight" in tensors
    return ModelConfig(**_config_fields(family, hf_config, head_tied, has_mlm))


def export_family(config: ModelConfig) -> str:
    """The Hugging Face model_type a cpmctl config exports as; UserError if none fits."""
    if config.moe is not None:
        raise UserError("cannot export a mixture-of-experts model to Hugging Face: no supported family has MoE layers; restore the dense model first")
    if config.share_layers:
        raise UserError("cannot export a model with shared layers to Hugging Face: no supported family shares layers")
    if config.arch == "encoder-decoder":
        return "t5"
    if config.arch == "encoder":
        return "bert"
    return "llama" if config.norm == "rms" else "gpt2"


def config_to_hf(config: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """A Hugging Face config.json (as a dict) for `config`; UserError if the family cannot hold it.

    `model_type` picks between families that fit the same config ("t5" or "mt5"); by default
    the natural one. The result is checked: importing it gives back `config`'s fields exactly.
    """
    family = export_family(config)
    if model_type is not None and model_type != family:
        if not (family == "t5" and model_type == "mt5"):
            raise UserError(f"cannot export this {config.arch} model as {model_type!r}; it fits {family!r}")
        family = model_type
    c = config
    ids = {"pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id, "bos_token_id": c.bos_token_id}
    if family == "bert":
        hf = {
            "architectures": ["BertForMaskedLM" if c.lm_head else "BertModel"],
            "model_type": "bert",
            "vocab_size": c.vocab_size,
            "hidden_size": c.d_model,
            "num_attention_heads": c.n_heads,
            "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layers,
            "layer_norm_eps": c.norm_eps,
            "position_embedding_type": "absolute",
            "max_position_embeddings": c.max_positions,
            "hidden_act": _ACT_TO_HF[c.activation],
            "type_vocab_size": c.type_vocab_size,
            "tie_word_embeddings": c.tie_embeddings if c.lm_head else True,
            "hidden_dropout_prob": c.dropout,
            "attention_probs_dropout_prob": c.dropout,
            "initializer_range": c.init_std,
            **ids,
        }
        head_tied = c.tie_embeddings if c.lm_head else None
    elif family in ("t5", "mt5"):
        ff = _ACT_TO_HF[c.activation]
        hf = {
            "architectures": ["T5ForConditionalGeneration" if family == "t5" else "MT5ForConditionalGeneration"],
            "model_type": family,
            "is_encoder_decoder": True,
            "vocab_size": c.vocab_size,
            "d_model": c.d_model,
            "num_heads": c.n_heads,
            "d_kv": c.d_head,
            "d_ff": c.d_ff,
            "num_layers": c.n_layers,
            "num_decoder_layers": c.n_decoder_layers,
            "layer_norm_epsilon": c.norm_eps,
            "n_positions": c.max_positions,
            "relative_attention_num_buckets": c.relative_buckets,
            "relative_attention_max_distance": c.relative_max_distance,
            "feed_forward_proj": ("gated-gelu" if ff == "gelu_new" else f"gated-{ff}") if c.gated else ff,
            # Only a tied *and* scaled head is written as tied: with tie_word_embeddings false
            # every transformers version keeps the written lm_head and leaves the logits unscaled.
            "tie_word_embeddings": c.tie_embeddings and c.scale_tied_logits,
            "dropout_rate": c.dropout,
            "initializer_range": c.init_std,
            **ids,
            "decoder_start_token_id": c.decoder_start_token_id,
        }
        if family == "t5":
            hf["scale_decoder_outputs"] = c.tie_embeddings and c.scale_tied_logits
        head_tied = c.tie_embeddings
    elif family == "llama":
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "hidden_act": _ACT_TO_HF[c.activation],
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": c.tie_embeddings,
            "attention_dropout": c.dropout,
            "initializer_range": c.init_std,
            **ids,
        }
        head_tied = c.tie_embeddings
    else:
        hf = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.d_model,
            "n_head": c.n_heads,
            "n_inner": c.d_ff,
            "n_layer": c.n_layers,
            "layer_norm_epsilon": c.norm_eps,
            "n_positions": c.max_positions,
            "activation_function": _ACT_TO_HF[c.activation],
            "scale_attn_weights": c.attn_scale,
            "tie_word_embeddings": c.tie_embeddings,
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
            "initializer_range": c.init_std,
            **ids,
        }
        head_tied = c.tie_embeddings
    _check_lossless(family, c, hf, head_tied)
    return hf


# Config fields a family has no place for; they are not checked on export (imports set defaults).
_UNUSED_FIELDS = {
    "bert": {"relative_buckets", "relative_max_distance", "rope_theta", "decoder_start_token_id"},
    "t5": {"rope_theta"},
    "mt5": {"rope_theta"},
    "llama": {"relative_buckets", "relative_max_distance", "decoder_start_token_id"},
    "gpt2": {"relative_buckets", "relative_max_distance", "rope_theta", "decoder_start_token_id"},
}
_HEAD_FIELDS = {"tie_embeddings", "scale_tied_logits", "lm_head_transform", "lm_head_bias"}


def _check_lossless(family: str, config: ModelConfig, hf: Mapping[str, Any], head_tied: bool | None) -> None:
    """Raise a UserError naming the config fields the family's config.json cannot hold."""
    try:
        back = ModelConfig(**_config_fields(family, hf, head_tied, config.lm_head if family == "bert" else None))
    except UserError as exc:
        raise UserError(f"cannot export this model as Hugging Face {family}: {exc}") from None
    skip = _UNUSED_FIELDS[family] | (set() if config.lm_head else _HEAD_FIELDS)
    mismatched = [
        f"{f.name}={getattr(config, f.name)!r} (a {family} config gives {getattr(back, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in skip and getattr(config, f.name) != getattr(back, f.name)
    ]
    if mismatched:
        raise UserError(f"cannot export this model as Hugging Face {family}: it cannot represent {'; '.join(mismatched)}")


# =============================================================================================
# Tensors
# =============================================================================================


@dataclass(frozen=True)
class _Rule:
    """One of our tensors and the Hugging Face tensor(s) it is made of.

    op "copy": the same tensor; "cat": the HF tensors concatenated along dim 0 (our fused qkv/kv,
    in q, k, v order); "t": transposed (GPT-2's Conv1D stores Linear weights as [in, out]).
    """

    ours: str
    hf: tuple[str, ...]
    op: str = "copy"


def _linear(ours: str, hf: str, bias: bool, op: str = "copy") -> list[_Rule]:
    rules = [_Rule(f"{ours}.weight", (f"{hf}.weight",), op)]
    if bias:
        rules.append(_Rule(f"{ours}.bias", (f"{hf}.bias",), "copy"))
    return rules


def _fused(ours: str, hfs: tuple[str, ...], bias: bool) -> list[_Rule]:
    rules = [_Rule(f"{ours}.weight", tuple(f"{h}.weight" for h in hfs), "cat")]
    if bias:
        rules.append(_Rule(f"{ours}.bias", tuple(f"{h}.bias" for h in hfs), "cat"))
    return rules


def _norm(ours: str, hf: str, config: ModelConfig) -> list[_Rule]:
    rules = [_Rule(f"{ours}.weight", (f"{hf}.weight",))]
    if config.norm == "layer":
        rules.append(_Rule(f"{ours}.bias", (f"{hf}.bias",)))
    return rules


def _rules(family: str, config: ModelConfig, prefix: str) -> list[_Rule]:
    """The name mapping between our state dict and the family's Hugging Face weights."""
    c, p = config, prefix
    rules: list[_Rule] = []
    if family == "bert":
        rules += [_Rule("embed.tokens.weight", (f"{p}embeddings.word_embeddings.weight",))]
        rules += [_Rule("embed.positions.weight", (f"{p}embeddings.position_embeddings.weight",))]
        if c.type_vocab_size:
            rules += [_Rule("embed.token_types.weight", (f"{p}embeddings.token_type_embeddings.weight",))]
        rules += _norm("embed.norm", f"{p}embeddings.LayerNorm", c)
        for i in range(c.n_layers):
            ours, hf = f"encoder.blocks.{i}", f"{p}encoder.layer.{i}"
            rules += _fused(f"{ours}.attn.qkv", tuple(f"{hf}.attention.self.{n}" for n in ("query", "key", "value")), True)
            rules += _linear(f"{ours}.attn.o", f"{hf}.attention.output.dense", True)
            rules += _norm(f"{ours}.attn_norm", f"{hf}.attention.output.LayerNorm", c)
            rules += _linear(f"{ours}.ffn.w_in", f"{hf}.intermediate.dense", True)
            rules += _linear(f"{ours}.ffn.w_out", f"{hf}.output.dense", True)
            rules += _norm(f"{ours}.ffn_norm", f"{hf}.output.LayerNorm", c)
        if c.lm_head:
            rules += _linear("lm_head.transform", "cls.predictions.transform.dense", True)
            rules += _norm("lm_head.transform_norm", "cls.predictions.transform.LayerNorm", c)
            rules += [_Rule("lm_head.bias", ("cls.predictions.bias",))]
            if not c.tie_embeddings:
                rules += [_Rule("lm_head.proj.weight", ("cls.predictions.decoder.weight",))]
    elif family in ("t5", "mt5"):
        rules += [_Rule("embed.tokens.weight", ("shared.weight",))]
        for stack, n_layers in (("encoder", c.n_layers), ("decoder", c.n_decoder_layers)):
            rules += [_Rule(f"{stack}.relative_bias.weight", (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",))]
            for i in range(n_layers):
                ours, hf = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
                rules += _fused(f"{ours}.attn.qkv", tuple(f"{hf}.0.SelfAttention.{n}" for n in "qkv"), False)
                rules += _linear(f"{ours}.attn.o", f"{hf}.0.SelfAttention.o", False)
                rules += _norm(f"{ours}.attn_norm", f"{hf}.0.layer_norm", c)
                f = 1
                if stack == "decoder":
                    rules += _linear(f"{ours}.cross_attn.q", f"{hf}.1.EncDecAttention.q", False)
                    rules += _fused(f"{ours}.cross_attn.kv", (f"{hf}.1.EncDecAttention.k", f"{hf}.1.EncDecAttention.v"), False)
                    rules += _linear(f"{ours}.cross_attn.o", f"{hf}.1.EncDecAttention.o", False)
                    rules += _norm(f"{ours}.cross_norm", f"{hf}.1.layer_norm", c)
                    f = 2
                if c.gated:
                    rules += _linear(f"{ours}.ffn.w_gate", f"{hf}.{f}.DenseReluDense.wi_0", False)
                    rules += _linear(f"{ours}.ffn.w_in", f"{hf}.{f}.DenseReluDense.wi_1", False)
                else:
                    rules += _linear(f"{ours}.ffn.w_in", f"{hf}.{f}.DenseReluDense.wi", False)
                rules += _linear(f"{ours}.ffn.w_out", f"{hf}.{f}.DenseReluDense.wo", False)
                rules += _norm(f"{ours}.ffn_norm", f"{hf}.{f}.layer_norm", c)
            rules += _norm(f"{stack}.final_norm", f"{stack}.final_layer_norm", c)
        if not c.tie_embeddings:
            rules += [_Rule("lm_head.proj.weight", ("lm_head.weight",))]
    elif family == "llama":
        rules += [_Rule("embed.tokens.weight", (f"{p}embed_tokens.weight",))]
        for i in range(c.n_layers):
            ours, hf = f"decoder.blocks.{i}", f"{p}layers.{i}"
            rules += _fused(f"{ours}.attn.qkv", tuple(f"{hf}.self_attn.{n}_proj" for n in "qkv"), False)
            rules += _linear(f"{ours}.attn.o", f"{hf}.self_attn.o_proj", False)
            rules += _norm(f"{ours}.attn_norm", f"{hf}.input_layernorm", c)
            rules += _linear(f"{ours}.ffn.w_gate", f"{hf}.mlp.gate_proj", False)
            rules += _linear(f"{ours}.ffn.w_in", f"{hf}.mlp.up_proj", False)
            rules += _linear(f"{ours}.ffn.w_out", f"{hf}.mlp.down_proj", False)
            rules += _norm(f"{ours}.ffn_norm", f"{hf}.post_attention_layernorm", c)
        rules += _norm("decoder.final_norm", f"{p}norm", c)
        if not c.tie_embeddings:
            rules += [_Rule("lm_head.proj.weight", ("lm_head.weight",))]
    elif family == "gpt2":
        rules += [_Rule("embed.tokens.weight", (f"{p}wte.weight",)), _Rule("embed.positions.weight", (f"{p}wpe.weight",))]
        for i in range(c.n_layers):
            ours, hf = f"decoder.blocks.{i}", f"{p}h.{i}"
            rules += _norm(f"{ours}.attn_norm", f"{hf}.ln_1", c)
            rules += _linear(f"{ours}.attn.qkv", f"{hf}.attn.c_attn", True, "t")  # already fused q, k, v
            rules += _linear(f"{ours}.attn.o", f"{hf}.attn.c_proj", True, "t")
            rules += _norm(f"{ours}.ffn_norm", f"{hf}.ln_2", c)
            rules += _linear(f"{ours}.ffn.w_in", f"{hf}.mlp.c_fc", True, "t")
            rules += _linear(f"{ours}.ffn.w_out", f"{hf}.mlp.c_proj", True, "t")
        rules += _norm("decoder.final_norm", f"{p}ln_f", c)
        if not c.tie_embeddings:
            rules += [_Rule("lm_head.proj.weight", ("lm_head.weight",))]
    else:
        raise UserError(f"unsupported model_type {family!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return rules


def _alternatives(name: str) -> list[str]:
    """Names an older checkpoint may use for the same tensor."""
    alts = [name]
    if name.endswith("LayerNorm.weight"):
        alts.append(name[: -len("weight")] + "gamma")  # TF-era BERT checkpoints
    elif name.endswith("LayerNorm.bias"):
        alts.append(name[: -len("bias")] + "beta")
    elif name == "shared.weight":
        alts += ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    elif name == "cls.predictions.bias":
        alts.append("cls.predictions.decoder.bias")
    return alts


def _find(tensors: Mapping[str, torch.Tensor], name: str) -> str | None:
    return next((alt for alt in _alternatives(name) if alt in tensors), None)


# Tensors Hugging Face checkpoints carry that are no part of our model, dropped silently.
_IGNORABLE_SUFFIXES = (
    "embeddings.position_ids",
    ".attn.bias",  # GPT-2's causal-mask buffers
    ".attn.masked_bias",
    "rotary_emb.inv_freq",
    "EncDecAttention.relative_attention_bias.weight",
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "cls.predictions.decoder.bias",
)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from cpmctl.model import build_model

    model = build_model(config, device="meta")
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _piece_shapes(rule: _Rule, shape: tuple[int, ...], config: ModelConfig) -> list[tuple[int, ...]]:
    """The Hugging Face shapes of a rule's pieces, given our tensor's shape."""
    if rule.op == "t":
        return [tuple(reversed(shape))]
    if rule.op == "copy":
        return [shape]
    inner, kv_inner = config.n_heads * config.d_head, config.n_kv_heads * config.d_head
    sizes = [inner, kv_inner, kv_inner] if len(rule.hf) == 3 else [kv_inner, kv_inner]
    return [(size, *shape[1:]) for size in sizes]


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def state_dict_from_hf(
    family: str,
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    config: ModelConfig | None = None,
    source: str = "the Hugging Face weights",
) -> dict[str, torch.Tensor]:
    """Our state dict from Hugging Face weights (name -> tensor) of the given family.

    Copies stay views of the source tensors; fused and transposed tensors are new. A missing
    tensor or a shape that contradicts config.json is a UserError naming the HF tensor.
    """
    if family not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported model_type {family!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if config is None:
        config = config_from_hf(hf_config, tensors)
    rules = _rules(family, config, _prefix(family, tensors))
    expected = _expected_shapes(config)
    if {r.ours for r in rules} != set(expected):  # a gap in our own table, not the user's mistake
        raise RuntimeError(f"hf rules for {family} do not cover the model: {sorted(set(expected) ^ {r.ours for r in rules})}")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        pieces = []
        for hf_name, want in zip(rule.hf, _piece_shapes(rule, expected[rule.ours], config)):
            found = _find(tensors, hf_name)
            if found is None:
                raise UserError(f"{source} is missing HF tensor {hf_name}")
            tensor = tensors[found]
            if tuple(tensor.shape) != want:
                raise UserError(
                    f"{source}: HF tensor {found} has shape {_shape_str(tuple(tensor.shape))}, "
                    f"but config.json implies {_shape_str(want)}"
                )
            used.add(found)
            pieces.append(tensor)
        if rule.op == "cat":
            out[rule.ours] = torch.cat(pieces, dim=0)
        elif rule.op == "t":
            out[rule.ours] = pieces[0].t()
        else:
            out[rule.ours] = pieces[0]
    # Tied heads and bias aliases are expected leftovers; anything else is reported.
    embed, head = _head_names(family, _prefix(family, tensors))
    leftovers = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORABLE_SUFFIXES) and not (config.tie_embeddings and n == head))
    if leftovers:
        pooler = [n for n in leftovers if ".pooler." in f".{n}"]
        if pooler:
            log.info("dropped BERT's pooler (%s): cpmctl's encoder ends at the last hidden states", ", ".join(pooler))
        others = [n for n in leftovers if n not in pooler]
        if others:
            shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
            log.info("dropped %d HF tensors that are not part of the model: %s", len(others), shown)
    return out


def state_dict_to_hf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], model_type: str | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face weights (name -> tensor) for our state dict, in the family `config` exports as.

    A T5 head that is tied but unscaled is written out as an explicit lm_head.weight (see
    `config_to_hf`). Tensors are views of the inputs wherever possible.
    """
    family = export_family(config)
    if model_type is not None:
        config_to_hf(config, model_type)  # validates the choice
        family = model_type
    prefix = {"bert": "bert." if config.lm_head else "", "llama": "model.", "gpt2": "transformer."}.get(family, "")
    rules = _rules(family, config, prefix)
    expected = _expected_shapes(config)
    names = {r.ours for r in rules}
    missing = sorted(names - set(state_dict))
    if missing:
        raise UserError(f"the checkpoint is missing {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(state_dict) - names)
    if extra:
        raise UserError(f"the checkpoint has tensors the config does not describe: {', '.join(extra[:5])}")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = state_dict[rule.ours]
        if tuple(tensor.shape) != expected[rule.ours]:
            raise UserError(f"{rule.ours} has shape {_shape_str(tuple(tensor.shape))}, the config expects {_shape_str(expected[rule.ours])}")
        if rule.op == "cat":
            sizes = [shape[0] for shape in _piece_shapes(rule, expected[rule.ours], config)]
            out.update(zip(rule.hf, torch.split(tensor, sizes, dim=0)))
        elif rule.op == "t":
            out[rule.hf[0]] = tensor.t()
        else:
            out[rule.hf[0]] = tensor
    if family in ("t5", "mt5") and config.tie_embeddings and not config.scale_tied_logits:
        out["lm_head.weight"] = state_dict["embed.tokens.weight"]
    return out


# =============================================================================================
# Reading a Hugging Face directory
# =============================================================================================


def _resolve_source(src: str | os.PathLike) -> Path:
    """The model directory: `src` itself, or the snapshot of a Hugging Face cache entry."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory (expected a Hugging Face model directory with config.json)")
    if (path / HF_CONFIG).is_file():
        return path
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        ref = path / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip() / HF_CONFIG).is_file():
            return snapshots / ref.read_text().strip()
        candidates = [d for d in snapshots.iterdir() if (d / HF_CONFIG).is_file()]
        if len(candidates) == 1:
            return candidates[0]
    raise UserError(f"{path} has no config.json; is it a Hugging Face model directory?")


def read_hf_config(src: str | os.PathLike) -> dict[str, Any]:
    path = Path(src) / HF_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{src} has no config.json; is it a Hugging Face model directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


class HFWeights(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face model directory, opened lazily.

    safetensors files are memory-mapped (tensors are views); pytorch_model.bin files are loaded
    with `torch.load(weights_only=True, mmap=True)`, which refuses arbitrary pickled objects.
    """

    def __init__(self, src: Path):
        from cpmctl.checkpoint import SafetensorsFile

        self.src = src
        self._getters: dict[str, Callable[[], torch.Tensor]] = {}
        self._shards: list[Any] = []
        if (src / HF_SAFETENSORS).is_file():
            self._add_safetensors(SafetensorsFile(src / HF_SAFETENSORS))
            self.kind = HF_SAFETENSORS
        elif (src / HF_SAFETENSORS_INDEX).is_file():
            for shard in self._index_shards(src / HF_SAFETENSORS_INDEX):
                self._add_safetensors(SafetensorsFile(shard))
            self.kind = HF_SAFETENSORS_INDEX
        elif (src / HF_BIN).is_file():
            self._add_bin(src / HF_BIN)
            self.kind = HF_BIN
        elif (src / HF_BIN_INDEX).is_file():
            for shard in self._index_shards(src / HF_BIN_INDEX):
                self._add_bin(shard)
            self.kind = HF_BIN_INDEX
        else:
            raise UserError(f"{src} has no weights ({HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX}, {HF_BIN} or {HF_BIN_INDEX})")

    def _index_shards(self, index_path: Path) -> list[Path]:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{index_path} is not valid JSON ({exc})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index_path} has no valid weight_map (tensor name -> shard file)")
        shards = []
        for filename in sorted(set(weight_map.values())):
            if Path(filename).name != filename or filename in (".", ".."):
                raise UserError(f"{index_path} names an invalid shard file {filename!r}")
            if not (self.src / filename).is_file():
                raise UserError(f"{index_path} names shard {filename}, which is missing")
            shards.append(self.src / filename)
        return shards

    def _add_safetensors(self, st: Any) -> None:
        self._shards.append(st)
        for name in st.names():
            self._getters[name] = lambda st=st, name=name: st.get(name)

    def _add_bin(self, path: Path) -> None:
        try:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as exc:  # weights_only refuses pickled objects other than tensors
            raise UserError(f"cannot read {path} safely as tensors ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} does not hold a state dict")
        for name, value in data.items():
            if isinstance(value, torch.Tensor):
                self._getters[name] = lambda value=value: value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._getters[name]()

    def __contains__(self, name: object) -> bool:
        return name in self._getters

    def __iter__(self) -> Iterator[str]:
        return iter(self._getters)

    def __len__(self) -> int:
        return len(self._getters)

    def close(self) -> None:
        for st in self._shards:
            st.close()


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in _DTYPES:
        raise UserError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _copy_tokenizer(src: Path, dst: Path, renames: Mapping[str, str]) -> list[str]:
    """Copy the tokenizer files present in `src` into `dst`; returns the names written."""
    written = []
    for name in TOKENIZER_FILES:
        path = src / name
        target = renames.get(name, name)
        if path.is_file() and not (dst / target).exists():
            shutil.copyfile(path, dst / target)
            written.append(target)
    return written


# =============================================================================================
# Import and export
# =============================================================================================


def import_hf(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Hugging Face model directory into a cpmctl checkpoint at `out_dir`.

    `dtype` casts floating-point weights (None keeps the source's). Returns `out_dir`.
    """
    from cpmctl.checkpoint import save_checkpoint

    src = _resolve_source(src_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose a new path or pass --force")
    target_dtype = _parse_dtype(dtype)
    hf_config = read_hf_config(src)
    if "model_type" not in hf_config and "arch" in hf_config:
        raise UserError(f"{src} is a cpmctl checkpoint, not a Hugging Face model; to write it as one, use `cpmctl convert hf --export`")
    family = family_of(hf_config)
    weights = HFWeights(src)
    try:
        config = config_from_hf(hf_config, weights)
        state_dict = state_dict_from_hf(family, hf_config, weights, config=config, source=str(src))
        if target_dtype is not None:
            state_dict = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        options = {
            "source": str(src.resolve()),
            "model_type": family,
            "architectures": [a for a in hf_config.get("architectures") or [] if isinstance(a, str)],
            "weights": weights.kind,
            "dtype": None if target_dtype is None else str(target_dtype).removeprefix("torch."),
        }
        with tempfile.TemporaryDirectory(prefix="cpmctl-tokenizer-") as tmp:
            copied = _copy_tokenizer(src, Path(tmp), _TOKENIZER_RENAMES)
            if copied:
                log.info("copied tokenizer files: %s", ", ".join(copied))
            else:
                log.info("no tokenizer files in %s; the checkpoint has no tokenizer/", src)
            save_checkpoint(
                out, config, state_dict, tokenizer_dir=tmp if copied else None, stage=STAGE,
                options=options, overwrite=overwrite,
            )
    finally:
        weights.close()
    log.info("imported %s (%s) from %s into %s", family, config.arch, src, out)
    return out


def _write_hf_weights(directory: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> None:
    from cpmctl.checkpoint import write_safetensors

    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards: list[list[str]] = [[]]
    filled = 0
    for name in sorted(tensors):
        if shards[-1] and filled + sizes[name] > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += sizes[name]
    if len(shards) == 1:
        write_safetensors(directory / HF_SAFETENSORS, tensors)
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / filename, {n: tensors[n] for n in names})
        weight_map.update({n: filename for n in names})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / HF_SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def export_hf(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    model_type: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a cpmctl checkpoint as a Hugging Face model directory at `out_dir`.

    The family follows from the config (`model_type` may choose "mt5" over "t5"; by default a
    checkpoint imported from mT5 exports as mT5 again). Writes config.json, model.safetensors
    (sharded with an index above `max_shard_bytes`) and the checkpoint's tokenizer files.
    """
    from cpmctl.checkpoint import TOKENIZER_DIR, open_checkpoint

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose a new path or pass --force")
    with open_checkpoint(checkpoint_dir) as ck:
        config = ck.config
        if model_type is None:
            hint = (ck.provenance.get("options") or {}).get("model_type") if ck.provenance.get("stage") == STAGE else None
            if hint == "mt5":
                try:
                    config_to_hf(config, "mt5")
                    model_type = "mt5"
                except UserError:
                    model_type = None
        hf_config = config_to_hf(config, model_type)
        family = hf_config["model_type"]
        tensors = state_dict_to_hf(config, ck.state_dict(), family)
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        tokenizer = ck.path / TOKENIZER_DIR
        renames = {"tokenizer.model": "spiece.model"} if family in ("t5", "mt5") else {}
        with atomic_directory(out, overwrite=overwrite) as tmp:
            (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _write_hf_weights(tmp, tensors, max_shard_bytes)
            if tokenizer.is_dir():
                _copy_tokenizer(tokenizer, tmp, renames)
    log.info("exported %s as Hugging Face %s into %s", checkpoint_dir, family, out)
    return out
