"""What the method benchmarks (ki, distill, prompt_tune, moefy_minilm, shared_ode) share: the data
directory they read, seeds summarised as a mean with a 95% confidence interval, a verdict per
target, results written before anything optional, and plots that are skipped without matplotlib.

Imports nothing heavy, so a benchmark can check its data and its options before any training.

The data directory is "the shared format": a corpus (`corpus.txt`, one document per line) and a
labelled task (`*train.jsonl`, `*dev.jsonl`, `*test.jsonl` of {"text", "label"} rows), either
beside the corpus or in a `task/` folder below it, as `cpmctl data stdlib` writes. Any number
(at least two) of classes.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet"
SPLITS = ("train", "dev", "test")


class DataError(ValueError):
    """The data directory cannot serve the benchmark; the message is the one line printed."""


@dataclass(frozen=True)
class MethodData:
    root: Path
    corpus: Path | None
    task: dict[str, Path]          # split -> JSONL
    rows: dict[str, int]           # split -> rows actually there
    labels: tuple[str, ...]        # the training split's classes, sorted

    def describe(self) -> str:
        parts = [f"data {self.root}"]
        if self.corpus is not None:
            parts.append(f"corpus {self.corpus.name}")
        if self.task:
            parts.append(", ".join(f"{s} {self.rows[s]:,} rows" for s in SPLITS if s in self.task))
            parts.append(f"{len(self.labels)} classes")
        return "; ".join(parts)


def _task_file(root: Path, split: str) -> Path:
    candidates = sorted({*root.glob(f"*{split}.jsonl"), *(root / "task").glob(f"*{split}.jsonl")})
    if not candidates:
        raise DataError(f"{root} has no {split} split (a *{split}.jsonl file here or in task/)")
    if len(candidates) > 1:
        raise DataError(f"{root} has several {split} splits ({', '.join(p.name for p in candidates)}); keep one")
    return candidates[0]


def _labels_and_rows(path: Path) -> tuple[set[str], int]:
    labels, rows = set(), 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: expected a JSON object with 'text' and 'label'") from None
            if not isinstance(label, str) or not isinstance(text, str):
                raise DataError(f"{path}:{number}: 'text' and 'label' must be strings")
            labels.add(label)
            rows += 1
    return labels, rows


def find_data(root: Path, *, corpus: bool, task: bool) -> MethodData:
    """Check `root` for what a benchmark needs (before it trains anything): DataError otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} not found")
    corpus_path = None
    if corpus:
        corpus_path = root / "corpus.txt"
        if not corpus_path.is_file() or corpus_path.stat().st_size == 0:
            raise DataError(f"{root} has no corpus.txt (one document per line)")
    files, rows, labels = {}, {}, ()
    if task:
        split_labels = {}
        for split in SPLITS:
            files[split] = _task_file(root, split)
            split_labels[split], rows[split] = _labels_and_rows(files[split])
            if rows[split] == 0:
                raise DataError(f"{files[split]} has no rows")
        if len(split_labels["train"]) < 2:
            raise DataError(f"{files['train']} has a single class ({', '.join(split_labels['train'])}); "
                            "a classification benchmark needs at least two")
        unseen = (split_labels["dev"] | split_labels["test"]) - split_labels["train"]
        if unseen:
            raise DataError(f"dev/test labels not in {files['train'].name}: {', '.join(sorted(unseen))}")
        labels = tuple(sorted(split_labels["train"]))
    return MethodData(root, corpus_path, files, rows, labels)


def add_arguments(parser, *, work: Path, seeds: int) -> None:
    """The options every method benchmark takes."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="corpus.txt and a task (*train/dev/test.jsonl, here or in task/); default: ../shared/data/wordnet")
    parser.add_argument("--work", type=Path, default=work, help="working directory (models, runs; reused where noted)")
    parser.add_argument("--seeds", type=int, default=seeds, help="independent runs; every figure is a mean with a 95%% CI")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default WORK/results.json)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip the plot")
    parser.add_argument("--json", action="store_true", help="print the results JSON instead of the tables")


def seeds_of(args) -> list[int]:
    return list(range(args.first_seed, args.first_seed + args.seeds))


def start(args, *, corpus: bool, task: bool) -> MethodData:
    """Check the options and the data before any work: one error line and exit 2 otherwise. Also
    says now, not after the training, when the plot will be skipped."""
    if args.seeds < 1:
        exit_usage("--seeds must be at least 1")
    try:
        data = find_data(args.data, corpus=corpus, task=task)
    except DataError as e:
        exit_usage(str(e))
    if getattr(args, "plot", False) and not plotting_available():
        warnings.warn("matplotlib is not installed (pip install -e .[bench]); the results are written, the plot is skipped",
                      stacklevel=2)
        args.plot = False
    args.work.mkdir(parents=True, exist_ok=True)
    return data


def exit_usage(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def machine() -> dict:
    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def write_results(path: Path, report: dict) -> Path:
    """The results JSON, atomically, before any table or plot: a failure after this loses nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def subsample(src: Path, dst: Path, n: int | None, seed: int) -> int:
    """A seeded random subset of `n` rows of a JSONL file (all of it when n is None or larger)."""
    lines = [line for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()]
    if n is not None and n < len(lines):
        random.Random(seed).shuffle(lines)
        lines = lines[:n]
    Path(dst).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


# -- statistics ---------------------------------------------------------------------------------

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (a 95% two-sided interval).
    Beyond the table, the Cornish-Fisher expansion around the normal quantile (error < 1e-3)."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its 95% t-interval (low = high = mean for a single seed)."""
    mean: float
    low: float
    high: float
    n: int
    sd: float
    values: tuple[float, ...]

    def format(self, spec: str = ".3f", suffix: str = "") -> str:
        if self.n < 2:
            return f"{self.mean:{spec}}{suffix} (1 seed)"
        return f"{self.mean:{spec}}{suffix} [{self.low:{spec}}, {self.high:{spec}}]"


def mean_ci(values) -> Estimate:
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Estimate(mean, mean, mean, 1, 0.0, values)
    sd = statistics.stdev(values)
    half = t_critical(len(values) - 1) * sd / math.sqrt(len(values))
    return Estimate(mean, mean - half, mean + half, len(values), sd, values)


def paired_difference(a, b) -> Estimate:
    """a - b seed by seed, as a mean with its 95% interval: the comparison that cancels what a
    seed does to both sides (data order, initialisation)."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return mean_ci(x - y for x, y in zip(a, b))


def verdict(estimate: Estimate, target: float, *, higher_is_better: bool = True) -> str:
    """met (the whole interval is on the good side of the target), missed (all on the bad side)
    or not resolved (the interval straddles the target, or a single seed gives no interval)."""
    if estimate.n < 2:
        good = estimate.mean >= target if higher_is_better else estimate.mean <= target
        return ("met" if good else "missed") + " (1 seed, no interval)"
    low_good = estimate.low >= target if higher_is_better else estimate.high <= target
    high_bad = estimate.high < target if higher_is_better else estimate.low > target
    return "met" if low_good else "missed" if high_bad else "not resolved"


def target_line(name: str, estimate: Estimate, target: float, *, higher_is_better: bool = True,
                spec: str = ".3f", suffix: str = "") -> dict:
    """One target: its figure, the target and the verdict, as printed and as stored."""
    sign = ">=" if higher_is_better else "<="
    result = verdict(estimate, target, higher_is_better=higher_is_better)
    return {"target": name, "figure": estimate.format(spec, suffix), "goal": f"{sign} {target:{spec}}{suffix}",
            "verdict": result, "estimate": asdict(estimate)}


def print_targets(lines: list[dict]) -> None:
    for line in lines:
        print(f"target {line['target']}: {line['figure']} (goal {line['goal']}): {line['verdict']}")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table after a blank line (BENCHMARKS.md takes it as printed)."""
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# -- language-model pre-training benchmarks (ki, shared_ode) ------------------------------------

def add_lm_arguments(parser) -> None:
    """What the pre-training benchmarks add: the tokenizer, the batch shape and the threads."""
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine OpenMP spinning makes 2 threads several times slower)")


def model_shape(layers: int, d: int, d_head: int) -> dict:
    """A llama-tiny-style decoder of `layers` x `d` (SwiGLU with d_ff = 3d)."""
    heads = d // d_head
    return {"d_model": d, "n_heads": heads, "n_kv_heads": heads, "d_head": d_head, "d_ff": 3 * d, "n_layers": layers}


@dataclass(frozen=True)
class LMData:
    tokenizer: Path
    shards: Path


def prepare_lm_data(work: Path, corpus: Path, vocab: int) -> LMData:
    """A unigram tokenizer trained on `corpus` and the corpus tokenized into shards, in WORK (made
    once; reused while the corpus and the vocabulary are the same)."""
    import time

    from cpmctl.data import prepare
    from cpmctl.tokenizer import load_tokenizer, train_sentencepiece

    stamp = work / "lm-data.json"
    key = {"corpus": str(Path(corpus).resolve()), "bytes": Path(corpus).stat().st_size, "vocab": vocab}
    tok_dir, shards = work / "tokenizer", work / "shards"
    fresh = stamp.is_file() and json.loads(stamp.read_text()) == key and tok_dir.is_dir() and shards.is_dir()
    if not fresh:
        import shutil

        for d in (tok_dir, shards):  # benchmark scratch space under WORK, made by this function
            if d.exists():
                shutil.rmtree(d)
        t0 = time.monotonic()
        train_sentencepiece(corpus, tok_dir, vocab, sentinels=0, input_sentence_size=200_000)
        prepare(corpus, load_tokenizer(tok_dir), shards, progress=False)
        stamp.write_text(json.dumps(key))
        print(f"tokenizer and shards: {time.monotonic() - t0:.1f}s", flush=True)
    return LMData(tok_dir, shards)
