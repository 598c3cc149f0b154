"""What a Hugging Face family is to cpmctl, and the registry of families by model_type.

A family module (cpmctl/hf/<family>.py) builds one `Family`: how its config.json becomes
ModelConfig fields and back, and the name map between cpmctl's state dict and its tensors
(`Rule`s, read in both directions). It registers itself with `register`; `cpmctl.hf` imports
every family module once, so adding a family is adding its module (and its line in FAMILY_MODULES).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError

log = logging.getLogger("cpmctl.hf")

# Import order is the order export tries families in: the first that holds a config exactly wins
# (a checkpoint imported from Hugging Face exports as its own family first).
FAMILY_MODULES = ("t5", "bert", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3",
                  "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the Hugging Face tensor(s) it is made of.

    op "copy": the same tensor; "cat": the HF tensors concatenated along dim 0 (our fused qkv /
    kv from separate projections); "split": one HF tensor holding several of ours along dim 0
    (Phi-3's fused gate_up), `part` of `parts`; "t": transposed (GPT-2's Conv1D [in, out]).
    Experts: "stack": one HF tensor per expert stacked along a new dim 0; "stack_t": the same,
    each transposed (per-expert down projections); "split1": a fused 3-D tensor holding several
    of ours along dim 1 (gate_up_proj [E, 2 d_e, d]); "t12": a 3-D tensor with its last two dims
    swapped (down_proj [E, d, d_e]).
    `alternatives`: the same tensor in another layout a checkpoint may use (transformers' fused
    experts), read when this rule's first HF tensor is absent; export writes this rule's layout.
    """

    ours: str
    hf: tuple[str, ...]
    op: str = "copy"
    part: int = 0
    parts: int = 1
    alternatives: tuple["Rule", ...] = ()


@dataclass(frozen=True)
class WeightFacts:
    """What only the weights can tell: whether the output head is the input embedding (None:
    the config decides) and whether BERT weights carry the MLM head."""

    head_tied: bool | None = None
    has_mlm: bool | None = None


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family, both directions.

    to_config(hf_config, facts) -> ModelConfig fields; from_config(config) -> config.json dict;
    rules(config, prefix) -> the tensor map. `prefix` is the base-model prefix of the family's
    causal-LM / MLM class ("model.", "bert.", "transformer."), absent from base-model weights.
    `head` names (embedding, output head) without the prefix on the embedding. `redundant`:
    suffixes of tensors that provably carry nothing (buffers recomputed from the config, copies
    of another tensor); `task_heads`: prefixes of task heads beyond what cpmctl imports (BERT's
    pooler and classifiers), dropped with a log line; `extra_layers(config.json)`: the decoder
    layers a published checkpoint carries beyond the ones the model runs (DeepSeek-V3's
    multi-token-prediction module, `model.layers.{num_hidden_layers}.*`), as (layer indices, what
    they are), dropped with a log line. Anything else left over is an error.
    `unused_fields`: ModelConfig fields this family has no place for (not checked on export).
    """

    model_type: str
    to_config: Callable[[Mapping[str, Any], WeightFacts], dict[str, Any]]
    from_config: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig, str], list[Rule]]
    prefix: str = ""
    head: tuple[str, str] = ("embed_tokens.weight", "lm_head.weight")
    redundant: tuple[str, ...] = ()
    task_heads: tuple[str, ...] = ()
    extra_layers: Callable[[Mapping[str, Any]], tuple[range, str]] | None = None
    unused_fields: frozenset[str] = field(default_factory=frozenset)
    export_prefix: Callable[[ModelConfig], str] | None = None
    # Tokenizer files renamed on export ("tokenizer.model" -> "spiece.model" for T5).
    tokenizer_renames: Mapping[str, str] = field(default_factory=dict)
    # A family whose missing head means a tied one (T5).
    missing_head_is_tied: bool = False
    # Extra HF tensors export writes as copies of ours: {hf name: our name} (T5's tied, unscaled head).
    extra_exports: Callable[[ModelConfig], dict[str, str]] | None = None
    # Whether the family has mixture-of-experts layers (only those hold a config with `moe`).
    moe: bool = False

    def prefix_of(self, names) -> str:
        """The base-model prefix these weights use (the family's, or none)."""
        if not self.prefix:
            return ""
        return self.prefix if any(name.startswith(self.prefix) for name in names) else ""

    def export_prefix_for(self, config: ModelConfig) -> str:
        return self.export_prefix(config) if self.export_prefix is not None else self.prefix


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.model_type in _REGISTRY:
        raise RuntimeError(f"Hugging Face family {family.model_type!r} registered twice")
    _REGISTRY[family.model_type] = family
    return family


def families() -> dict[str, Family]:
    """Registered families by model_type, in export order."""
    return dict(_REGISTRY)


def supported() -> str:
    return ", ".join(sorted(_REGISTRY))


def get_family(model_type: Any) -> Family:
    if model_type not in _REGISTRY:
        raise UserError(f"unsupported model_type {model_type!r}; supported model types: {supported()}")
    return _REGISTRY[model_type]


# ---------------------------------------------------------------------------------------------
# reading config.json values
# ---------------------------------------------------------------------------------------------

# Hugging Face activation names -> ours (gelu_new, gelu_fast and gelu_pytorch_tanh are all the
# tanh approximation), and the name export writes for each of ours.
ACT_FROM_HF = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}
ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


def activation(name: Any, key: str) -> str:
    act = ACT_FROM_HF.get(name) if isinstance(name, str) else None
    if act is None:
        raise UserError(f"unsupported activation {key}={name!r}; supported: {', '.join(sorted(ACT_FROM_HF))}")
    return act


def integer(hf: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"config.json field {key} must be an integer, got {value!r}")
    return value


def number(hf: Mapping[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"config.json field {key} must be a number, got {value!r}")
    return float(value)


def special_ids(hf: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids; a missing pad id becomes the eos id (else 0), since batching needs one;
    a list of eos ids (Llama 3) keeps its first entry."""

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


def refuse_if(hf: Mapping[str, Any], family: str, key: str, bad: Callable[[Any], bool], why: str) -> None:
    """UserError naming config.json field `key` when its value is one cpmctl does not implement."""
    if key in hf and bad(hf[key]):
        raise UserError(f"unsupported {family} feature {key}={hf[key]!r}: {why}")


def head_tied(family: Family, tensors: Mapping[str, torch.Tensor] | None) -> bool | None:
    """Whether the weights tie the output head to the embedding; None when the config decides."""
    if tensors is None:
        return None
    prefix = family.prefix_of(tensors)
    embed = find(tensors, prefix + family.head[0])
    head = family.head[1]
    if head not in tensors or embed is None:
        # transformers ties a missing head when the config says so (always for T5 and mT5).
        return True if family.missing_head_is_tied else None
    a, b = tensors[head], tensors[embed]
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and torch.equal(a, b)


def alternatives(name: str) -> list[str]:
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


def find(tensors: Mapping[str, Any], name: str) -> str | None:
    return next((alt for alt in alternatives(name) if alt in tensors), None)


# ---------------------------------------------------------------------------------------------
# building rules
# ---------------------------------------------------------------------------------------------


def linear(ours: str, hf: str, bias: bool, op: str = "copy") -> list[Rule]:
    rules = [Rule(f"{ours}.weight", (f"{hf}.weight",), op)]
    if bias:
        rules.append(Rule(f"{ours}.bias", (f"{hf}.bias",), "copy"))
    return rules


def fused(ours: str, hfs: tuple[str, ...], bias: bool) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", tuple(f"{h}.weight" for h in hfs), "cat")]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{h}.bias" for h in hfs), "cat"))
    return rules


def norm(ours: str, hf: str, config: ModelConfig) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", (f"{hf}.weight",))]
    if config.norm == "layer":
        rules.append(Rule(f"{ours}.bias", (f"{hf}.bias",)))
    return rules
