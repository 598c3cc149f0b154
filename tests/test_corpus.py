from __future__ import annotations

import json
from collections import Counter

import pytest

from cpmctl import corpus
from cpmctl.corpus import (DocumentReader, read_documents, split_of, stdlib_corpus, write_corpus_text,
                           write_task_jsonl)
from cpmctl.errors import UserError


def test_stdlib_corpus_is_megabytes_of_labelled_single_line_documents(capsys):
    records = stdlib_corpus()
    megabytes = sum(len(r["text"].encode("utf-8")) for r in records) / 1e6
    with capsys.disabled():
        print(f"\nstdlib corpus: {len(records)} documents, {megabytes:.2f} MB of text")
    assert megabytes >= 1.0
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts)
    for r in records:
        assert set(r) == {"text", "label", "module"}
        assert r["module"].split(".")[0] == r["label"]
        assert "\n" not in r["text"] and "  " not in r["text"] and r["text"] == r["text"].strip()
        assert len(r["text"].split()) >= corpus.MIN_WORDS
    labels = Counter(r["label"] for r in records)
    for skipped in ("tkinter", "idlelib", "test", "this", "antigravity", "lib2to3", "turtle"):
        assert skipped not in labels
    assert "email" in labels and "asyncio" in labels
    assert stdlib_corpus(max_docs=10) == records[:10]


def test_stdlib_corpus_is_identical_across_builds():
    first = stdlib_corpus()
    corpus._stdlib_records.cache_clear()
    assert stdlib_corpus() == first


def test_write_corpus_text_one_document_per_line(tmp_path):
    records = stdlib_corpus(max_docs=50)
    summary = write_corpus_text(tmp_path / "c.txt", max_docs=50)
    data = (tmp_path / "c.txt").read_bytes()
    assert summary == {"path": str(tmp_path / "c.txt"), "docs": 50, "bytes": len(data)}
    assert data.decode("utf-8").splitlines() == [r["text"] for r in records]
    assert list(read_documents(tmp_path / "c.txt")) == [r["text"] for r in records]
    with pytest.raises(UserError, match="already exists"):
        write_corpus_text(tmp_path / "c.txt", max_docs=5)
    write_corpus_text(tmp_path / "c.txt", max_docs=5, overwrite=True)
    assert len((tmp_path / "c.txt").read_text().splitlines()) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["c.txt"]  # no temporary file left behind


def test_task_has_enough_classes_and_hash_fixed_splits(tmp_path):
    summary = write_task_jsonl(tmp_path / "task")
    classes = json.loads((tmp_path / "task" / "labels.json").read_text())
    assert classes == summary["classes"] and len(classes) == 8
    rows = {s: [json.loads(line) for line in (tmp_path / "task" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "dev", "test")}
    assert {s: len(r) for s, r in rows.items()} == summary["splits"]
    seen = set()
    for split, split_rows in rows.items():
        for row in split_rows:
            assert set(row) == {"text", "label"} and row["label"] in classes
            assert split_of(row["text"]) == split
            assert row["text"] not in seen
            seen.add(row["text"])
    per_class = Counter(row["label"] for split_rows in rows.values() for row in split_rows)
    assert per_class == Counter(summary["per_class"])
    assert all(per_class[c] >= 100 for c in classes)
    for split in ("dev", "test"):  # every class is evaluable
        assert {row["label"] for row in rows[split]} == set(classes)
    assert 0.7 < len(rows["train"]) / len(seen) < 0.9

    write_task_jsonl(tmp_path / "again")
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "labels.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "task" / name).read_bytes()


def test_task_class_limits(tmp_path):
    summary = write_task_jsonl(tmp_path / "small", num_classes=5, max_per_class=40, min_per_class=40)
    assert len(summary["classes"]) == 5 and set(summary["per_class"].values()) == {40}
    with pytest.raises(UserError, match="classes with at least"):
        write_task_jsonl(tmp_path / "huge", num_classes=500)
    assert not (tmp_path / "huge").exists()


def test_reader_text_skips_blank_lines_and_keeps_spaces(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"first doc\r\n\n   \n  spaced  doc \nlast without newline")
    reader = DocumentReader(path)
    assert list(reader) == [(1, "first doc"), (4, "  spaced  doc "), (5, "last without newline")]
    assert reader.bytes_read == reader.total_bytes == path.stat().st_size


def test_reader_jsonl_field_and_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "one\\ntwo", "x": 1}\n\n{"body": ""}\n{"body": "three"}\n')
    assert list(DocumentReader(path, field="body")) == [(1, "one\ntwo"), (4, "three")]
    with pytest.raises(UserError, match=r"c\.jsonl:1: no field 'text'"):
        list(DocumentReader(path))
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:2: invalid JSON"):
        list(DocumentReader(path))
    path.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(UserError, match=r":2: expected a JSON object"):
        list(DocumentReader(path))
    path.write_text('{"text": 5}\n')
    with pytest.raises(UserError, match=r":1: field 'text' is int"):
        list(DocumentReader(path))


def test_reader_names_the_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\nalso fine\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt:3: not valid UTF-8"):
        list(DocumentReader(path))
    with pytest.raises(UserError, match="does not exist"):
        DocumentReader(tmp_path / "missing.txt")
