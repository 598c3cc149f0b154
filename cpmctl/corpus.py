"""Corpora: reading document files, and the embedded default corpus built from the stdlib.

Two jobs live here because both are "where text comes from":

* `DocumentReader` streams documents out of a corpus file, either plain text (one document per
  line, blank lines skipped) or JSON lines (one object per line, the text under a field). It
  reads bytes and decodes line by line, so a bad line is reported with its number and the file
  is never held in memory whole. Tokenizer training and `data.prepare` both use it.
* `stdlib_corpus` turns the docstrings of the Python standard library into labelled English
  documents. Every Python installation has them, so the demo and the self-contained tests need
  no download. Sources are parsed with `ast`, never imported: no module code runs, nothing is
  printed, and the walk is sorted, so two builds on one installation are identical.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import random
import sysconfig
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory, check_new_output, current_umask, fsync_dir, remove_stale_temporaries

JSONL_SUFFIXES = (".jsonl", ".json")


# -- reading corpus files -----------------------------------------------------------------------
def is_jsonl(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


class DocumentReader:
    """Iterate `(line_number, text)` over the documents of a text or JSONL corpus file.

    `bytes_read` grows as lines are consumed, which is what progress bars measure. Errors are
    UserErrors naming the file and the 1-based line: a missing file, a line that is not UTF-8,
    a JSONL line that is not an object holding a string under `field`.
    """

    def __init__(self, path: str | os.PathLike, *, field: str = "text", jsonl: bool | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"corpus {self.path} does not exist")
        if not self.path.is_file():
            raise UserError(f"corpus {self.path} is not a file")
        self.field = field
        self.jsonl = is_jsonl(self.path) if jsonl is None else jsonl
        self.total_bytes = self.path.stat().st_size
        self.bytes_read = 0
        self.lines_read = 0

    def __iter__(self) -> Iterator[tuple[int, str]]:
        self.bytes_read = 0
        self.lines_read = 0
        with open(self.path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                self.bytes_read += len(raw)
                self.lines_read = line_no
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(
                        f"{self.path}:{line_no}: not valid UTF-8 (byte {exc.start} of the line); "
                        "convert the corpus to UTF-8"
                    ) from None
                # Only the line terminator is removed: the document's own spaces are its text.
                line = line[:-1] if line.endswith("\n") else line
                line = line[:-1] if line.endswith("\r") else line
                if not line.strip():
                    continue
                if not self.jsonl:
                    yield line_no, line
                    continue
                text = self._json_text(line, line_no)
                if text.strip():
                    yield line_no, text

    def _json_text(self, line: str, line_no: int) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.path}:{line_no}: invalid JSON ({exc.msg}); "
                            "expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{self.path}:{line_no}: expected a JSON object per line, got {type(record).__name__}")
        if self.field not in record:
            raise UserError(f"{self.path}:{line_no}: no field {self.field!r} in the JSON object; "
                            "name the field that holds the text", option="field")
        text = record[self.field]
        if not isinstance(text, str):
            raise UserError(f"{self.path}:{line_no}: field {self.field!r} is {type(text).__name__}, not a string")
        return text


def read_documents(path: str | os.PathLike, *, field: str = "text") -> Iterator[str]:
    """The documents of a corpus file, in order (see `DocumentReader`)."""
    for _, text in DocumentReader(path, field=field):
        yield text


# -- the standard-library docstring corpus ------------------------------------------------------
# Test suites are code rather than prose; lib2to3 carries Python 2 fixtures; tkinter, idlelib and
# the turtle modules are split into separate packages by many distributions, so including them
# would make the corpus (and the task's classes) differ between machines with the same Python.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                 "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip"}
_SKIPPED_MODULES = {"this", "antigravity", "turtle", "__phello__"}
MIN_WORDS = 5


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every stdlib source kept, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        # A sub-directory is a package only with an __init__.py; the top level is the stdlib itself.
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIPPED_DIRS and not d.startswith(("test", "config-", "."))
            and (Path(dirpath, d) / "__init__.py").exists()
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            parts = [*rel.parts] if stem == "__init__" else [*rel.parts, stem]
            if not parts or parts[0] in _SKIPPED_MODULES or parts[0].startswith("test"):
                continue
            yield ".".join(parts), Path(dirpath, name)


def _docstrings(path: Path) -> Iterator[str]:
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            # Old escape sequences in stdlib sources warn on parsing; they are not our problem.
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)  # inspect.cleandoc under the hood
            if doc:
                yield doc


@functools.lru_cache(maxsize=1)
def _stdlib_records() -> tuple[tuple[str, str, str], ...]:
    seen: set[str] = set()
    records = []
    for module, path in _stdlib_sources(_stdlib_root()):
        label = module.split(".")[0]
        for doc in _docstrings(path):
            text = " ".join(doc.split())
            # Duplicates ("Return self==value.", generated codec headers) would leak between the
            # task's splits and overweight boilerplate; the first occurrence in walk order wins.
            if len(text.split()) < MIN_WORDS or text in seen:
                continue
            seen.add(text)
            records.append((text, label, module))
    return tuple(records)


def stdlib_corpus(max_docs: int | None = None) -> list[dict[str, str]]:
    """Docstrings of the standard library as `{"text", "label", "module"}` records.

    `text` is the cleaned docstring with its whitespace collapsed to single spaces (one document
    per line when written out), `label` the top-level module it belongs to, `module` the dotted
    module name. Docstrings shorter than MIN_WORDS words and repeats are dropped.
    """
    records = _stdlib_records()
    if max_docs is not None:
        records = records[:max_docs]
    return [{"text": text, "label": label, "module": module} for text, label, module in records]


def _atomic_write_lines(path: Path, lines: Iterable[str], *, overwrite: bool) -> int:
    """Write lines to `path` through a temporary sibling and a rename; returns bytes written."""
    check_new_output(path, overwrite)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=parent)
    written = 0
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 is for secrets; this is an output
        with os.fdopen(fd, "wb") as fh:
            for line in lines:
                data = (line + "\n").encode("utf-8")
                fh.write(data)
                written += len(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        fsync_dir(parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return written


def write_corpus_text(path: str | os.PathLike, *, max_docs: int | None = None,
                      records: list[dict[str, Any]] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the stdlib corpus (or `records`) as plain text, one document per line."""
    records = stdlib_corpus(max_docs) if records is None else records
    if not records:
        raise UserError("no documents to write")
    path = Path(path)
    nbytes = _atomic_write_lines(path, (r["text"] for r in records), overwrite=overwrite)
    return {"path": str(path), "docs": len(records), "bytes": nbytes}


SPLITS = ("train", "dev", "test")


def split_of(text: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split a text belongs to, fixed by a hash of the text itself (stable across builds)."""
    position = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    if position < fractions[0]:
        return "train"
    if position < fractions[0] + fractions[1]:
        return "dev"
    return "test"


def check_task_sizes(*, num_classes: int, min_per_class: int, max_per_class: int | None,
                     max_docs: int | None = None) -> None:
    """The sizes of a task to write, checked before the corpus is read: a task needs two classes
    or more, and every limit is a positive count."""
    if num_classes < 2:
        raise UserError(f"a classification task needs at least 2 classes, got {num_classes}", option="num_classes")
    for name, value in (("min_per_class", min_per_class), ("max_per_class", max_per_class), ("max_docs", max_docs)):
        if value is not None and value < 1:
            raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {value}", option=name)


def choose_classes(records: list[dict[str, Any]], num_classes: int, *, min_per_class: int) -> list[str]:
    """The `num_classes` best-populated public top-level modules, largest first (ties by name)."""
    counts = Counter(r["label"] for r in records if not r["label"].startswith("_"))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_classes]
    if len(ranked) < num_classes or ranked[-1][1] < min_per_class:
        have = sum(1 for _, n in counts.items() if n >= min_per_class)
        raise UserError(f"the corpus has {have} classes with at least {min_per_class} documents; "
                        f"ask for fewer than {num_classes} classes or a lower minimum")
    return [label for label, _ in ranked]


def write_task_jsonl(out_dir: str | os.PathLike, *, num_classes: int = 8, min_per_class: int = 100,
                     max_per_class: int | None = None, records: list[dict[str, Any]] | None = None,
                     fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                     overwrite: bool = False) -> dict[str, Any]:
    """Write a text-classification task: `{train,dev,test}.jsonl` of `{"text", "label"}` rows.

    Classes are the best-populated top-level modules of the corpus; `labels.json` lists them in
    a fixed order (largest first). Splits are fixed by a hash of each text. `max_per_class` keeps
    the first documents of each class in corpus order, for a smaller, more balanced task.
    """
    check_task_sizes(num_classes=num_classes, min_per_class=min_per_class, max_per_class=max_per_class)
    records = stdlib_corpus() if records is None else records
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise UserError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    classes = choose_classes(records, num_classes, min_per_class=min_per_class)
    kept: Counter[str] = Counter()
    rows: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for record in records:
        label = record["label"]
        if label not in classes or (max_per_class is not None and kept[label] >= max_per_class):
            continue
        kept[label] += 1
        rows[split_of(record["text"], fractions)].append({"text": record["text"], "label": label})
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for split in SPLITS:
            _atomic_write_lines(tmp / f"{split}.jsonl", (json.dumps(r, ensure_ascii=False) for r in rows[split]),
                                overwrite=False)
        (tmp / "labels.json").write_text(json.dumps(classes, indent=2) + "\n")
    return {
        "path": str(out_dir),
        "classes": classes,
        "splits": {s: len(rows[s]) for s in SPLITS},
        "per_class": {c: kept[c] for c in classes},
    }


def write_stdlib_dataset(out_dir: str | os.PathLike, *, num_classes: int = 8, min_per_class: int = 100,
                         max_per_class: int | None = None, max_docs: int | None = None,
                         overwrite: bool = False) -> dict[str, Any]:
    """The embedded default data set: `OUT/corpus.txt` (the stdlib corpus, one document per line)
    and `OUT/task/` (its module-classification task, see write_task_jsonl), written atomically."""
    check_task_sizes(num_classes=num_classes, min_per_class=min_per_class, max_per_class=max_per_class, max_docs=max_docs)
    records = stdlib_corpus(max_docs)
    if not records:
        raise UserError("no documents to write")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        corpus = write_corpus_text(tmp / "corpus.txt", records=records)
        task = write_task_jsonl(tmp / "task", num_classes=num_classes, min_per_class=min_per_class,
                                max_per_class=max_per_class, records=records)
    out = Path(out_dir)
    return {"path": str(out), "corpus": str(out / "corpus.txt"), "documents": corpus["docs"],
            "corpus_bytes": corpus["bytes"], "task": str(out / "task"), "classes": task["classes"],
            "splits": task["splits"]}


def sample_documents(path: Path, count: int, field: str, seed: int) -> list[str]:
    """A uniform sample of `count` documents of a text/JSONL corpus (reservoir: bounded memory).

    Li's algorithm L: instead of a random draw per document, it draws how many documents to
    skip before the next replacement, so a corpus of n documents costs O(count log(n/count))
    draws, not n."""
    if count < 1:
        return []
    rng = random.Random(seed)

    def unit() -> float:  # uniform in (0, 1): logarithms need it above 0
        u = rng.random()
        return u if u > 0 else unit()

    sample: list[str] = []
    w = math.exp(math.log(unit()) / count)
    replace_at = count + int(math.log(unit()) / math.log1p(-w))
    for seen, text in enumerate(read_documents(path, field=field)):
        if seen < count:
            sample.append(text)
        elif seen == replace_at:
            sample[rng.randrange(count)] = text
            w *= math.exp(math.log(unit()) / count)
            replace_at += 1 + int(math.log(unit()) / math.log1p(-w))
    rng.shuffle(sample)
    return sample
