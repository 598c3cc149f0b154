"""Import and export: a family's config translation and tensor map applied in both directions.

Import reads config.json's `model_type`, translates the config (refusing what cpmctl does not
implement), maps every HF tensor to ours by the family's rules and checks each shape against
config.json. A tensor left over is an error unless the family declares it redundant (rotary
inv_freq buffers, copies of another tensor) or a task head beyond the model (BERT's pooler,
logged): nothing that changes the result is dropped. Export is the same table read backwards;
a round trip is bit-exact by construction, and the written config.json is checked to import
back to the same ModelConfig.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from cpmctl.checkpoint import LazyTensor
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory, check_new_output
from cpmctl.hf.family import Family, Rule, WeightFacts, families, find, get_family, head_tied, supported
from cpmctl.hf.experts import check_expert_counts
from cpmctl.hf.weights import HF_CONFIG, HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HFWeights, read_hf_config, resolve_source

log = logging.getLogger("cpmctl.hf")

STAGE = "convert-hf"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Tokenizer files copied into (and back out of) a checkpoint's tokenizer/ directory.
# Sentencepiece models are stored as tokenizer.model, the name cpmctl's loader reads.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
_TOKENIZER_RENAMES = {"spiece.model": "tokenizer.model"}
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
        raise UserError(f"config.json has no model_type{hint}; supported model types: {supported()}")
    return get_family(model_type).model_type


def _facts(family: Family, tensors: Mapping[str, torch.Tensor] | None) -> WeightFacts:
    if tensors is None:
        return WeightFacts()
    has_mlm = "cls.predictions.transform.dense.weight" in tensors if family.model_type == "bert" else None
    return WeightFacts(head_tied=head_tied(family, tensors), has_mlm=has_mlm)


def config_from_hf(hf_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json (as a dict).

    With `tensors` (the HF weights by name) the weights settle what the config cannot: whether
    the output head is tied to the embedding and whether a BERT checkpoint has its MLM head.
    """
    family = get_family(family_of(hf_config))
    return ModelConfig(**family.to_config(hf_config, _facts(family, tensors)))


def _lossless(family: Family, config: ModelConfig, hf: Mapping[str, Any]) -> list[str]:
    """The config fields `hf` (the family's config.json) does not give back exactly."""
    facts = WeightFacts(head_tied=config.tie_embeddings if config.lm_head else None,
                        has_mlm=config.lm_head if family.model_type == "bert" else None)
    try:
        back = ModelConfig(**family.to_config(hf, facts))
    except UserError as exc:
        return [str(exc)]
    head_fields = {"tie_embeddings", "scale_tied_logits", "lm_head_transform", "lm_head_bias"}
    skip = family.unused_fields | (set() if config.lm_head else head_fields)
    if config.moe is not None and config.moe.layers is None:
        skip = skip | {"d_ff"}  # every FFN is MoE: the dense width is never used
    return [
        f"{f.name}={getattr(config, f.name)!r} (a {family.model_type} config gives {getattr(back, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in skip and getattr(config, f.name) != getattr(back, f.name)
    ]


def _family_config(family: Family, config: ModelConfig) -> tuple[dict[str, Any] | None, str]:
    """(config.json, "") when `family` holds `config` exactly, else (None, the reason)."""
    if (config.moe is not None) != family.moe:
        return None, ("it has no mixture-of-experts layers" if config.moe is not None
                      else "it is a mixture-of-experts family and this model is dense")
    try:
        hf = family.from_config(config)
    except (KeyError, UserError) as exc:
        return None, str(exc)
    mismatched = _lossless(family, config, hf)
    return (None, "it cannot represent " + "; ".join(mismatched)) if mismatched else (hf, "")


# Why a MoEfied router (experts are pieces of one dense FFN, summed with weight 1) has no family.
_MOEFIED_ROUTERS = {
    "center": "scores the normalised input against expert centres",
    "mlp": "is a tanh MLP on the normalised input",
    "oracle": "computes every neuron to choose",
}


def _refuse_unexportable(config: ModelConfig) -> None:
    moe = config.moe
    if moe is not None and moe.router != "linear":
        raise UserError(f"cannot export this mixture-of-experts model to Hugging Face: its {moe.router} router "
                        f"{_MOEFIED_ROUTERS[moe.router]} and sums the chosen experts with weight 1, which no Hugging Face "
                        "MoE family computes (their routers are a linear layer whose softmax or sigmoid scores weight the "
                        "experts); restore the dense model first")
    if moe is not None and (moe.permuted or moe.fill_skipped):
        raise UserError("cannot export this mixture-of-experts model to Hugging Face: its skipped experts add fill values "
                        "(MoEfication), which no Hugging Face MoE family computes; restore the dense model first"
                        if moe.fill_skipped else
                        "cannot export this MoEfied model to Hugging Face as a MoE: restore the dense model first "
                        "(its neuron permutation has no place in a Hugging Face MoE family)")
    if config.share_layers:
        raise UserError("cannot export a model with shared layers to Hugging Face: no supported family shares layers")
    if config.activation == "drelu":
        raise UserError("cannot export a dReLU model to Hugging Face: no supported family has a ReLU on the up branch "
                        "(hidden_act applies to the gate only); relufy with activation relu for an exportable model")
    if config.threshold_sparsity is not None:
        raise UserError("cannot export a thresholded model to Hugging Face: no supported family skips small activations; "
                        "restore the dense model first")


def export_family(config: ModelConfig, prefer: str | None = None) -> str:
    """The Hugging Face model_type a cpmctl config exports as: `prefer` (the family it was
    imported from) when that holds the config exactly, else the first family that does."""
    _refuse_unexportable(config)
    candidates = list(families())
    if prefer in candidates:
        candidates.remove(prefer)
        candidates.insert(0, prefer)
    reasons = {}
    for name in candidates:
        hf, why = _family_config(get_family(name), config)
        if hf is not None:
            return name
        reasons[name] = why
    closest = prefer if prefer in reasons else next(
        (n for n in candidates if get_family(n).moe == (config.moe is not None)
         and ModelConfig(**get_family(n).to_config({}, WeightFacts())).arch == config.arch), candidates[0])
    raise UserError(f"cannot export this model as Hugging Face {closest}: {reasons[closest]} "
                    f"(no supported family holds it: {supported()})")


def config_to_hf(config: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """A Hugging Face config.json (as a dict) for `config`; UserError if the family cannot hold it.

    `model_type` names the family (default: the first that holds the config exactly). The
    result is checked: importing it gives back `config`'s fields exactly.
    """
    _refuse_unexportable(config)
    if model_type is None:
        model_type = export_family(config)
    family = get_family(model_type)
    hf, why = _family_config(family, config)
    if hf is None:
        raise UserError(f"cannot export this {config.arch} model as {model_type!r}: {why}")
    return hf


# =============================================================================================
# Tensors
# =============================================================================================


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from cpmctl.model import build_model

    model = build_model(config, device="meta")
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _piece_shapes(rule: Rule, shape: tuple[int, ...], config: ModelConfig) -> list[tuple[int, ...]]:
    """The Hugging Face shapes of a rule's pieces, given our tensor's shape."""
    if rule.op == "t":
        return [tuple(reversed(shape))]
    if rule.op == "copy":
        return [shape]
    if rule.op == "split":
        return [(shape[0] * rule.parts, *shape[1:])]
    if rule.op == "stack":
        return [tuple(shape[1:])] * len(rule.hf)
    if rule.op == "stack_t":
        return [tuple(reversed(shape[1:]))] * len(rule.hf)
    if rule.op == "split1":
        return [(shape[0], shape[1] * rule.parts, *shape[2:])]
    if rule.op == "t12":
        return [(shape[0], shape[2], shape[1])]
    inner, kv_inner = config.n_heads * config.d_head, config.n_kv_heads * config.d_head
    sizes = [inner, kv_inner, kv_inner] if len(rule.hf) == 3 else [kv_inner, kv_inner]
    return [(size, *shape[1:]) for size in sizes]


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _shape_of(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    shape = getattr(tensors, "shape", None)
    return shape(name) if callable(shape) else tuple(tensors[name].shape)


def _dtype_of(tensors: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    dtype = getattr(tensors, "dtype", None)
    return dtype(name) if callable(dtype) else tensors[name].dtype


def _concatenated(pieces: list[Callable[[], torch.Tensor]], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.cat along dim 0, reading one piece at a time so only one source piece is alive."""
    out = torch.empty(shape, dtype=dtype)
    start = 0
    for read in pieces:
        piece = read()
        out[start : start + piece.shape[0]].copy_(piece)
        start += piece.shape[0]
        del piece  # before the next piece is read
    return out


def _stacked(pieces: list[Callable[[], torch.Tensor]], shape: tuple[int, ...], dtype: torch.dtype,
             transpose: bool) -> torch.Tensor:
    """torch.stack along a new dim 0 (each piece transposed first with `transpose`), reading one
    piece at a time so only one source piece is alive."""
    out = torch.empty(shape, dtype=dtype)
    for i, read in enumerate(pieces):
        piece = read()
        out[i].copy_(piece.t() if transpose else piece)
        del piece
    return out


def _producer(rule: Rule, tensors: Mapping[str, torch.Tensor], names: list[str], shape: tuple[int, ...],
              dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """Reads a rule's HF pieces from `tensors` and makes our tensor, when called."""
    if rule.op in ("stack", "stack_t"):
        return lambda: _stacked([functools.partial(tensors.__getitem__, n) for n in names], shape, dtype, rule.op == "stack_t")
    if rule.op == "split1":
        return lambda: tensors[names[0]].chunk(rule.parts, dim=1)[rule.part]
    if rule.op == "t12":
        return lambda: tensors[names[0]].transpose(1, 2)
    if rule.op == "cat":
        return lambda: _concatenated([functools.partial(tensors.__getitem__, n) for n in names], shape, dtype)
    if rule.op == "t":
        return lambda: tensors[names[0]].t()
    if rule.op == "split":
        return lambda: tensors[names[0]].chunk(rule.parts, dim=0)[rule.part]
    return lambda: tensors[names[0]]


def _cast_lazy(tensors: Mapping[str, LazyTensor], dtype: torch.dtype | None) -> dict[str, LazyTensor]:
    """`tensors` with floating-point ones converted to `dtype` as they are produced (None: as is)."""
    if dtype is None:
        return dict(tensors)
    return {name: LazyTensor(dtype, lazy.shape, lambda lazy=lazy: lazy.produce().to(dtype))
            if lazy.dtype.is_floating_point else lazy for name, lazy in tensors.items()}


def state_dict_from_hf(
    family: str,
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    config: ModelConfig | None = None,
    source: str = "the Hugging Face weights",
) -> dict[str, torch.Tensor]:
    """Our state dict from Hugging Face weights (name -> tensor) of the given family.

    Copies and splits stay views of the source tensors; fused tensors are new. A missing tensor,
    a shape that contradicts config.json or a tensor the model has no place for is a UserError
    naming the HF tensor.
    """
    lazy = lazy_state_dict_from_hf(family, hf_config, tensors, config=config, source=source)
    return {name: tensor.produce() for name, tensor in lazy.items()}


def lazy_state_dict_from_hf(
    family: str,
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    config: ModelConfig | None = None,
    source: str = "the Hugging Face weights",
) -> dict[str, LazyTensor]:
    """`state_dict_from_hf` checked in full now, each tensor read from `tensors` only when
    produced: handed to save_checkpoint, a conversion holds one tensor at a time."""
    fam = get_family(family)
    if config is None:
        config = config_from_hf(hf_config, tensors)
    prefix = fam.prefix_of(tensors)
    rules = fam.rules(config, prefix)
    expected = _expected_shapes(config)
    if {r.ours for r in rules} != set(expected):  # a gap in our own table, not the user's mistake
        raise RuntimeError(f"hf rules for {family} do not cover the model: {sorted(set(expected) ^ {r.ours for r in rules})}")
    check_expert_counts(config, tensors, source)
    plan: list[tuple[Rule, list[str]]] = []
    used: set[str] = set()
    for rule in rules:
        rule = _layout_in(rule, tensors)
        found_names = []
        for hf_name, want in zip(rule.hf, _piece_shapes(rule, expected[rule.ours], config)):
            found = find(tensors, hf_name)
            if found is None:
                raise UserError(f"{source} is missing HF tensor {hf_name}")
            shape = _shape_of(tensors, found)
            per_expert = rule.op in ("split1", "t12") or rule.ours.endswith((".ffn.router.weight", ".ffn.score_bias"))
            if config.moe is not None and per_expert and shape and shape[0] != want[0]:
                raise UserError(f"{source}: HF tensor {found} holds {shape[0]} experts, but config.json says {want[0]}; "
                                "the checkpoint and its config disagree")
            if shape != want:
                raise UserError(f"{source}: HF tensor {found} has shape {_shape_str(shape)}, but config.json implies {_shape_str(want)}")
            used.add(found)
            found_names.append(found)
        plan.append((rule, found_names))
    _check_leftovers(fam, config, hf_config, tensors, used, prefix, source)
    out: dict[str, LazyTensor] = {}
    for rule, names in plan:
        dtypes = [_dtype_of(tensors, n) for n in names]
        dtype = functools.reduce(torch.promote_types, dtypes)  # what torch.cat would give
        shape = expected[rule.ours]
        out[rule.ours] = LazyTensor(dtype, shape, _producer(rule, tensors, names, shape, dtype))
    return out


def _layout_in(rule: Rule, tensors: Mapping[str, torch.Tensor]) -> Rule:
    """The rule, or the first of its alternatives whose tensors the checkpoint uses (fused experts)."""
    if find(tensors, rule.hf[0]) is not None:
        return rule
    return next((alt for alt in rule.alternatives if find(tensors, alt.hf[0]) is not None), rule)


def _check_leftovers(fam: Family, config: ModelConfig, hf_config: Mapping[str, Any], tensors, used: set[str],
                     prefix: str, source: str) -> None:
    head = fam.head[1]
    leftovers = sorted(n for n in tensors if n not in used and not n.endswith(fam.redundant)
                       and not (config.tie_embeddings and n == head))
    heads = [n for n in leftovers if n.startswith(fam.task_heads)] if fam.task_heads else []
    extra, extra_note = _extra_layer_tensors(fam, hf_config, leftovers, prefix)
    others = [n for n in leftovers if n not in heads and n not in extra]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise UserError(f"{source} has {len(others)} HF tensor(s) that cpmctl's {fam.model_type} has no place for: {shown}; "
                        "they would change the model, so nothing was imported")
    if heads:
        log.info("dropped %s's task heads (%s): cpmctl's %s ends at the last hidden states", fam.model_type, ", ".join(heads), config.arch)
    if extra:
        log.info(extra_note)


def _extra_layer_tensors(fam: Family, hf_config: Mapping[str, Any], leftovers: list[str], prefix: str) -> tuple[set[str], str]:
    """The leftover tensors of the layers the family declares beyond the model (DeepSeek-V3's
    multi-token-prediction module), which never feed the next-token logits, and the line saying so."""
    if fam.extra_layers is None:
        return set(), ""
    layers, what = fam.extra_layers(hf_config)
    starts = tuple(f"{prefix}layers.{i}." for i in layers)
    extra = {n for n in leftovers if starts and n.startswith(starts)}
    where = ", ".join(f"{s}*" for s in starts if any(n.startswith(s) for n in extra))
    return extra, f"dropped {fam.model_type}'s {what} ({where}, {len(extra)} tensors): cpmctl predicts the next token only"


def state_dict_to_hf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], model_type: str | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face weights (name -> tensor) for our state dict, in the family `config` exports as
    (or `model_type`). Tensors are views of the inputs wherever possible."""
    lazy = lazy_state_dict_to_hf(config, state_dict, model_type)
    return {name: tensor.produce() for name, tensor in lazy.items()}


def _as_lazy(tensor: torch.Tensor | LazyTensor) -> LazyTensor:
    if isinstance(tensor, LazyTensor):
        return tensor
    return LazyTensor(tensor.dtype, tuple(tensor.shape), lambda: tensor)


def _piece_of(whole: LazyTensor, sizes: list[int], index: int) -> LazyTensor:
    return LazyTensor(whole.dtype, (sizes[index], *whole.shape[1:]),
                      lambda: torch.split(whole.produce(), sizes, dim=0)[index])


def _expert_of(whole: LazyTensor, expert: int, transpose: bool) -> LazyTensor:
    """Expert `expert` of a stacked [E, a, b] tensor, as [a, b] (or [b, a] transposed)."""
    shape = tuple(reversed(whole.shape[1:])) if transpose else tuple(whole.shape[1:])
    return LazyTensor(whole.dtype, shape, lambda: whole.produce()[expert].t() if transpose else whole.produce()[expert])


def _transposed(lazy: LazyTensor) -> LazyTensor:
    return LazyTensor(lazy.dtype, tuple(reversed(lazy.shape)), lambda: lazy.produce().t())


def _fused(parts: list[LazyTensor]) -> LazyTensor:
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in parts])  # what torch.cat would give
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return LazyTensor(dtype, shape, lambda: _concatenated([p.produce for p in parts], shape, dtype))


def lazy_state_dict_to_hf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor | LazyTensor],
                          model_type: str | None = None) -> dict[str, LazyTensor]:
    """`state_dict_to_hf` checked in full now, each tensor made from `state_dict` (tensors or
    LazyTensors) only when produced: handed to write_safetensors, an export holds one at a time."""
    config_to_hf(config, model_type)  # validates the choice
    fam = get_family(model_type or export_family(config))
    rules = fam.rules(config, fam.export_prefix_for(config))
    expected = _expected_shapes(config)
    names = {r.ours for r in rules}
    missing = sorted(names - set(state_dict))
    if missing:
        raise UserError(f"the checkpoint is missing {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(state_dict) - names)
    if extra:
        raise UserError(f"the checkpoint has tensors the config does not describe: {', '.join(extra[:5])}")
    out: dict[str, LazyTensor] = {}
    splits: dict[str, list[LazyTensor | None]] = {}
    for rule in rules:
        lazy = _as_lazy(state_dict[rule.ours])
        if tuple(lazy.shape) != expected[rule.ours]:
            raise UserError(f"{rule.ours} has shape {_shape_str(tuple(lazy.shape))}, the config expects {_shape_str(expected[rule.ours])}")
        if rule.op == "cat":
            sizes = [shape[0] for shape in _piece_shapes(rule, expected[rule.ours], config)]
            out.update((hf_name, _piece_of(lazy, sizes, i)) for i, hf_name in enumerate(rule.hf))
        elif rule.op == "t":
            out[rule.hf[0]] = _transposed(lazy)
        elif rule.op in ("stack", "stack_t"):
            out.update((hf_name, _expert_of(lazy, e, rule.op == "stack_t")) for e, hf_name in enumerate(rule.hf))
        elif rule.op == "split":
            parts = splits.setdefault(rule.hf[0], [None] * rule.parts)
            parts[rule.part] = lazy
            if all(p is not None for p in parts):
                out[rule.hf[0]] = _fused(parts)
        else:
            out[rule.hf[0]] = lazy
    if fam.extra_exports is not None:
        for hf_name, ours in fam.extra_exports(config).items():
            out[hf_name] = _as_lazy(state_dict[ours])
    return out


# =============================================================================================
# Import and export
# =============================================================================================


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in _DTYPES:
        raise UserError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def copy_tokenizer(src: Path, dst: Path, renames: Mapping[str, str]) -> list[str]:
    """Copy the tokenizer files present in `src` into `dst`; returns the names written."""
    written = []
    for name in TOKENIZER_FILES:
        path = src / name
        target = renames.get(name, name)
        if path.is_file() and not (dst / target).exists():
            shutil.copyfile(path, dst / target)
            written.append(target)
    return written


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

    src = resolve_source(src_dir)
    out = Path(out_dir)
    check_new_output(out, overwrite)
    target_dtype = _parse_dtype(dtype)
    hf_config = read_hf_config(src)
    if "model_type" not in hf_config and "arch" in hf_config:
        raise UserError(f"{src} is a cpmctl checkpoint, not a Hugging Face model; to write it as one, export it", option="export")
    family = family_of(hf_config)
    weights = HFWeights(src)
    try:
        config = config_from_hf(hf_config, weights)
        # Producers, not tensors: save_checkpoint reads (and casts) each just before writing it.
        state_dict = _cast_lazy(lazy_state_dict_from_hf(family, hf_config, weights, config=config, source=str(src)),
                               target_dtype)
        options = {
            "source": str(src.resolve()),
            "model_type": family,
            "architectures": [a for a in hf_config.get("architectures") or [] if isinstance(a, str)],
            "weights": weights.kind,
            "dtype": None if target_dtype is None else str(target_dtype).removeprefix("torch."),
        }
        with tempfile.TemporaryDirectory(prefix="cpmctl-tokenizer-") as tmp:
            copied = copy_tokenizer(src, Path(tmp), _TOKENIZER_RENAMES)
            if copied:
                log.info("copied tokenizer files: %s", ", ".join(copied))
            else:
                log.info("no tokenizer files in %s; the checkpoint has no tokenizer/", src)
            save_checkpoint(out, config, state_dict, tokenizer_dir=tmp if copied else None, stage=STAGE,
                            options=options, overwrite=overwrite)
    finally:
        weights.close()
    log.info("imported %s (%s) from %s into %s", family, config.arch, src, out)
    return out


def write_hf_weights(directory: Path, tensors: Mapping[str, torch.Tensor | LazyTensor], max_shard_bytes: int) -> None:
    from cpmctl.checkpoint import write_safetensors

    sizes = {name: math.prod(t.shape) * t.dtype.itemsize for name, t in tensors.items()}
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


def imported_family(provenance: Mapping[str, Any]) -> str | None:
    """The model_type a checkpoint was imported from (convert-hf provenance), if any."""
    if provenance.get("stage") != STAGE:
        return None
    return (provenance.get("options") or {}).get("model_type")


def export_hf(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    model_type: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a cpmctl checkpoint as a Hugging Face model directory at `out_dir`.

    The family follows from the config (by default a checkpoint imported from Hugging Face
    exports as its own family again). Writes config.json, generation_config.json,
    model.safetensors (sharded with an index above `max_shard_bytes`) and a tokenizer
    transformers loads (see cpmctl.tokenizer.export_hf_tokenizer).
    """
    from cpmctl.checkpoint import TOKENIZER_DIR, open_checkpoint
    from cpmctl.tokenizer import export_hf_tokenizer

    out = Path(out_dir)
    check_new_output(out, overwrite)
    with open_checkpoint(checkpoint_dir) as ck:
        config = ck.config
        if model_type is None:
            model_type = export_family(config, imported_family(ck.provenance))
        hf_config = config_to_hf(config, model_type)
        family = get_family(model_type)
        # Producers, not tensors: each is read from its own map just before it is written.
        tensors = lazy_state_dict_to_hf(config, ck.lazy_state_dict(), model_type)
        dtypes = {t.dtype for t in tensors.values() if t.dtype.is_floating_point}
        if len(dtypes) == 1:
            hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        tokenizer = ck.path / TOKENIZER_DIR
        with atomic_directory(out, overwrite=overwrite) as tmp:
            if tokenizer.is_dir():
                export_hf_tokenizer(tokenizer, tmp, config, model_type, renames=family.tokenizer_renames)
            (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if config.is_causal_lm or config.arch == "encoder-decoder":
                generation = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_id),
                                                ("pad_token_id", config.pad_token_id)) if v is not None}
                if config.arch == "encoder-decoder":
                    generation["decoder_start_token_id"] = config.start_token_id
                (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            write_hf_weights(tmp, tensors, max_shard_bytes)
    log.info("exported %s as Hugging Face %s into %s", checkpoint_dir, model_type, out)
    return out
