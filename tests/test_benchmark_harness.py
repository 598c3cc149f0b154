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


def _ki():
    import ki

    return ki


def test_ki_arms_cover_temperatures_and_decays():
    ki = _ki()
    runs = ki.arms([1.0, 2.0], ki.parse_decays("step:0.5, linear:0.25"), 0.5)
    assert list(runs) == ["scratch", "ki-T1", "ki-T2", "ki-T1-step50", "ki-T1-linear25", "aki", "aki+ki"]
    assert runs["scratch"] == ki.Arm(False)
    assert runs["ki-T2"] == ki.Arm(False, 2.0, "linear", 0.5)
    assert runs["ki-T1-step50"] == ki.Arm(False, 1.0, "step", 0.5)
    assert runs["aki+ki"] == ki.Arm(True, 1.0, "linear", 0.5)
    assert ki.comparison_pairs(runs, [1.0, 2.0]) == [("ki-T2", "ki-T1"), ("ki-T1-step50", "ki-T1"),
                                                     ("ki-T1-linear25", "ki-T1"), ("aki+ki", "aki")]
    assert ki.parse_decays("") == []


def test_ki_paired_comparisons_leave_out_unreached_seeds():
    ki = _ki()

    def row(final_loss, step_speedup):
        reached = {"step_speedup": step_speedup, "flop_speedup": step_speedup and step_speedup / 2}
        return {"final_loss": final_loss, "final": reached, "half": reached}

    per_seed = [{"runs": {"ki-T1": row(5.0, 1.5), "ki-T2": row(5.2, 1.2)}},
                {"runs": {"ki-T1": row(5.0, 1.6), "ki-T2": row(5.25, 1.2)}},
                {"runs": {"ki-T1": row(5.0, 1.4), "ki-T2": row(5.3, None)}}]
    lines = {line["comparison"]: line for line in ki.paired_comparisons(per_seed, [("ki-T2", "ki-T1")])}
    loss = lines["ki-T2 minus ki-T1, final val loss (lower is better)"]
    assert loss["estimate"].mean == pytest.approx(0.25) and loss["seeds"] == 3
    assert loss["verdict"] == "ki-T1 better"       # +0.2, +0.25, +0.3: the interval is above zero
    steps = lines["ki-T2 minus ki-T1, step speedup to final"]
    assert steps["estimate"].values == pytest.approx((-0.3, -0.4)) and steps["left_out"] == 1
    assert steps["verdict"] == "no difference resolved"   # two seeds: t(1) = 12.7 makes the interval wide


@pytest.mark.parametrize("decays", ["cosine:0.5", "linear:1.5", "linear"])
def test_ki_refuses_bad_decays_before_training(tmp_path, decays):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ki.py"), "--decays", decays,
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --decays:")
    assert not (tmp_path / "w").exists()


def _ki_report(path: Path, seeds: list[int]) -> Path:
    """A results file of `seeds` whose KI run reaches every loss one evaluation earlier than scratch."""
    ki = _ki()
    scratch = [{"step": 10 * i, "loss": 6.0 - 0.1 * i, "flops": 100.0 * i, "seconds": float(i)} for i in range(1, 11)]
    faster = [{**row, "loss": row["loss"] - 0.1, "flops": row["flops"] * 1.1} for row in scratch]
    report = {"title": "t", "teacher": {"final_val_loss": 5.5}, "eval_every": 10,
              "runs": {"scratch": vars(ki.Arm(False)), "ki-T1": vars(ki.Arm(False, 1.0, "linear", 0.5))},
              "seeds": [{"seed": s, "curves": {"scratch": scratch, "ki-T1": faster},
                         "figures": ki.seed_figures({"scratch": scratch, "ki-T1": faster}, 100)} for s in seeds]}
    return harness.write_results(path, report)


def test_ki_seed_figures_and_combine(tmp_path):
    ki = _ki()
    a, b = _ki_report(tmp_path / "a.json", [0, 1]), _ki_report(tmp_path / "b.json", [2])
    figures = json.loads(a.read_text())["seeds"][0]["figures"]
    assert figures["targets"] == {"final": pytest.approx(5.0), "half": pytest.approx(5.5)}
    # scratch reaches 5.0 at step 100 and 5.5 at step 50; KI one evaluation earlier, at 1.1x the FLOPs per step
    assert figures["runs"]["ki-T1"]["final"]["step_speedup"] == pytest.approx(100 / 90)
    assert figures["runs"]["ki-T1"]["half"]["flop_speedup"] == pytest.approx(500 / 440)
    report, runs = ki.combine_results([a, b], [1.0])
    assert [s["seed"] for s in report["seeds"]] == [0, 1, 2] and runs["ki-T1"] == ki.Arm(False, 1.0, "linear", 0.5)
    summary = ki.summarise([s["figures"] for s in report["seeds"]], list(runs))
    assert summary["ki-T1"]["final_step_speedup"].n == 3


def test_ki_combine_refuses_repeated_seeds(tmp_path):
    a = _ki_report(tmp_path / "a.json", [0, 1])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ki.py"), "--combine", str(a), str(a),
                           "--results", str(tmp_path / "c.json")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --combine: a seed appears twice (0, 0, 1, 1)"
    assert not (tmp_path / "c.json").exists()
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


def _student_run(accuracy: float) -> dict:
    return {"steps": 50, "best_step": 25, "steps_per_epoch": 5, "stopped_early": True, "train_rows": 80,
            "dev_accuracy": 0.8, "seconds": 1.0, "test": {"accuracy": accuracy, "macro_f1": accuracy - 0.05}}


def test_distill_summary_covers_the_methods_every_seed_has():
    """A seed from a --skip-alone run has KD and MixKD only: the summary compares those two over
    every seed held, and leaves the student alone (and its differences) out."""
    import distill

    methods = {"alone": {}, "KD": {}, "MixKD": {}}
    per_seed = {"0": {"alone 10%": _student_run(0.78), "KD 10%": _student_run(0.80), "MixKD 10%": _student_run(0.81)},
                "8": {"KD 10%": _student_run(0.82), "MixKD 10%": _student_run(0.82)},
                "9": {"KD 10%": _student_run(0.79), "MixKD 10%": _student_run(0.805)}}
    summary = distill.summarise(per_seed, methods, [0.1], [])
    assert summary["seeds"] == [0, 8, 9]
    assert sorted(summary["methods"]) == ["KD 10%", "MixKD 10%"]
    assert list(summary["differences"]) == ["MixKD - KD 10%"]
    gap = summary["differences"]["MixKD - KD 10%"]["accuracy_points"]
    assert gap.values == pytest.approx((1.0, 0.0, 1.5)) and gap.n == 3 and gap.mean == pytest.approx(2.5 / 3)
    assert summary["methods"]["KD 10%"]["accuracy"].mean == pytest.approx((0.80 + 0.82 + 0.79) / 3)
    assert [t["verdict"] for t in summary["targets"]] == ["not resolved", "not resolved"]
    full = distill.summarise({"0": per_seed["0"]}, methods, [0.1], [])  # every method held: all three
    assert sorted(full["methods"]) == ["KD 10%", "MixKD 10%", "alone 10%"] and len(full["differences"]) == 3


def test_distill_only_seeds_must_lie_in_the_seed_range(tmp_path):
    _task(tmp_path / "d", {"train": ["a", "b"], "dev": ["a"], "test": ["b"]})
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "distill.py"), "--data", str(tmp_path / "d"),
                           "--work", str(tmp_path / "w"), "--seeds", "4", "--only-seeds", "2,7"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --only-seeds 7 outside the --seeds range 0-3"
    assert not (tmp_path / "w").exists()
