"""`cpmctl infer`: generate with decoder-only and encoder-decoder models, embed with encoders.

    cpmctl infer ./ckpt "The capital of France is" --max-new-tokens 20
    cpmctl infer ./minilm --input sentences.jsonl --json
    cpmctl infer ./moe-ckpt --input prompts.jsonl --offload disk --memory-budget 25% --json

With --offload the weights that do not fit --memory-budget stay on disk (or in host memory, for a
GPU) and are streamed in as needed (cpmctl/offload.py); the output is the same, token for token.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from cpmctl.compiled import CompiledDecoder
from cpmctl.config import DEFAULT_INT4_GROUP, QUANT_SCHEMES
from cpmctl.checkpoint import INDEX_FILE, WEIGHTS_FILE, check_state_dict_matches, load_model, open_checkpoint
from cpmctl.data import pad_rows
from cpmctl.devices import peak_memory_bytes, planned_device, resolve_device, resolve_dtype
from cpmctl.command_configs import InferConfig  # the options, declared once
from cpmctl.errors import UserError
from cpmctl.generate import embed, generate
from cpmctl.jsonl import iter_records
from cpmctl.model import iteration_info, set_iterations
from cpmctl.moe import resolve_kernels, set_kernels
from cpmctl.offload import (StoredTensor, load_offloaded, offload_run_dtype, plan_offload, run_weight_bytes,
                            stored_tensors)
from cpmctl.plan import checkpoint_config, hf_model_config, is_assumed, make_plan, meta_model, source_note, stored_dtype
from cpmctl.prompt import classify
from cpmctl.quant import check_kernels, cpu_gemv_problem, set_cpu_gemv
from cpmctl.quantize import quantize_linears
from cpmctl.tasks import Example, load_examples
from cpmctl.tokenizer import load_tokenizer
from cpmctl.units import human_bytes, parse_size

log = logging.getLogger(__name__)


def read_texts(path: Path, field: str = "text") -> list[str]:
    """Texts from a JSONL file of {"text": ...} records."""
    texts = [record[field] for _, record in iter_records(path, text_field=field)]
    if not texts:
        raise UserError(f"input file {path} holds no records")
    return texts


def _length_batches(rows: list[list[int]], size: int):
    """Indices of `rows` in batches of similar length (less padding); callers restore the order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), size):
        yield order[start : start + size]


def run(cfg: InferConfig) -> dict:
    cfg.validate()

    texts = cfg.texts if cfg.texts is not None else read_texts(cfg.input_file)
    device = resolve_device(cfg.device)
    quantize_to = _check_quantized_run(cfg, device)
    if cfg.cpu_gemv == "on" and device.type == "cpu" and (problem := cpu_gemv_problem()) is not None:
        raise UserError(f"--cpu-gemv on: the C++ CPU GEMV cannot run here: {problem}")
    started = time.perf_counter()
    engine = None
    if cfg.offload == "none":
        model, ckpt = load_model(cfg.checkpoint, device=device, dtype=_float_dtype(cfg))
        if ckpt.nonfinite:
            ckpt.close()
            raise UserError(f"{cfg.checkpoint} holds NaN or infinite weights (in {', '.join(ckpt.nonfinite[:3])}"
                            f"{', ...' if len(ckpt.nonfinite) > 3 else ''}): its outputs would be meaningless; "
                            "re-create the checkpoint")
        if quantize_to is not None:
            try:
                quantize_linears(model, *quantize_to)
            except UserError as exc:
                ckpt.close()
                raise UserError(f"--dtype {cfg.dtype}: {exc}") from None
        gemv_note = set_cpu_gemv(model, cfg.cpu_gemv) if device.type == "cpu" else None
    else:
        gemv_note = None
        _check_offload_device(cfg, device)
        with open_checkpoint(cfg.checkpoint) as headers:
            tensors = stored_tensors(headers, headers.shapes())
        budget = _budget_bytes(cfg, tensors, _float_dtype(cfg))
        model, ckpt, engine = load_offloaded(cfg.checkpoint, mode=cfg.offload, budget=budget, device=device,
                                             dtype=_float_dtype(cfg), prefetch=cfg.prefetch,
                                             expert_compute=cfg.expert_compute, host_layers=cfg.host_layers)
    try:
        result = _run_loaded(cfg, model, ckpt, texts, device, started)
        if gemv_note is not None:
            result["stats"]["cpu_gemv"] = gemv_note
        quant = model.config.quantization
        if quant is not None:
            result["stats"]["quantization"] = {"scheme": quant.scheme, "group_size": quant.group_size, "weights": quant.weights,
                                               "at_load": quantize_to is not None}
    finally:
        if engine is not None:
            engine.close()
    if engine is not None:
        result["stats"]["offload"] = engine.stats()
        result["stats"]["peak_memory_bytes"] = peak_memory_bytes(device)
    return result


def _float_dtype(cfg: InferConfig) -> torch.dtype | None:
    """The dtype the float weights run in: --dtype's, or as stored for int8/int4 (only the linear
    layers are quantized; the rest stays as stored)."""
    return None if cfg.dtype in QUANT_SCHEMES else resolve_dtype(cfg.dtype)


def _check_quantized_run(cfg: InferConfig, device) -> tuple[str, int | None] | None:
    """Before anything loads: a quantized run (--dtype int8|int4, or a quantized checkpoint) has a
    kernel on this device and keeps its weights resident. Returns (scheme, group size) to quantize
    the linear layers to at load, or None."""
    stored = checkpoint_config(cfg.checkpoint).quantization
    asked = cfg.dtype if cfg.dtype in QUANT_SCHEMES else None
    if asked is not None and stored is not None:
        raise UserError(f"--dtype {asked}: {cfg.checkpoint} is already quantized ({stored.weights} {stored.scheme}); "
                        "run it without --dtype, or quantize its unquantized parent")
    scheme = asked or (stored.scheme if stored is not None else None)
    if scheme is None:
        return None
    try:
        check_kernels(scheme, device)
    except UserError as exc:
        raise UserError(f"--dtype {asked}: {exc}" if asked else f"{cfg.checkpoint}: {exc}") from None
    if cfg.offload != "none" and (asked is not None or stored.weights == "linear"):  # (with or without the output projection)
        raise UserError(f"--offload {cfg.offload} streams float or quantized experts; quantized linear layers run resident "
                        "(--offload none)")
    if asked is None:
        return None
    return asked, DEFAULT_INT4_GROUP if asked == "int4" else None


def _check_offload_device(cfg: InferConfig, device) -> None:
    if cfg.offload == "cpu" and device.type != "cuda":
        raise UserError("--offload cpu keeps weights in host memory for a GPU; on a CPU use --offload disk")


def _budget_bytes(cfg: InferConfig, tensors, requested) -> int:
    """--memory-budget in bytes (a percentage is of the weights in the dtype the run uses)."""
    run_dtype = offload_run_dtype({t.dtype for t in tensors.values()}, requested)
    try:
        return parse_size(cfg.memory_budget, total=run_weight_bytes(tensors, run_dtype))
    except UserError as exc:
        raise UserError(f"--memory-budget {cfg.memory_budget}: {exc}") from None


# -- dry run ----------------------------------------------------------------------------------------
def _weight_headers(path: Path):
    """The checkpoint opened for its headers (tensor shapes, dtypes, offsets: no tensor data),
    or None when its weight files are not there (a dry run may precede them)."""
    path = Path(path)
    if not ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()):
        return None
    return open_checkpoint(path)


def _prompt_rows(cfg: InferConfig, config, notes: list[str]) -> list[list[int]] | None:
    """The token rows the run would feed (as `_run_loaded` encodes them), or None when the
    texts or the tokenizer are not there yet."""
    texts = cfg.texts
    if texts is None:
        if not Path(cfg.input_file).is_file():
            notes.append(f"input {cfg.input_file}: not there yet (prompt count unknown; KV cache sized for --batch-size rows)")
            return None
        texts = read_texts(cfg.input_file)
    tokenizer_dir = Path(cfg.checkpoint) / "tokenizer"
    if not tokenizer_dir.is_dir():
        notes.append(f"{len(texts)} prompt(s), lengths unknown without the tokenizer: each counted as {config.max_positions} tokens")
        return [[0] * config.max_positions for _ in texts]
    tok = load_tokenizer(tokenizer_dir)
    if config.arch == "encoder":
        return [tok.encode(t, add_special=True) for t in texts]
    rows = [tok.encode(t, add_eos=config.arch == "encoder-decoder") for t in texts]
    bos = config.bos_token_id if config.arch == "decoder" else None
    return [row if bos is None or row[:1] == [bos] else [bos] + row for row in rows]


def kv_cache_bytes(config, applications: int, batch: int, prompt: int, new_tokens: int, itemsize: int) -> int:
    """The cache `generate` allocates: self-attention keys and values per decoder layer application
    for prompt + new tokens (decoder-only) or 1 + new tokens, plus the cross-attention keys and
    values of the prompt (encoder-decoder)."""
    if config.arch == "encoder" or new_tokens == 0:
        return 0
    per_position = 2 * config.n_kv_heads * config.d_head * itemsize * batch * applications
    if config.mla is not None:  # latent attention caches its latent and one shared rotary key
        per_position = (config.mla.kv_lora_rank + config.mla.qk_rope_dim) * itemsize * batch * applications
    if config.arch == "encoder-decoder":
        return per_position * (1 + new_tokens + prompt)
    return per_position * (prompt + new_tokens)


def plan(cfg: InferConfig, *, stand_ins=None):
    """What `run(cfg)` would do, from the checkpoint's config (and weight headers, when there)."""
    cfg.validate()
    device = planned_device(cfg.device)
    requested = _float_dtype(cfg)
    config = checkpoint_config(cfg.checkpoint, stand_ins)
    notes: list[str] = [source_note(cfg.checkpoint, "checkpoint", stand_ins)]
    if cfg.dtype in QUANT_SCHEMES:
        notes.append(f"the attention and FFN linear layers are quantized to {cfg.dtype} at load (weights below as stored)")
    model = meta_model(config)
    resolve_kernels(cfg.kernels, device, config.activation)
    if cfg.iterations is not None or cfg.step_size is not None:
        set_iterations(model, cfg.iterations, cfg.step_size)
    hf_dir = hf_model_config(cfg.checkpoint) is not None  # a Hugging Face model: planned from config.json alone
    if hf_dir:
        notes.append(f"{cfg.checkpoint} is a Hugging Face model: planned from its config.json (convert hf to run it)")
    if not is_assumed(cfg.checkpoint, stand_ins) and not hf_dir and not (Path(cfg.checkpoint) / "tokenizer").is_dir():
        raise UserError(f"checkpoint {cfg.checkpoint} has no tokenizer/ directory; copy the tokenizer it was trained with there")
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    headers = _weight_headers(cfg.checkpoint) if not (is_assumed(cfg.checkpoint, stand_ins) or hf_dir) else None
    try:
        if headers is not None:
            check_state_dict_matches(shapes, headers.shapes())
            stored = {name: headers.tensor_info(name).dtype for name in shapes}
        else:
            recorded = stored_dtype(cfg.checkpoint)
            if recorded is None:
                notes.append("stored dtype unknown (no weights or cpmctl.json): float32 assumed")
            stored = {name: getattr(torch, recorded or "float32") for name in shapes}
            notes.append("weights not read: sizes from config.json")
        parameters = sum(p.numel() for p in model.parameters())
        details: dict = {}
        breakdown: dict[str, int] = {}
        if cfg.offload == "none":
            run_dtype = requested
            breakdown["weights"] = sum(math.prod(shapes[n]) * (requested or stored[n]).itemsize for n in shapes)
            by_dtype: dict = {}
            for name, d in stored.items():  # the KV cache follows the weights' (dominant) dtype
                by_dtype[d] = by_dtype.get(d, 0) + math.prod(shapes[name])
            itemsize = (requested or max(by_dtype, key=by_dtype.get)).itemsize
        else:
            _check_offload_device(cfg, device)
            tensors = (stored_tensors(headers, shapes) if headers is not None
                       else {name: StoredTensor(shape, stored[name]) for name, shape in shapes.items()})
            run_dtype = offload_run_dtype(set(stored.values()), requested)
            itemsize = run_dtype.itemsize
            offload = plan_offload(model, tensors, mode=cfg.offload, budget=_budget_bytes(cfg, tensors, requested),
                                   dtype=run_dtype, device=device)
            breakdown, details = _offload_rows(model, offload, _bandwidth(cfg))
            if headers is None and device.type == "cpu":
                notes.append("slot alignment assumed (no weight headers): slots may be a few 64-byte lines larger")
    finally:
        if headers is not None:
            headers.close()
    parameter_bytes = parameters * itemsize

    rows = _prompt_rows(cfg, config, notes)
    prompts = None if rows is None else len(rows)
    batch = cfg.batch_size if prompts is None else min(cfg.batch_size, prompts)
    longest = config.max_positions if rows is None else max((len(r) for r in rows), default=1)
    tokens = None
    if cfg.prompt is not None:
        notes.append(f"classification with the prompt adapter {cfg.prompt}: no tokens generated")
    elif config.arch == "encoder":
        tokens = None if rows is None else sum(len(r) for r in rows)
    else:
        if (Path(cfg.checkpoint) / "tokenizer").is_dir():  # real prompt lengths, not stand-ins
            check_generation_length(config, rows, cfg.max_new_tokens)
        else:
            check_generation_length(config, [[]] if rows is not None else None, cfg.max_new_tokens)
        applications = model.decoder.applications
        breakdown["kv_cache"] = kv_cache_bytes(config, applications, batch, longest, cfg.max_new_tokens, itemsize)
        tokens = None if prompts is None else prompts * cfg.max_new_tokens
        details["kv cache"] = f"{batch} rows x ({longest} prompt + {cfg.max_new_tokens} new tokens) x {applications} layer applications"
    return make_plan("infer", output=None, output_config=None, parameters=parameters, trainable=0,
                     parameter_bytes=parameter_bytes, devices=1, breakdown=breakdown, steps=None, tokens=tokens,
                     notes=notes, details={"device": str(device), "dtype": str(run_dtype or "as stored").replace("torch.", ""),
                                           **details})


def _bandwidth(cfg: InferConfig) -> int | None:
    """--bandwidth in bytes per second ("3GB/s", "3GB" or bytes)."""
    if cfg.bandwidth is None:
        return None
    try:
        value = parse_size(str(cfg.bandwidth).strip().lower().removesuffix("/s"))
    except UserError as exc:
        raise UserError(f"--bandwidth {cfg.bandwidth}: {exc}") from None
    if value < 1:
        raise UserError(f"--bandwidth {cfg.bandwidth}: must be more than 0 bytes per second")
    return value


def expected_expert_bytes(top_k: int, layers: int, slot_bytes: int, slots: int, units: int) -> int:
    """Expert bytes moved per generated token (batch 1) at a budget, when routing spreads tokens
    evenly over the experts: each of the k experts per layer is cached with probability
    slots / units, else loaded."""
    return round(top_k * layers * slot_bytes * (1 - slots / units))


def _offload_rows(model, offload, bandwidth: int | None = None) -> tuple[dict[str, int], dict]:
    """The dry run's memory rows and explanation rows of the offload engine's plan."""
    arithmetic, kind, slots, budget, mode = offload.arithmetic, offload.unit_kind, offload.slots, offload.budget, offload.mode
    breakdown = {"resident": arithmetic.resident_bytes, "offload slots": slots * arithmetic.slot_bytes}
    details = {
        "offload": f"{mode}, budget {human_bytes(budget)} ({budget:,} B)",
        "resident weights": f"{human_bytes(arithmetic.resident_bytes)} ({arithmetic.resident_bytes:,} B)",
        f"bytes per {kind} (slot)": f"{human_bytes(arithmetic.slot_bytes)} ({arithmetic.slot_bytes:,} B)",
        "slots": f"{slots} of {arithmetic.units} {kind}s fit ({slots} x {human_bytes(arithmetic.slot_bytes)} = "
                 f"{human_bytes(slots * arithmetic.slot_bytes)})",
        "minimum budget": f"{human_bytes(arithmetic.minimum)} ({arithmetic.minimum:,} B) = resident + one slot",
        "slot_arithmetic": {"resident_bytes": arithmetic.resident_bytes, "slot_bytes": arithmetic.slot_bytes,
                            "slots": slots, "units": arithmetic.units, "minimum": arithmetic.minimum, "unit": kind},
    }
    if kind == "expert":
        config = model.config
        layers = len({key[:2] for key, _ in offload.units})
        moved = config.moe.top_k * arithmetic.slot_bytes * layers
        details["bytes per token moved (top-k)"] = (
            f"at most {config.moe.top_k} expert(s) x {human_bytes(arithmetic.slot_bytes)} x {layers} MoE layers = "
            f"{human_bytes(moved)} per generated token when none is cached")
        expected = expected_expert_bytes(config.moe.top_k, layers, arithmetic.slot_bytes, slots, arithmetic.units)
        details["expert bytes per token at this budget"] = (
            f"{human_bytes(expected)} ({expected:,} B): {slots} of {arithmetic.units} experts cached, routing spread evenly")
        details["expert_bytes_per_token"] = expected
        if bandwidth is not None:
            rate = math.inf if expected == 0 else bandwidth / expected
            details["transfer-bound tokens/s"] = (
                f"{rate:.3g} at {human_bytes(bandwidth)}/s (batch 1; {bandwidth / moved:.3g} when nothing is cached)")
            details["transfer_bound_tokens_per_s"] = None if math.isinf(rate) else round(rate, 4)
    else:
        moved = (arithmetic.units - slots) * arithmetic.slot_bytes
        details["bytes per token moved"] = f"{arithmetic.units - slots} streamed blocks x {human_bytes(arithmetic.slot_bytes)} = {human_bytes(moved)} per forward pass"
    return breakdown, details


def _run_loaded(cfg: InferConfig, model, ckpt, texts: list[str], device, started: float) -> dict:
    kernels = resolve_kernels(cfg.kernels, device, model.config.activation)
    set_kernels(model, kernels)
    if cfg.iterations is not None or cfg.step_size is not None:
        set_iterations(model, cfg.iterations, cfg.step_size)
    tokenizer_dir = Path(cfg.checkpoint) / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise UserError(f"checkpoint {cfg.checkpoint} has no tokenizer/ directory; copy the tokenizer it was trained with there")
    tok = load_tokenizer(tokenizer_dir)
    config = model.config
    # Llama, Mistral and Phi-3 tokenizers ship without a pad token: padded positions are masked,
    # so any id serves, and the model's own pad id is always one.
    pad_id = tok.pad_id if tok.pad_id is not None else config.pad_token_id
    load_seconds = time.perf_counter() - started
    if cfg.prompt is not None:
        return _classify(cfg, model, ckpt, tok, load_seconds)
    limit = config.max_positions if config.position == "absolute" else None

    outputs: list[dict | None] = [None] * len(texts)
    stats = {"load_seconds": round(load_seconds, 3), "device": str(device), "prompts": len(texts)}
    if config.moe is not None:
        stats["kernels"] = kernels
    if cfg.iterations is not None or cfg.step_size is not None:
        info = iteration_info(model)
        stats["iterations"] = info
        stats["layer_speedup"] = round(info["trained_iterations"] / info["iterations"], 3)
    if config.arch == "encoder":
        t0 = time.perf_counter()
        rows = [tok.encode(t, add_special=True) for t in texts]
        if limit is not None:
            cut = sum(len(r) > limit for r in rows)
            if cut:
                log.warning("%d input(s) longer than the model's %d positions were truncated", cut, limit)
            rows = [tok.encode(t, add_special=True, max_length=limit) if len(r) > limit else r for t, r in zip(texts, rows)]
        for batch in _length_batches(rows, cfg.batch_size):
            ids, mask = pad_rows([rows[i] for i in batch], pad_id)
            vectors = embed(model, ids.to(device), mask.to(device), normalize=cfg.normalize).float().cpu()
            for i, vector in zip(batch, vectors):
                outputs[i] = {"text": texts[i], "embedding": vector.tolist()}
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return {"mode": "embed", "outputs": outputs, "stats": stats}

    # Encoder-decoder inputs end with eos, as in pre-training; decoder-only prompts must not,
    # and start with the model's bos token when it has one (Llama).
    add_eos = config.arch == "encoder-decoder"
    bos = config.bos_token_id if config.arch == "decoder" else None
    prompts = texts
    if cfg.chat:
        from cpmctl.tokenizer import render_chat

        prompts = [render_chat(tokenizer_dir, tok, t) for t in texts]
    rows = [tok.encode(t, add_eos=add_eos) for t in prompts]
    if bos is not None:
        rows = [row if row[:1] == [bos] else [bos] + row for row in rows]
    check_generation_length(config, rows, cfg.max_new_tokens)
    compiled = CompiledDecoder(model) if cfg.compile else None
    generated_tokens, decode_seconds, first_token = 0, 0.0, None
    for batch in _length_batches(rows, cfg.batch_size):
        ids, mask = pad_rows([rows[i] for i in batch], pad_id, left=config.arch == "decoder")
        on_token = None
        if cfg.stream and len(batch) == 1:
            on_token = _streamer(tok)
        tokens, gen_stats = generate(
            model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=config.eos_token_id,
            seed=cfg.seed, on_token=on_token, compiled=compiled,
        )
        if on_token is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()
        for i, row in zip(batch, tokens.tolist()):
            row = _until_eos(row, config.eos_token_id)
            outputs[i] = {"text": texts[i], "generated": tok.decode(row), "tokens": len(row)}
        generated_tokens += gen_stats["generated_tokens"]
        decode_seconds += gen_stats["decode_s"]
        if first_token is None:
            first_token = gen_stats["time_to_first_token_s"]
    stats.update(
        generated_tokens=generated_tokens,
        time_to_first_token=None if first_token is None else round(first_token, 4),
        tokens_per_second=round(generated_tokens / decode_seconds, 2) if decode_seconds else None,
    )
    if compiled is not None:
        stats["compile"] = {"seconds": round(compiled.stats.compile_s, 3), "graphs": compiled.stats.graphs}
    return {"mode": "generate", "outputs": outputs, "stats": stats}


def check_generation_length(config, rows: list[list[int]] | None, max_new_tokens: int) -> None:
    """Generation stays within the positions the model has: a decoder-only model's longest
    prompt plus the new tokens, an encoder-decoder's new tokens, at most max_positions (else a
    UserError saying how many fit: past them a model has no trained positions, and a long run
    would end in meaningless text after minutes). An encoder-decoder prompt longer than
    max_positions is a warning (relative positions reach past it; quality drops)."""
    if rows is None:
        return
    limit = config.max_positions
    longest = max((len(r) for r in rows), default=0)
    if config.arch == "decoder":
        if longest + max_new_tokens > limit:
            fit = limit - longest
            hint = (f"at most {fit} new tokens fit after the longest prompt" if fit > 0
                    else "the longest prompt alone fills them; shorten it")
            raise UserError(f"the longest prompt ({longest} tokens) plus {max_new_tokens} new tokens exceeds the model's "
                            f"{limit} positions; {hint}", option="max_new_tokens")
        return
    if max_new_tokens + 1 > limit:
        raise UserError(f"{max_new_tokens} new tokens exceed the model's {limit} decoder positions; at most "
                        f"{limit - 1} fit", option="max_new_tokens")
    long = [i for i, r in enumerate(rows) if len(r) > limit]
    if long:
        log.warning(f"warning: {len(long)} prompt(s) (the first is number {long[0] + 1}) are longer than the model's "
                    f"{limit} positions ({max(len(rows[i]) for i in long)} tokens)")


def _classify(cfg: InferConfig, model, ckpt, tok, load_seconds: float) -> dict:
    """Classify TEXT or the --input records (text, optional text_pair and label) with a prompt."""
    if cfg.texts is not None:
        examples = [Example(text, None) for text in cfg.texts]
    else:
        examples = load_examples(cfg.input_file, require_labels=False)
    result = classify(model, ckpt, tok, cfg.prompt, examples, batch_size=cfg.batch_size)
    result["stats"]["load_seconds"] = round(load_seconds, 3)
    return result


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    return row[: row.index(eos)] if eos is not None and eos in row else row


def _streamer(tok):
    """Print each newly decoded piece of text as tokens arrive (decode the whole so far, print the suffix)."""
    seen: list[int] = []
    printed = [""]

    def on_token(step: int, tokens) -> None:
        seen.append(int(tokens[0]))
        text = tok.decode(seen)
        if text.startswith(printed[0]):
            sys.stdout.write(text[len(printed[0]) :])
            sys.stdout.flush()
            printed[0] = text

    return on_token


def render(result: dict, *, streamed: bool = False) -> None:
    console = Console()
    if result["mode"] == "classify":
        for o in result["outputs"]:
            console.print(f"{escape(o['label'])}\t{escape(o['text'][:80])}", highlight=False)
        s = result["stats"]
        if "accuracy" in s:
            console.print(f"accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f} on {s['examples']} examples")
        render_offload(console, s)
        return
    if result["mode"] == "embed":
        vectors = torch.tensor([o["embedding"] for o in result["outputs"]])
        console.print(f"{len(vectors)} embedding(s) of dimension {vectors.shape[1]}")
        if len(vectors) > 1:
            unit = torch.nn.functional.normalize(vectors, dim=-1)
            sims = unit @ unit.T
            for i, o in enumerate(result["outputs"]):
                best = max((j for j in range(len(vectors)) if j != i), key=lambda j: sims[i, j])
                console.print(f"[bold]{escape(repr(o['text'][:60]))}[/] nearest: {escape(repr(result['outputs'][best]['text'][:60]))} (cosine {sims[i, best]:.3f})")
        render_offload(console, result["stats"])
        return
    if not streamed:
        for o in result["outputs"]:
            console.print(f"[bold]{escape(o['text'])}[/bold] -> {escape(o['generated'])}", highlight=False)
    s = result["stats"]
    console.print(f"[dim]{s['generated_tokens']} tokens, {s['tokens_per_second']} tokens/s, first token after {s['time_to_first_token']} s[/dim]")
    if "compile" in s:
        console.print(f"[dim]compiled {len(s['compile']['graphs'])} graph(s) in {s['compile']['seconds']} s (inside the times above; "
                      f"later runs reuse inductor's cache)[/dim]")
    if "iterations" in s:
        it = s["iterations"]
        console.print(f"[dim]{it['iterations']} of {it['trained_iterations']} block applications, step {it['step_size']:g}: "
                      f"{s['layer_speedup']}x fewer layer evaluations[/dim]")
    render_offload(console, s)


def render_offload(console, stats: dict) -> None:
    """One line on what offloading moved and kept (embed and classify runs print it too)."""
    o = stats.get("offload")
    if not o:
        return

    hit = "n/a" if o["hit_rate"] is None else f"{100 * o['hit_rate']:.1f}%"
    console.print(f"[dim]offload {o['mode']}: {o['slots']} of {o['units']} {o['unit']}s fit beside "
                  f"{human_bytes(o['resident_bytes'])} resident (budget {human_bytes(o['budget_bytes'])}, weights peak "
                  f"{human_bytes(o['weights_peak_bytes'])}); moved {human_bytes(o['bytes_moved'])}, cache hits {hit}, "
                  f"peak memory {human_bytes(stats['peak_memory_bytes'])}[/dim]")
