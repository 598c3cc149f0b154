"""The scripts in benchmarks/ start: each answers --help, and none of their file names hides a
package that the libraries they use import.

Each script puts benchmarks/ first on sys.path (to share machine.py and friends), so a script
named like an installed or optionally probed package shadows it: benchmarks/kernels.py once
broke every benchmark that built a transformers model (transformers imports the PyPI package
`kernels`: "cannot import name 'CUDAProperties' from 'kernels'")."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py"))
# helper modules imported by the scripts, not scripts themselves
HELPERS = {"machine", "harness"}


def _env() -> dict[str, str]:
    paths = [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), TRITON_INTERPRET="1")


def test_every_benchmark_script_answers_help():
    """All scripts at once (each one's imports take seconds): exit 0 and a usage line."""
    scripts = [p for p in SCRIPTS if p.stem not in HELPERS]
    assert len(scripts) >= 10
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=REPO, env=_env(), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in scripts}
    failures = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage:" not in out:
            failures.append(f"{name}: exit {proc.returncode}\n{err[-1500:]}")
    assert not failures, "\n".join(failures)


def test_no_script_name_is_an_installed_module():
    taken = [p.name for p in SCRIPTS if importlib.util.find_spec(p.stem) is not None
             and not str(importlib.util.find_spec(p.stem).origin or "").startswith(str(BENCHMARKS))]
    assert not taken, f"benchmark scripts named like installed modules: {taken}"


def test_transformers_builds_a_model_with_benchmarks_first_on_the_path():
    """What the scripts do: benchmarks/ first on sys.path, then transformers (whose model classes
    probe optional packages such as `kernels`), accelerate and peft."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import transformers, accelerate, peft\n"
        "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2)\n"
        "transformers.LlamaForCausalLM(cfg)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
