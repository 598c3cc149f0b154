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
    """Import a BERT, T5/mT5, Llama or GPT-2 checkpoint (or export one back)."""
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
) -> None:
    """Generate text (decoder-only, encoder-decoder) or embed sentences (encoder-only)."""
    from cpmctl.stages import infer as infer_stage

    cfg = infer_stage.InferConfig(
        checkpoint=checkpoint, texts=[text] if text is not None else None, input_file=input_file,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        batch_size=batch_size, device=device, dtype=dtype, stream=stream and not as_json, normalize=normalize,
    )
    result = infer_stage.run(cfg)
    if as_json:
        _print_json(result)
    else:
        infer_stage.render(result, streamed=cfg.stream)


# -- demo ------------------------------------------------------------------------------------------
@app.command()
@handles_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Working directory for the demo's outputs."),
    force: bool = typer.Option(True, "--force/--no-force", help="Replace earlier demo outputs."),
) -> None:
    """Run the foundation walk-through on the embedded stdlib corpus (no download)."""
    from cpmctl import demo as demo_module

    demo_module.run(out, overwrite=force)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
