"""Soft prompts: trainable vectors inserted into a frozen model's input, and their PEFT-format files.

    plan = prompt_plan("front+middle+back", 100)     # [("start", 34), ("between", 33), ("end", 33)]
    row = place_prompt(encoded_row, plan)             # virtual positions 0..99 inserted at the marks
    prompt = SoftPrompt(initial_vectors(...), reparam="mlp", deep_layers=5)
    classifier = PromptedClassifier(scorer, prompt)   # forward(batch) -> class logits
    save_adapter(out, adapter)  /  load_adapter(out)  /  check_base_model(adapter, base_hash)

Positions (CPM-2 found splitting the prompt best): "front" goes before everything, special tokens
included (what PEFT does, so a front prompt is PEFT-compatible); "back" right after the text;
"middle" between text and text_pair; "front+middle+back" splits the length in three (front
gets the remainder). A single-text example places the middle part just before the back part, so
every example uses every vector, in the same order.

Reparameterisation ("mlp", P-tuning style): the prompt is `E + MLP(E)` with the MLP's last layer
zero-initialised, so training starts from the chosen initialisation; it is folded into plain
vectors when saved (`SoftPrompt.folded`).

Deep prompts (`deep_layers = L - 1`, P-tuning v2's idea of a prompt at every layer): each layer
after the first adds its own trainable vector to the hidden states at the prompt positions
(initialised to 0, so training starts from the shallow prompt). cpmctl realises them on the
prompt positions' hidden states rather than as extra attention keys/values, so deep adapters
load in cpmctl only; PEFT sees their input-layer prompt.

Adapter directory (PEFT's PROMPT_TUNING layout plus cpmctl's fields in a file of their own):
    adapter_config.json        peft_type, task_type, num_virtual_tokens, token_dim,
                               num_transformer_submodules (1), num_layers, num_attention_heads,
                               base_model_name_or_path (the Hugging Face directory the base model
                               was imported from, so AutoPeftModel* loads it), prompt_tuning_init...
    cpmctl_adapter.json        plan, labels, verbalizer, scoring, head, base model content hash, metrics
    adapter_model.safetensors  prompt_embeddings [P, d] (the folded prompt, in plan order);
                               head.proj.weight/bias (linear head); deep_prompt_embeddings [L-1, P, d]
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cpmctl.checkpoint import SafetensorsFile, content_hash, read_provenance, write_safetensors
from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory
from cpmctl.tasks import (EncodedExample, LabelSet, LinearHead, Scorer, encode_examples, eval_batches, evaluate,
                          label_token_ids, position_limit)
from cpmctl.tokenizer import load_tokenizer

log = logging.getLogger("cpmctl")

from cpmctl.command_configs import PROMPT_POSITIONS as POSITIONS, REPARAMS
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_META_FILE = "cpmctl_adapter.json"  # cpmctl's own fields: PEFT warns about unknown keys in adapter_config.json
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PROMPT_TENSOR = "prompt_embeddings"
DEEP_TENSOR = "deep_prompt_embeddings"
HEAD_PREFIX = "head."
PEFT_TASK_TYPES = {"encoder": "FEATURE_EXTRACTION", "decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}
VOCAB_INIT_TOP = 5000  # Lester et al.: sample from the 5,000 most frequent tokens
ADAPTER_FORMAT_VERSION = 1


# =============================================================================================
# Where the prompt goes
# =============================================================================================


def prompt_plan(position: str, length: int) -> list[tuple[str, int]]:
    """[(insertion mark, number of vectors)] in vector order; see the module docstring."""
    if position not in POSITIONS:
        raise UserError(f"unknown prompt position {position!r}; expected one of {', '.join(POSITIONS)}")
    if length < 1:
        raise UserError(f"a prompt needs at least 1 vector, got {length}", option="prompt_length")
    if position == "front":
        return [("start", length)]
    if position == "back":
        return [("end", length)]
    if position == "middle":
        return [("between", length)]
    if length < 3:
        raise UserError(f"front+middle+back needs a prompt of at least 3 tokens, got {length}")
    third = length // 3
    return [("start", length - 2 * third), ("between", third), ("end", third)]


def place_prompt(row: EncodedExample, plan: Sequence[tuple[str, int]]) -> EncodedExample:
    """Insert the plan's virtual positions into an encoded example."""
    first = 0
    for mark, count in plan:
        at = mark
        if mark == "between" and row.marks.get("between") is None:
            if len(plan) == 1:
                raise UserError("a prompt in the middle needs pair examples (a 'text_pair' field); place it front, back or front+middle+back",
                                option="position")
            at = "end"  # a single text: the middle part goes just before the back part
        row = row.insert(at, count, first)
        first += count
    return row


def plan_length(plan: Sequence[tuple[str, int]]) -> int:
    return sum(count for _, count in plan)


# =============================================================================================
# Initialisation
# =============================================================================================


def token_counts(rows: Iterable[EncodedExample], exclude: Iterable[int] = ()) -> Counter:
    """How often each (non-special) token id occurs in the encoded training texts."""
    skip = set(exclude)
    counts: Counter = Counter()
    for row in rows:
        counts.update(i for i, t in zip(row.ids, row.text_mask) if t and i not in skip)
    return counts


def initial_vectors(
    init: str, length: int, embedding: Tensor, *, counts: Counter, label_ids: Sequence[Sequence[int]] | None = None,
    tokenizer=None, seed: int = 0,
) -> Tensor:
    """[length, d] starting vectors.

    "vocab": embeddings of tokens sampled from the VOCAB_INIT_TOP most frequent ones in `counts`
    (the training texts); "labels": the label words' mean embeddings first, then vocab;
    "text:SOME WORDS": the embeddings of that text's tokens, repeated to fill the length (as
    PEFT does); "random": normal with the embedding table's standard deviation.
    """
    embedding = embedding.detach().float()
    gen = random.Random(seed)

    def sampled(n: int) -> Tensor:
        frequent = [token for token, _ in counts.most_common(VOCAB_INIT_TOP)]
        if not frequent:
            raise UserError("a prompt initialised from the vocabulary needs training texts with tokens to sample from", option="init")
        return embedding[[gen.choice(frequent) for _ in range(n)]]

    if init == "vocab":
        return sampled(length).clone()
    if init == "labels":
        if not label_ids:
            raise UserError("a prompt initialised from label words needs label words (LM scoring); with a linear head, "
                            "initialise it from the vocabulary", option="init")
        words = torch.stack([embedding[list(ids)].mean(0) for ids in label_ids])[:length]
        rest = length - words.shape[0]
        return torch.cat([words, sampled(rest)]) if rest else words.clone()
    if init.startswith("text:"):
        text = init[len("text:") :].strip().strip('"')
        if tokenizer is None or not text:
            raise UserError('a prompt initialised from text:"..." needs a non-empty text', option="init")
        ids = tokenizer.encode(text)
        if not ids:
            raise UserError(f"the prompt initialisation text {text!r} encodes to no tokens", option="init")
        ids = (ids * math.ceil(length / len(ids)))[:length]
        return embedding[ids].clone()
    if init == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(length, embedding.shape[1], generator=g) * embedding.std()
    raise UserError(f'unknown prompt initialisation {init!r}; expected vocab, labels, random or text:"..."', option="init")


# =============================================================================================
# The prompt module
# =============================================================================================


class SoftPrompt(nn.Module):
    """The trainable prompt: vectors [P, d], an optional MLP reparameterisation, deep deltas."""

    def __init__(self, init: Tensor, *, reparam: str = "none", hidden: int | None = None, deep_layers: int = 0) -> None:
        super().__init__()
        if reparam not in REPARAMS:
            raise UserError(f"unknown prompt reparameterisation {reparam!r}; expected one of {', '.join(REPARAMS)}", option="reparam")
        length, d = init.shape
        self.embedding = nn.Parameter(init.detach().clone().float())
        self.mlp = None
        if reparam == "mlp":
            hidden = hidden or d
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        self.deep = nn.Parameter(torch.zeros(deep_layers, length, d)) if deep_layers else None
        self.virtual: Tensor | None = None  # the current batch's virtual index, for the deep hooks

    @property
    def length(self) -> int:
        return self.embedding.shape[0]

    def vectors(self) -> Tensor:
        if self.mlp is None:
            return self.embedding
        return self.embedding + self.mlp(self.embedding)

    @torch.no_grad()
    def folded(self) -> Tensor:
        """The prompt as plain vectors (the MLP applied once): what is saved."""
        return self.vectors().detach().float().clone()


def prompted_stack(model: nn.Module) -> nn.Module:
    """The stack the prompt enters: the encoder (encoder-only, encoder-decoder) or the decoder."""
    return model.encoder if model.encoder is not None else model.decoder


def blend(base: Tensor, vectors: Tensor, virtual: Tensor) -> Tensor:
    """`base` [B, T, d] with position (b, t) replaced by vectors[virtual[b, t]] where virtual >= 0."""
    picked = vectors.to(base.dtype)[virtual.clamp(min=0)]
    return torch.where((virtual >= 0)[..., None], picked, base)


class PromptedClassifier(nn.Module):
    """A `tasks.Scorer` fed the prompt: forward(batch) -> class logits [B, C].

    `prompt=None` is plain classification (full fine-tuning). Deep prompts are added by
    forward pre-hooks on the prompted stack's blocks of this model instance (`remove_hooks`).
    """

    def __init__(self, scorer: nn.Module, prompt: SoftPrompt | None) -> None:
        super().__init__()
        self.scorer = scorer
        self.prompt = prompt
        self._hooks = []
        if prompt is not None and prompt.deep is not None:
            stack = prompted_stack(scorer.model)
            if prompt.deep.shape[0] != stack.n_layers - 1:
                raise UserError(f"deep prompt has {prompt.deep.shape[0]} layers, the model needs {stack.n_layers - 1}")
            for block in stack.blocks:
                self._hooks.append(block.register_forward_pre_hook(self._deep_hook, with_kwargs=True))

    def _deep_hook(self, module, args, kwargs):
        layer = kwargs["layer"]
        virtual = self.prompt.virtual
        if layer == 0 or virtual is None:
            return None
        x = args[0]
        delta = self.prompt.deep[layer - 1].to(x.dtype)[virtual.clamp(min=0)] * (virtual >= 0)[..., None].to(x.dtype)
        return (x + delta, *args[1:]), kwargs

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def inputs_embeds(self, batch: Mapping[str, Tensor]) -> Tensor:
        tokens = self.scorer.model.embed.tokens(batch["input_ids"])
        return blend(tokens, self.prompt.vectors(), batch["virtual"])

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.prompt is None:
            return self.scorer(batch)
        self.prompt.virtual = batch["virtual"]
        return self.scorer(batch, self.inputs_embeds(batch))


# =============================================================================================
# Gradient checkpointing (swapped in on a model instance, undone afterwards)
# =============================================================================================


class _CheckpointedBlock(nn.Module):
    """Recompute a block's activations in the backward pass instead of keeping them."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled():
            return self.block(x, **kwargs)
        return checkpoint(self.block, x, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Wrap every block of `model`'s stacks in activation checkpointing for the duration."""
    if not enabled:
        yield
        return
    stacks = [s for s in (getattr(model, "encoder", None), getattr(model, "decoder", None)) if s is not None]
    originals = [list(stack.blocks) for stack in stacks]
    for stack in stacks:
        for i, block in enumerate(list(stack.blocks)):
            stack.blocks[i] = _CheckpointedBlock(block)
    try:
        yield
    finally:
        for stack, blocks in zip(stacks, originals):
            for i, block in enumerate(blocks):
                stack.blocks[i] = block


# =============================================================================================
# Adapter files
# =============================================================================================


@dataclass
class Adapter:
    """A trained prompt (folded), its optional head and deep deltas, and cpmctl's fields."""

    prompt: Tensor                                  # [P, d]
    meta: dict[str, Any]                            # the "cpmctl" block of adapter_config.json
    head: dict[str, Tensor] = field(default_factory=dict)  # LinearHead state ("proj.weight", ...)
    deep: Tensor | None = None                      # [L - 1, P, d]
    peft: dict[str, Any] = field(default_factory=dict)     # PEFT's fields (written/read)

    @property
    def plan(self) -> list[tuple[str, int]]:
        return [(mark, int(count)) for mark, count in self.meta["plan"]]


def peft_config(adapter: Adapter, model_config, base_model: str | None, init: str) -> dict[str, Any]:
    """PEFT's PromptTuningConfig fields for this adapter."""
    stack_layers = model_config.n_layers
    if init.startswith("text:"):
        peft_init, init_text = "TEXT", init[len("text:") :]
    else:
        peft_init, init_text = ("SAMPLE_VOCAB" if init == "vocab" else "RANDOM"), None
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": PEFT_TASK_TYPES[model_config.arch],
        "num_virtual_tokens": int(adapter.prompt.shape[0]),
        "token_dim": int(adapter.prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": model_config.n_heads,
        "num_layers": stack_layers,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "modules_to_save": None,
        "prompt_tuning_init": peft_init,
        "prompt_tuning_init_text": init_text,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }


def write_adapter(directory: Path, adapter: Adapter) -> None:
    """Write the adapter's two files into an existing directory (callers make it atomic)."""
    tensors = {PROMPT_TENSOR: adapter.prompt.detach().float().contiguous()}
    tensors.update({HEAD_PREFIX + k: v.detach().float().contiguous() for k, v in adapter.head.items()})
    if adapter.deep is not None:
        tensors[DEEP_TENSOR] = adapter.deep.detach().float().contiguous()
    write_safetensors(directory / ADAPTER_WEIGHTS_FILE, tensors)
    meta = {"format_version": ADAPTER_FORMAT_VERSION, **adapter.meta}
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter.peft, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (directory / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(out: str | Path, adapter: Adapter, *, overwrite: bool = False) -> Path:
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_adapter(tmp, adapter)
    return Path(out)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter written by `save_adapter` (PEFT's own adapters lack the cpmctl block)."""
    path = Path(path)
    config_path, weights_path = path / ADAPTER_CONFIG_FILE, path / ADAPTER_WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{path} is not a prompt adapter (it needs {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        raise UserError(f"{config_path} is not a PROMPT_TUNING adapter")
    meta = config.pop("cpmctl", None)  # adapters written before cpmctl_adapter.json kept it here
    if (path / ADAPTER_META_FILE).is_file():
        try:
            meta = json.loads((path / ADAPTER_META_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path / ADAPTER_META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise UserError(f"{path} has no cpmctl fields (labels, positions, base model); it was not written by cpmctl prompt-tune")
    with SafetensorsFile(weights_path) as st:
        tensors = {name: st.get(name).clone() for name in st.names()}
    if PROMPT_TENSOR not in tensors:
        raise UserError(f"{weights_path} has no {PROMPT_TENSOR} tensor")
    head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    adapter = Adapter(prompt=tensors[PROMPT_TENSOR], meta=meta, head=head, deep=tensors.get(DEEP_TENSOR), peft=config)
    if plan_length(adapter.plan) != adapter.prompt.shape[0]:
        raise UserError(f"{path}: the prompt has {adapter.prompt.shape[0]} vectors but its plan places {plan_length(adapter.plan)}")
    return adapter


# The provenance metric in which MoEfication (and thresholding) records the content hash of the
# dense model whose function its output approximates: prompts and heads of that model apply.
PRESERVES_FUNCTION_OF = "preserves_function_of"


def check_base_model(adapter: Adapter, base_hash: str, base_path: str | Path, adapter_path: str | Path,
                     provenance: dict[str, Any] | None = None) -> None:
    """Loading a prompt on a model other than the one it was trained on is a user error, except on
    a MoEfied (or thresholded) copy of that model: its provenance records that it keeps the base
    model's function, so the prompt applies, with a note. The error names a checkpoint that fits."""
    expected = adapter.meta.get("base_model_hash")
    if expected == base_hash:
        return
    derived_from = ((provenance or {}).get("metrics") or {}).get(PRESERVES_FUNCTION_OF)
    if expected is not None and derived_from == expected:
        log.warning("note: prompt %s was trained on %s, and %s is a MoEfied copy of that model (it keeps the base "
                    "function up to the quality loss in its report); using it", adapter_path, expected, base_path)
        return
    fits = checkpoint_with_hash(expected, adapter_path, adapter)
    hint = f"use {fits}, which is that model" if fits else "use the model it was trained with"
    raise UserError(f"prompt {adapter_path} was trained on base model {expected}, but {base_path} is {base_hash}; {hint}")


def checkpoint_with_hash(expected: str | None, adapter_path: str | Path, adapter: Adapter) -> Path | None:
    """A checkpoint whose recorded content hash is `expected`: the model a `prompt-tune --full` run
    wrote beside its adapter (ADAPTER/model), or the base model the adapter names, when still there."""
    if expected is None:
        return None
    candidates = [Path(adapter_path) / "model"]
    named = (adapter.peft or {}).get("base_model_name_or_path")
    if named:
        candidates.append(Path(named))
    for candidate in candidates:
        if (candidate / "config.json").is_file() and read_provenance(candidate).get("content_hash") == expected:
            return candidate
    return None


# -- using a trained adapter ------------------------------------------------------------------------
def base_model_hash(ckpt, model) -> str:
    """The checkpoint's content hash (from cpmctl.json, else computed from the weights)."""
    recorded = ckpt.provenance.get("content_hash") if ckpt.provenance else None
    return recorded if isinstance(recorded, str) else content_hash(model.state_dict())


def encode_for(tokenizer, config, examples, labels, *, scoring: str, plan, max_length: int | None, what: str):
    """Encode examples, insert the prompt's virtual positions, warn about truncation."""
    reserve = plan_length(plan) if plan else 0
    limit = position_limit(config)
    if max_length is not None:
        limit = max_length if limit is None else min(limit, max_length)
    rows, cut = encode_examples(tokenizer, config, examples, labels, mode=scoring, max_length=limit, reserve=reserve)
    if cut:
        log.warning("%d %s input(s) truncated to fit %d positions (%d of them for the prompt)", cut, what, limit, reserve)
    if plan:
        rows = [place_prompt(row, plan) for row in rows]
    return rows


def load_classifier(model, ckpt, adapter_path: Path):
    """A `PromptedClassifier` for the adapter at `adapter_path` on the loaded `model`, with its
    LabelSet and Adapter; the adapter must have been trained on this very model."""
    adapter = load_adapter(adapter_path)
    meta = adapter.meta
    check_base_model(adapter, base_model_hash(ckpt, model), ckpt.path, adapter_path, ckpt.provenance)
    if meta.get("d_model") != model.config.d_model:
        raise UserError(f"prompt {adapter_path} has width {meta.get('d_model')}, the model {model.config.d_model}")
    labels = LabelSet(tuple(meta["labels"]), tuple(meta["verbalizer"][label] for label in meta["labels"]))
    device = next(model.parameters()).device
    head = None
    label_ids = None
    if meta["scoring"] == "linear":
        head = LinearHead(model.config.d_model, len(labels), meta["head"]["pooling"])
        head.load_state_dict(adapter.head)
        head.to(device)
    else:
        label_ids = label_token_ids(load_tokenizer(Path(ckpt.path) / "tokenizer"), labels.words)
    prompt = None
    if adapter.prompt.shape[0]:
        deep_layers = adapter.deep.shape[0] if adapter.deep is not None else 0
        prompt = SoftPrompt(adapter.prompt, deep_layers=deep_layers)
        if adapter.deep is not None:
            with torch.no_grad():
                prompt.deep.copy_(adapter.deep)
        prompt.to(device=device, dtype=next(model.parameters()).dtype)
    classifier = PromptedClassifier(Scorer(model, label_ids=label_ids, head=head), prompt).eval()
    return classifier, labels, adapter


def classify(model, ckpt, tok, adapter_path: Path, examples, *, batch_size: int) -> dict[str, Any]:
    """Predictions (and accuracy / macro-F1 when every example is labelled) for `examples`."""
    classifier, labels, adapter = load_classifier(model, ckpt, adapter_path)
    labelled = all(ex.label is not None for ex in examples)
    if not labelled:
        examples = [type(ex)(ex.text, None, ex.text_pair) for ex in examples]
    scoring = adapter.meta["scoring"]
    rows = encode_for(tok, model.config, examples, labels, scoring=scoring, plan=adapter.plan,
                      max_length=adapter.meta.get("max_length"), what="inference")
    started = time.perf_counter()
    device = next(model.parameters()).device
    with torch.no_grad():
        result = evaluate(classifier, eval_batches(rows, batch_size, tok.pad_id), len(labels), device=device)
    classifier.remove_hooks()
    outputs = [{"text": ex.text, **({"text_pair": ex.text_pair} if ex.text_pair is not None else {}),
                "label": labels.labels[p], **({"gold": ex.label} if ex.label is not None else {})}
               for ex, p in zip(examples, result["predictions"])]
    stats = {"examples": len(examples), "seconds": round(time.perf_counter() - started, 3)}
    if labelled:
        stats.update(accuracy=result["accuracy"], macro_f1=result["macro_f1"])
    return {"mode": "classify", "outputs": outputs, "stats": stats}


def peft_base_model(model_dir) -> str:
    """What PEFT should load as the base model: the Hugging Face directory a `convert hf` import
    came from while it is still there, else the cpmctl checkpoint (export it for PEFT)."""
    provenance = read_provenance(model_dir)
    source = (provenance.get("options") or {}).get("source") if provenance.get("stage") == "convert-hf" else None
    if source and (Path(source) / "config.json").is_file():
        return str(Path(source))
    return str(Path(model_dir).resolve())
