"""The `cpmctl` command line: one thin function per subcommand.

Each command parses options and calls a plain function elsewhere in the package. Heavy imports
(torch and everything that pulls it in) happen inside the commands, so `cpmctl --help` is
instant. A user mistake (`UserError`) prints one line and exits with code 2; `--debug` shows
tracebacks.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from cpmctl.errors import UserError

app = typer.Typer(
    name="cpmctl",
    help="The CPM-2 pipeline as a tool: convert, inspect, tokenize, prepare data and run models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
convert_app = typer.Typer(help="Convert checkpoints between cpmctl and other formats.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
data_app = typer.Typer(help="Turn corpora into memory-mapped token shards.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")

_state = {"debug": False}


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handles_errors(fn):
    """User mistakes become one line and exit 2; bugs keep their traceback under --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if _state["debug"]:
                raise
            _fail(str(exc), 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug, not a user mistake
            if _state["debug"]:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)

    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    import logging

    _state["debug"] = debug
    # Stages report what they did (e.g. parts of a checkpoint left out) through logging.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cpmctl")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=False))


def _show_plan(plan, as_json: bool = False):
    """A dry run's output: the plan as a table (JSON with --json); returned to callers."""
    from cpmctl.plan import plan_to_dict, render_plan

    if as_json:
        _print_json(plan_to_dict(plan))
    else:
        render_plan(plan)
    return plan


# -- convert ---------------------------------------------------------------------------------------
@convert_app.command("hf")
@handles_errors
def convert_hf(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json + weights), or a cpmctl checkpoint with --export."),
    out: Path = typer.Argument(..., help="Output directory (must not exist unless --force)."),
    export: bool = typer.Option(False, "--export", help="Go the other way: cpmctl checkpoint -> Hugging Face directory."),
    dtype: Optional[str] = typer.Option(None, help="Store weights as float32, bfloat16 or float16 (default: as in SRC)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Import a Hugging Face model (BERT, T5/mT5, GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3), or export one back."""
    from cpmctl import hf

    if export:
        hf.export_hf(src, out, overwrite=force)
    else:
        hf.import_hf(src, out, dtype=dtype, overwrite=force)
    typer.echo(f"wrote {out}")


# -- info ------------------------------------------------------------------------------------------
@app.command()
@handles_errors
def info(
    checkpoint: Optional[Path] = typer.Argument(None, help="A cpmctl checkpoint directory."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Describe a named preset instead (built on the meta device)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Config, parameter counts, dtype, size on disk and provenance of a checkpoint or preset."""
    from cpmctl import report

    if (checkpoint is None) == (preset is None):
        raise UserError("give either a CHECKPOINT directory or --preset NAME")
    data = report.describe_preset(preset) if preset else report.describe_checkpoint(checkpoint)
    if as_json:
        _print_json(data)
    else:
        report.render(data)


# -- tokenizer -------------------------------------------------------------------------------------
@tokenizer_app.command("train")
@handles_errors
def tokenizer_train(
    corpus: Path = typer.Argument(..., help="Text (one document per line) or JSONL with a 'text' field."),
    out: Path = typer.Argument(..., help="Output directory for the tokenizer."),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Vocabulary size, special tokens included."),
    model_type: str = typer.Option("unigram", "--model-type", help="unigram or bpe."),
    sentinels: int = typer.Option(100, help="Sentinel tokens for span corruption (<extra_id_0> ...)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Train a sentencepiece tokenizer with pad/eos/unk, <mask> and span-corruption sentinels."""
    from cpmctl.tokenizer import train_sentencepiece

    tok = train_sentencepiece(corpus, out, vocab_size=vocab_size, model_type=model_type, sentinels=sentinels, overwrite=force)
    typer.echo(f"wrote {out} (vocabulary {tok.vocab_size}, {len(tok.sentinel_ids)} sentinels)")
    return {"out": str(out), "vocab_size": tok.vocab_size, "sentinels": len(tok.sentinel_ids)}


@tokenizer_app.command("encode")
@handles_errors
def tokenizer_encode(
    tokenizer: Path = typer.Argument(..., help="Tokenizer directory or file (tokenizer.model / tokenizer.json), or a checkpoint."),
    text: str = typer.Argument(..., help="Text to encode."),
) -> None:
    """Show the ids and pieces of TEXT, and check that decoding gives it back."""
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(_tokenizer_path(tokenizer))
    ids = tok.encode(text)
    _print_json({"ids": ids, "decoded": tok.decode(ids), "round_trip": tok.decode(ids) == text})


def _tokenizer_path(path: Path) -> Path:
    """Accept a checkpoint directory wherever a tokenizer is expected."""
    return path / "tokenizer" if (path / "tokenizer").is_dir() else path


# -- data ------------------------------------------------------------------------------------------
@data_app.command("prepare")
@handles_errors
def data_prepare(
    corpus: Path = typer.Argument(..., help="Text (one document per line) or JSONL (.jsonl/.json)."),
    out: Path = typer.Argument(..., help="Output directory for the token shards."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer directory or file, or a checkpoint holding one."),
    field: str = typer.Option("text", help="JSONL field holding the text."),
    shard_tokens: int = typer.Option(64 * 2**20, "--shard-tokens", help="Tokens per shard file."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Tokenize a corpus into memory-mapped shards with an index (streaming, bounded memory)."""
    from cpmctl.data import prepare
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(_tokenizer_path(tokenizer))
    summary = prepare(corpus, tok, out, shard_tokens=shard_tokens, field=field, overwrite=force)
    typer.echo(f"wrote {out}: {summary['total_docs']:,} documents, {summary['total_tokens']:,} tokens in {len(summary['shards'])} shard(s)")
    return summary


@data_app.command("stdlib")
@handles_errors
def data_stdlib(
    out: Path = typer.Argument(..., help="Output directory: corpus.txt and task/{train,dev,test}.jsonl, labels.json."),
    num_classes: int = typer.Option(8, "--num-classes", help="Task classes: the best-populated top-level modules."),
    min_per_class: int = typer.Option(100, "--min-per-class", help="Fewest documents a class may have."),
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class", help="Keep at most this many documents per class."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="Use only the first N documents of the corpus."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """The embedded default data: a corpus of this Python's standard-library docstrings and a
    module-classification task built from it (no download)."""
    from cpmctl.corpus import write_stdlib_dataset

    result = write_stdlib_dataset(out, num_classes=num_classes, min_per_class=min_per_class,
                                  max_per_class=max_per_class, max_docs=max_docs, overwrite=force)
    splits = ", ".join(f"{k} {v}" for k, v in result["splits"].items())
    typer.echo(f"wrote {out}: {result['documents']:,} documents; task of {len(result['classes'])} classes ({splits})")
    return result


# -- infer -----------------------------------------------------------------------------------------
@app.command()
@handles_errors
def infer(
    checkpoint: Path = typer.Argument(..., help="A cpmctl checkpoint directory."),
    text: Optional[str] = typer.Argument(None, help="Prompt (or sentence to embed, for encoder-only models)."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="JSONL file of {'text': ...} records instead of TEXT."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when present)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: as stored)."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated (single prompt)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise embeddings (encoder-only)."),
    as_json: bool = typer.Option(False, "--json", help="Print outputs and statistics as JSON."),
    prompt: Optional[Path] = typer.Option(None, "--prompt", help="A prompt adapter from `cpmctl prompt-tune`: classify the inputs (accuracy when they are labelled)."),
    kernels: str = typer.Option("auto", "--kernels", help="MoE FFN kernels: auto (Triton on CUDA, torch elsewhere), torch or triton."),
    offload: str = typer.Option("none", "--offload", help="none; disk: weights beyond --memory-budget are read from the checkpoint as needed; cpu: they wait in host memory (GPU runs)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="With --offload: memory for weights on the device (GPU) or in RAM (CPU), e.g. 2GiB, 512MB or 25% of the weights."),
    prefetch: bool = typer.Option(True, "--prefetch/--no-prefetch", help="With --offload: load the next layer's weights while the current one computes."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Parameter-shared models: apply the shared blocks this many times (fewer = faster)."),
    step_size: Optional[float] = typer.Option(None, "--step-size", help="Parameter-shared models: residual step size (default: trained iterations / --iterations)."),
    chat: bool = typer.Option(False, "--chat", help="Each text is a user turn, rendered with the tokenizer's chat template (as transformers' apply_chat_template does)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run (model size, memory per device, steps, tokens, output); load and write nothing."),
) -> dict:
    """Generate text (decoder-only, encoder-decoder), embed sentences (encoder-only), or classify with --prompt."""
    from cpmctl.stages import infer as infer_stage

    cfg = infer_stage.InferConfig(
        checkpoint=checkpoint, texts=[text] if text is not None else None, input_file=input_file,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        batch_size=batch_size, device=device, dtype=dtype, stream=stream and not as_json, normalize=normalize,
        prompt=prompt, kernels=kernels, offload=offload, memory_budget=memory_budget, prefetch=prefetch,
        iterations=iterations, step_size=step_size, chat=chat,
    )
    if dry_run:
        return _show_plan(infer_stage.plan(cfg), as_json)
    result = infer_stage.run(cfg)
    if as_json:
        _print_json(result)
    else:
        infer_stage.render(result, streamed=cfg.stream)
    return result


# -- pretrain --------------------------------------------------------------------------------------
@app.command()
@handles_errors
def pretrain(
    recipe: Path = typer.Argument(..., help="Recipe file (TOML, see recipes/)."),
    out: Path = typer.Argument(..., help="Run directory: metrics.jsonl, state/ (for --resume), checkpoint/ (the result)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe option: KEY=VALUE (repeatable; model.d_model=512 for preset fields)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this checkpoint."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Start from this preset (random init)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Token shards (cpmctl data prepare)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Knowledge inheritance from this checkpoint (same tokenizer)."),
    ki_steps: Optional[int] = typer.Option(None, "--ki-steps", help="Teacher guidance length N: a_t = max(0, 1 - t/N) (default: max_steps // 2)."),
    ki_temperature: Optional[float] = typer.Option(None, "--ki-temperature", help="Distillation temperature T (default 2)."),
    ki_schedule: Optional[str] = typer.Option(None, "--ki-schedule", help="linear, step or constant."),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="Directory for the teacher's top-K logits (built once, then reused)."),
    teacher_cache_k: Optional[int] = typer.Option(None, "--teacher-cache-k", help="K of the teacher cache (default 10)."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT from its newest training state."),
    force: bool = typer.Option(False, "--force", help="Delete an existing run in OUT and start over."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help="MoE FFN kernels: auto (Triton on CUDA for forward-only passes), torch or triton."),
    share_layers: bool = typer.Option(False, "--share-layers", help="Preset: one block per stack applied n_layers times (ALBERT-style)."),
    share_groups: Optional[int] = typer.Option(None, "--share-groups", help="Preset: G distinct blocks per stack, each applied n_layers / G times."),
    step_robust: bool = typer.Option(False, "--step-robust", help="Shared model: sample the iterations n per batch with residual step n_layers / n."),
    robust_iterations: Optional[str] = typer.Option(None, "--robust-iterations", help="--step-robust: the n to sample from, e.g. 12,9,6 (default L, 3L/4, L/2)."),
    eval_iterations: Optional[str] = typer.Option(None, "--eval-iterations", help="Also evaluate at these iteration counts (step L / n), e.g. 12,6."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run (model size, memory per device, steps, tokens, output); load and write nothing."),
    devices: Optional[int] = typer.Option(None, "--devices", help="--dry-run: processes of the launch (default: WORLD_SIZE, else 1)."),
    sharding: str = typer.Option("ddp", "--sharding", help="--dry-run: ddp (a full copy per device) or fsdp (weights, gradients, optimizer split over the devices)."),
) -> dict:
    """Pre-train a checkpoint or preset (span corruption, MLM or causal LM), optionally with a KI teacher."""
    from cpmctl.recipes import apply_recipe, load_recipe, parse_override
    from cpmctl.stages import pretrain as stage

    values = load_recipe(recipe)
    pairs = dict(parse_override(o) for o in overrides)
    merged = {**values, **pairs}
    model_fields = {k[len("model."):]: merged.pop(k) for k in list(merged) if k.startswith("model.")}
    if model_fields:
        merged["model"] = {**merged.get("model", {}), **model_fields}
    cfg = apply_recipe(
        stage.PretrainConfig, merged, out=out, init=init, preset=preset, data=data, max_steps=max_steps,
        teacher=teacher, ki_steps=ki_steps, ki_temperature=ki_temperature, ki_schedule=ki_schedule,
        teacher_cache=teacher_cache, teacher_cache_k=teacher_cache_k, resume=resume or None, force=force or None,
        kernels=kernels, share_layers=share_layers or None, share_groups=share_groups, step_robust=step_robust or None,
        robust_iterations=robust_iterations, eval_iterations=eval_iterations,
    )
    if dry_run:
        return _show_plan(stage.plan(cfg, devices=devices, sharding=sharding))
    if devices is not None or sharding != "ddp":
        raise UserError("--devices and --sharding describe a launch for --dry-run; the launcher (accelerate) sets them for a run")
    summary = stage.run(cfg)
    _print_json(summary)
    return summary


# -- distill ---------------------------------------------------------------------------------------
@app.command()
@handles_errors
def distill(
    out: Path = typer.Argument(..., help="Run directory: metrics.jsonl, state/ (for --resume), checkpoint/ (the student)."),
    teacher: Path = typer.Option(..., "--teacher", help="Teacher: a task model (checkpoint with task.json, e.g. OUT/checkpoint of a fine-tuning run) or a checkpoint."),
    train: Optional[Path] = typer.Option(None, "--train", help="Classification task: JSONL of {'text', 'text_pair'?, 'label'}."),
    dev: Optional[Path] = typer.Option(None, "--dev", help="Dev JSONL: accuracy and macro-F1 at each evaluation."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="LM distillation on token shards (cpmctl data prepare) instead of a task."),
    student: Optional[Path] = typer.Option(None, "--student", help="Start the student from this checkpoint (same tokenizer as the teacher)."),
    student_layers: Optional[str] = typer.Option(None, "--student-layers", help="N (every other teacher layer, top one kept) or a list like 0,2,4 (default: half)."),
    student_decoder_layers: Optional[str] = typer.Option(None, "--student-decoder-layers", help="Encoder-decoder: the decoder's layers (default: as --student-layers)."),
    student_config: Optional[str] = typer.Option(None, "--student-config", help="A freshly initialised student of this preset."),
    ce_weight: float = typer.Option(1.0, "--ce-weight", help="Student cross-entropy on the originals."),
    kd_weight: float = typer.Option(1.0, "--kd-weight", help="KD (KL at --temperature) on the originals."),
    mix_weight: float = typer.Option(1.0, "--mix-weight", help="KD on mixed inputs (needs the teacher online)."),
    smix_weight: float = typer.Option(0.0, "--smix-weight", help="Student cross-entropy on mixed inputs with mixed labels."),
    temperature: float = typer.Option(2.0, "--temperature", help="KD temperature T (the KL is scaled by T^2)."),
    mixup_alpha: float = typer.Option(0.4, "--mixup-alpha", help="lambda ~ Beta(a, a)."),
    augment: int = typer.Option(0, "--augment", help="Perturbed copies of each training example (token masking/replacement)."),
    augment_prob: float = typer.Option(0.15, "--augment-prob", help="Share of tokens perturbed in an augmented copy."),
    teacher_logits_cache: Optional[Path] = typer.Option(None, "--teacher-logits-cache", help="Directory of the teacher's logits on the training set (built once, reused); --corpus: its top-K per target."),
    teacher_cache_k: int = typer.Option(10, "--teacher-cache-k", help="--corpus with --teacher-logits-cache: teacher logits kept per target position."),
    head: str = typer.Option("linear", "--head", help="Classification: linear (pooled hidden state) or lm (label words scored by the LM head, as in prompt-tune)."),
    verbalizer: Optional[Path] = typer.Option(None, "--verbalizer", help="--head lm: JSON {label: word} (default: the labels, or the teacher's words)."),
    train_fraction: float = typer.Option(1.0, "--train-fraction", help="Train on this seeded share of --train."),
    max_length: int = typer.Option(128, "--max-length", help="Tokens per task example."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence (--corpus)."),
    freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings", help="Keep the student's embedding tables fixed (faster steps)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Examples per micro-batch."),
    epochs: float = typer.Option(3.0, "--epochs", help="Passes over the training set (unless --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps."),
    lr: float = typer.Option(5e-5, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    warmup_ratio: float = typer.Option(0.06, "--warmup-ratio", help="Share of the steps spent warming up."),
    schedule: str = typer.Option("linear", "--schedule", help="constant, linear or cosine decay."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, bf16 or fp16."),
    eval_every: int = typer.Option(0, "--eval-every", help="Steps between dev evaluations (0: at the end)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Steps between training states (0: at the end)."),
    log_every: int = typer.Option(10, "--log-every", help="Steps between train records in metrics.jsonl."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu forces the CPU (default: a GPU when present)."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT from its newest training state."),
    force: bool = typer.Option(False, "--force", help="Delete an existing run in OUT and start over."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run (model size, memory per device, steps, tokens, output); load and write nothing."),
) -> dict:
    """MixKD: distil a teacher into a smaller student, with mixup on word embeddings."""
    from cpmctl.stages import distill as stage

    cfg = stage.DistillConfig(
        teacher=teacher, out=out, train=train, dev=dev, corpus=corpus, student=student, student_layers=student_layers,
        student_decoder_layers=student_decoder_layers, student_config=student_config, ce_weight=ce_weight,
        kd_weight=kd_weight, mix_weight=mix_weight, smix_weight=smix_weight, temperature=temperature,
        mixup_alpha=mixup_alpha, augment=augment, augment_prob=augment_prob, teacher_logits_cache=teacher_logits_cache,
        teacher_cache_k=teacher_cache_k, head=head, verbalizer=verbalizer,
        train_fraction=train_fraction, max_length=max_length, seq_len=seq_len, freeze_embeddings=freeze_embeddings,
        batch_size=batch_size, epochs=epochs,
        max_steps=max_steps, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, schedule=schedule,
        grad_accum=grad_accum, mixed_precision=mixed_precision, eval_every=eval_every, checkpoint_every=checkpoint_every,
        log_every=log_every, seed=seed, device=device, resume=resume, force=force,
    )
    if dry_run:
        return _show_plan(stage.plan(cfg))
    result = stage.run(cfg)
    _print_json(result)
    return result


# -- prompt-tune -----------------------------------------------------------------------------------
@app.command("prompt-tune")
@handles_errors
def prompt_tune(
    model: Path = typer.Argument(..., help="A cpmctl checkpoint (kept frozen)."),
    out: Path = typer.Argument(..., help="Output adapter directory (PEFT layout)."),
    train: Path = typer.Option(..., "--train", help="Training JSONL: text, optional text_pair, label."),
    dev: Optional[Path] = typer.Option(None, "--dev", help="Dev JSONL: keep-the-best and early stopping on its accuracy."),
    test: Optional[Path] = typer.Option(None, "--test", help="Test JSONL, scored once at the end with the best prompt."),
    prompt_length: int = typer.Option(100, "--prompt-length", help="Prompt vectors."),
    position: str = typer.Option("front", "--position", help="front, back, middle (between text and text_pair) or front+middle+back."),
    init: str = typer.Option("vocab", "--init", help='vocab (frequent tokens), labels (label words, then vocab), random, or text:"...".'),
    reparam: str = typer.Option("none", "--reparam", help="none, or mlp (P-tuning style; folded into plain vectors when saved)."),
    reparam_hidden: Optional[int] = typer.Option(None, "--reparam-hidden", help="Hidden width of the reparameterisation MLP (default d_model)."),
    deep: bool = typer.Option(False, "--deep", help="A trainable prompt delta at every layer (P-tuning v2 style)."),
    verbalizer: Optional[Path] = typer.Option(None, "--verbalizer", help="JSON {label: word} (default: the label strings)."),
    head: str = typer.Option("lm", "--head", help="lm (score label words with the LM head) or linear (a trained linear head)."),
    pooling: str = typer.Option("mean", "--pooling", help="Linear head pooling: mean or last."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning baseline (every weight trains; no prompt)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adafactor (default) or adamw (default with --full)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Constant learning rate (default 0.3 adafactor, 1e-3 adamw, 3e-5 --full)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per step."),
    max_steps: int = typer.Option(1000, "--max-steps", help="Optimizer steps."),
    eval_every: int = typer.Option(100, "--eval-every", help="Steps between dev evaluations."),
    patience: Optional[int] = typer.Option(5, "--patience", help="Dev evaluations without improvement before stopping."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Cap on input tokens, prompt included (inputs are truncated with a warning)."),
    max_train_examples: Optional[int] = typer.Option(None, "--max-train-examples", help="Train on a random subset of this size."),
    max_dev_examples: Optional[int] = typer.Option(None, "--max-dev-examples", help="Evaluate on a random dev subset of this size."),
    max_test_examples: Optional[int] = typer.Option(None, "--max-test-examples", help="Test on a random subset of this size."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in the backward pass (less memory)."),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, bf16 or fp16 (GPU)."),
    seed: int = typer.Option(0, help="Random seed."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when present)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.train/."),
    force: bool = typer.Option(False, "--force", help="Replace OUT (and an earlier run's state) if they exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run (model size, memory per device, steps, tokens, output); load and write nothing."),
) -> dict:
    """Prompt-tune a frozen model on a classification task (or --full fine-tune it as the baseline)."""
    from cpmctl.stages import prompt_tune as stage

    cfg = stage.PromptTuneConfig(
        model=model, train=train, out=out, dev=dev, test=test, prompt_length=prompt_length, position=position,
        init=init, reparam=reparam, reparam_hidden=reparam_hidden, deep=deep, verbalizer=verbalizer, head=head,
        pooling=pooling, full=full, optimizer=optimizer, lr=lr, batch_size=batch_size, max_steps=max_steps,
        eval_every=eval_every, patience=patience, max_length=max_length, max_train_examples=max_train_examples,
        max_dev_examples=max_dev_examples, max_test_examples=max_test_examples, gradient_checkpointing=gradient_checkpointing,
        mixed_precision=mixed_precision, seed=seed, device=device, resume=resume, force=force, progress=not as_json,
    )
    if dry_run:
        return _show_plan(stage.plan(cfg), as_json)
    result = stage.run(cfg)
    if as_json:
        _print_json(result)
    else:
        stage.render(result)
    return result


# -- moefy -----------------------------------------------------------------------------------------
@app.command()
@handles_errors
def moefy(
    checkpoint: Path = typer.Argument(..., help="A dense cpmctl checkpoint (or, with --restore, a MoEfied one)."),
    out: Path = typer.Argument(..., help="Output checkpoint directory."),
    experts: Optional[int] = typer.Option(None, "--experts", help="Experts per FFN (E)."),
    expert_size: Optional[int] = typer.Option(None, "--expert-size", help="Neurons per expert (32 in the paper)."),
    split: str = typer.Option("cluster", help="How neurons are grouped: cluster, coactivation or random."),
    router: str = typer.Option("mlp", help="mlp (trained), center (cluster centres) or oracle (evaluation bound)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Experts per token."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of experts per token (default 0.2)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Text/JSONL corpus or prepared shards: router training, co-activation, report."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out text for the report (default: documents of --data kept out of training)."),
    field: str = typer.Option("text", help="JSONL field holding the text."),
    max_docs: int = typer.Option(2000, "--max-docs", help="Documents sampled from --data for statistics and router training."),
    eval_docs: int = typer.Option(300, "--eval-docs", help="Documents held out for the report."),
    max_tokens: int = typer.Option(32768, "--max-tokens", help="FFN inputs kept per layer (reservoir sample: bounded memory)."),
    epochs: int = typer.Option(10, help="Router training epochs (Adam 1e-2, batch 512)."),
    calibrate: int = typer.Option(0, "--calibrate", help="Steps of calibration with the routers active (tunes the MoE down projections)."),
    calibrate_lr: float = typer.Option(1e-4, "--calibrate-lr", help="Learning rate of --calibrate."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated FFNs to MoEfy, e.g. encoder.0,encoder.3 (default all)."),
    allow_uneven: bool = typer.Option(False, "--allow-uneven", help="Allow d_ff not divisible by the expert size (zero-padded experts)."),
    restore: bool = typer.Option(False, "--restore", help="Turn a MoEfied checkpoint back into its exact dense checkpoint."),
    seed: int = typer.Option(0, help="Random seed."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    kernels: str = typer.Option("auto", "--kernels", help="MoE FFN kernels: auto (Triton on CUDA, torch elsewhere), torch or triton."),
    task: Optional[Path] = typer.Option(None, "--task", help="JSONL task file ({text, text_pair?, label}): dense vs MoE accuracy in the report."),
    verbalizer: Optional[Path] = typer.Option(None, "--verbalizer", help="JSON {label: word} for scoring --task by label words with the LM head."),
    max_task_examples: Optional[int] = typer.Option(None, "--max-task-examples", help="Score a random subset of --task of this size."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run (model size, memory per device, steps, tokens, output); load and write nothing."),
) -> dict:
    """Split dense FFNs into experts with routers (MoEfication); only the chosen experts run."""
    from cpmctl.stages import moefy as moefy_stage

    cfg = moefy_stage.MoefyConfig(
        checkpoint=checkpoint, out=out, experts=experts, expert_size=expert_size, split=split, router=router,
        top_k=top_k, ratio=ratio, data=data, eval_data=eval_data, field=field, max_docs=max_docs, eval_docs=eval_docs,
        max_tokens=max_tokens, epochs=epochs, layers=[s.strip() for s in layers.split(",") if s.strip()] if layers else None,
        allow_uneven=allow_uneven, restore=restore, seed=seed, overwrite=force, calibrate=calibrate, calibrate_lr=calibrate_lr,
        kernels=kernels, task=task, verbalizer=verbalizer, max_task_examples=max_task_examples,
    )
    if dry_run:
        return _show_plan(moefy_stage.plan(cfg), as_json)
    report = moefy_stage.run(cfg)
    if as_json:
        _print_json(report)
    else:
        moefy_stage.render(report)
    typer.echo(f"wrote {out}")
    return report


# -- inherit ---------------------------------------------------------------------------------------
@app.command()
@handles_errors
def inherit(
    src: Path = typer.Argument(..., help="The checkpoint to grow."),
    out: Path = typer.Argument(..., help="Output checkpoint directory."),
    to: str = typer.Option(..., "--to", help="Target shape: a preset, a config.json / checkpoint, or KEY=VALUE pairs (d_model=512,n_layers=8)."),
    method: str = typer.Option("fpi", "--method", help="fpi (function-preserving), aki (new units from the next layer), tile (exact repetition), stack (depth by stacking)."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="Expand to this tokenizer's vocabulary (longest-prefix init)."),
    to_moe: Optional[int] = typer.Option(None, "--to-moe", help="Upcycle every FFN into this many experts (copies, top-1)."),
    verify: bool = typer.Option(False, "--verify", help="Print the largest logit difference between SRC and the result on sample text."),
    seed: int = typer.Option(0, help="Seed of the random unit copies, vocabulary fallbacks and router init."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run (model size, memory per device, steps, tokens, output); load and write nothing."),
) -> dict:
    """Grow a checkpoint wider/deeper (bert2BERT FPI/AKI, tiling, stacking), expand its vocabulary, upcycle to MoE."""
    from cpmctl.stages import inherit as stage

    cfg = stage.InheritConfig(src=src, to=to, out=out, method=method, vocab=vocab, to_moe=to_moe, verify=verify,
                              seed=seed, force=force)
    if dry_run:
        return _show_plan(stage.plan(cfg), as_json)
    result = stage.run(cfg)
    if as_json:
        _print_json(result)
        return result
    typer.echo(f"wrote {out}: {result['parameters_src']:,} -> {result['parameters_out']:,} parameters ({method})")
    if result.get("vocab"):
        typer.echo("vocabulary: " + ", ".join(f"{k} {v}" for k, v in result["vocab"].items()))
    if verify:
        diff = result.get("max_logit_diff")
        typer.echo(f"max logit difference: {diff:.3e} (largest logit {result['max_logit']:.3f})" if diff is not None else f"verify: {result['verify']}")
    return result


# -- run -------------------------------------------------------------------------------------------
@app.command("run")
@handles_errors
def run_recipe(
    recipe: Path = typer.Argument(..., help="A pipeline recipe (TOML with [[step]] tables), e.g. recipes/demo.toml."),
    out: Path = typer.Argument(..., help="Output directory: every step's output, recipes/ and pipeline.json."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each step's command and plan (sizes, memory, steps, tokens); read and write no weights."),
    force: bool = typer.Option(False, "--force", help="Pass --force to every step that has it (replace earlier outputs)."),
    start: Optional[str] = typer.Option(None, "--from", help="Start at this step (earlier steps' outputs must exist)."),
    only: Optional[str] = typer.Option(None, "--only", help="Run just this step."),
) -> None:
    """Run a pipeline recipe: each step is a cpmctl command; ends with a summary table."""
    from cpmctl import pipeline

    loaded = pipeline.load_pipeline(recipe, out)
    try:
        if dry_run:
            if start or only:
                raise UserError("--dry-run plans the whole pipeline; --from/--only apply to real runs")
            return pipeline.dry_run_pipeline(loaded, out, force=force)
        return pipeline.run_pipeline(loaded, out, force=force, start=start, only=only)
    except pipeline.PipelineStopped as exc:
        _fail(f"{exc}; outputs of the earlier steps are in {out} (rerun from this step with --from {exc.step})", exc.code)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
