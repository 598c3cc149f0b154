"""benchmarks/harness.py: the statistics every method benchmark reports, its verdicts, and the
data check that runs before any training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402


def test_t_critical_matches_known_quantiles():
    assert harness.t_critical(1) == pytest.approx(12.706, abs=1e-3)
    assert harness.t_critical(4) == pytest.approx(2.776, abs=1e-3)
    assert harness.t_critical(60) == pytest.approx(2.000, abs=2e-3)   # the expansion beyond the table
    assert harness.t_critical(1000) == pytest.approx(1.962, abs=2e-3)
    with pytest.raises(ValueError):
        harness.t_critical(0)


def test_mean_ci_and_paired_difference():
    est = harness.mean_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, half-width t(2) * 1 / sqrt(3) = 4.303 / 1.732
    assert est.mean == 2.0 and est.sd == 1.0
    assert est.high - est.mean == pytest.approx(4.303 / 3 ** 0.5, abs=1e-3)
    single = harness.mean_ci([0.5])
    assert (single.low, single.high, single.n) == (0.5, 0.5, 1)
    diff = harness.paired_difference([1.0, 2.0, 3.5], [0.5, 1.5, 3.0])
    assert diff.mean == pytest.approx(0.5) and diff.sd == pytest.approx(0.0)
    with pytest.raises(ValueError):
        harness.paired_difference([1.0], [1.0, 2.0])


def test_verdicts():
    assert harness.verdict(harness.mean_ci([1.45, 1.5, 1.55]), 1.3) == "met"
    assert harness.verdict(harness.mean_ci([1.0, 1.05, 1.1]), 1.3) == "missed"
    assert harness.verdict(harness.mean_ci([1.0, 1.3, 1.6]), 1.3) == "not resolved"
    assert harness.verdict(harness.mean_ci([0.95, 1.0, 1.05]), 1.2, higher_is_better=False) == "met"
    assert harness.verdict(harness.mean_ci([1.4]), 1.3).startswith("met (1 seed")
    line = harness.target_line("speed", harness.mean_ci([1.45, 1.5, 1.55]), 1.3, spec=".2f", suffix="x")
    assert line["verdict"] == "met" and line["goal"] == ">= 1.30x"


def _task(root: Path, labels_by_split: dict[str, list[str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text("one line\nanother line\n")
    for split, labels in labels_by_split.items():
        (root / f"x-{split}.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": label}) + "\n"
                                                       for i, label in enumerate(labels)))


def test_find_data_accepts_any_number_of_classes(tmp_path):
    _task(tmp_path / "d", {"train": ["a", "b", "c"], "dev": ["a"], "test": ["c"]})
    data = harness.find_data(tmp_path / "d", corpus=True, task=True)
    assert data.labels == ("a", "b", "c") and data.rows == {"train": 3, "dev": 1, "test": 1}


@pytest.mark.parametrize("labels, message", [
    ({"train": ["a", "a"], "dev": ["a"], "test": ["a"]}, "single class"),
    ({"train": ["a", "b"], "dev": ["z"], "test": ["a"]}, "dev/test labels not in"),
    ({"train": ["a", "b"], "dev": ["a"]}, "no test split"),
])
def test_find_data_refuses(tmp_path, labels, message):
    _task(tmp_path / "d", labels)
    with pytest.raises(harness.DataError, match=message):
        harness.find_data(tmp_path / "d", corpus=True, task=True)


def test_write_results_is_atomic_and_handles_estimates(tmp_path):
    path = harness.write_results(tmp_path / "r" / "results.json", {"e": harness.mean_ci([1.0, 2.0]), "p": tmp_path})
    loaded = json.loads(path.read_text())
    assert loaded["e"]["mean"] == 1.5 and loaded["p"] == str(tmp_path)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_ki_refuses_bad_data_before_training(tmp_path):
    _task(tmp_path / "d", {"train": ["a", "b"], "dev": ["a"], "test": ["b"]})
    (tmp_path / "d" / "corpus.txt").unlink()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ki.py"), "--data", str(tmp_path / "d"),
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'd'} has no corpus.txt (one document per line)"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("script, drop, message", [
    ("distill.py", "x-test.jsonl", "has no test split"),
    ("prompt_tune.py", "x-dev.jsonl", "has no dev split"),
    ("moefy_minilm.py", "corpus.txt", "has no corpus.txt"),
])
def test_method_benchmarks_refuse_bad_data_before_training(tmp_path, script, drop, message):
    _task(tmp_path / "d", {"train": ["a", "b"], "dev": ["a"], "test": ["b"]})
    (tmp_path / "d" / drop).unlink()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--data", str(tmp_path / "d"),
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "w").exists()


def test_distill_refuses_a_single_class_task(tmp_path):
    _task(tmp_path / "d", {"train": ["a", "a"], "dev": ["a"], "test": ["a"]})
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "distill.py"), "--data", str(tmp_path / "d"),
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "single class" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
