"""Run the sections, each in its own subprocess under a hard time limit, and write results.json
and results.md.

    python -m cpmctl.gpu_check [--out gpu-check] [--sections kernels,model] [--budget tests=60]
    python -m cpmctl.gpu_check --rehearse      # CPU, tiny shapes, Triton's interpreter: the CI run

A section that fails is reported with its error and the others still run; a section that
overruns is killed at its limit (its whole process group: pytest's children too) and keeps what it
wrote before. The runner itself imports no torch. Exit status: 0 when every section finished
(figures that miss their targets are results, not failures), 1 when a section failed or timed out
or, in a rehearsal, when a result field is missing or a section imported a package the GPU image
may lack, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cpmctl.gpu_check import ALLOWED_DISTRIBUTIONS, GPU_BUDGETS, REHEARSAL_BUDGETS, SECTIONS
from cpmctl.gpu_check.imports import foreign_modules
from cpmctl.gpu_check.record import FIGURE_FIELDS, SECTION_FIELDS, write_json_atomic
from cpmctl.gpu_check.report import render_markdown

REPO = Path(__file__).resolve().parents[2]
VERSIONED = ("torch", "triton", "transformers", "accelerate", "peft", "safetensors", "numpy")
RESULT_FIELDS = ("date", "command", "rehearsal", "device", "versions", "budget_s", "total_s", "sections",
                 "import_check", "summary")


def _parse_budgets(items: list[str], base: dict[str, float]) -> dict[str, float]:
    budgets = dict(base)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in budgets:
            raise SystemExit(f"error: --budget takes SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)}, got {item!r}")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise SystemExit(f"error: --budget {item!r}: {value!r} is not a number of seconds") from None
        if budgets[name] <= 5:
            raise SystemExit(f"error: --budget {item!r}: a section needs more than 5 seconds")
    return budgets


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _has_nvidia_gpu() -> bool:
    # without importing torch (the runner stays light): the driver's tool or its device node
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def _section_env(rehearsal: bool) -> dict[str, str]:
    paths = [str(REPO), str(REPO / "kernels")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), PYTHONUNBUFFERED="1",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if rehearsal:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a machine with a GPU
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_section(name: str, budget: float, out: Path, rehearsal: bool) -> dict:
    """One section in a subprocess (its own process group), killed at `budget` seconds."""
    result_path = out / "sections" / f"{name}.json"
    log_path = out / "logs" / f"{name}.log"
    result_path.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cpmctl.gpu_check.section", name, "--result", str(result_path), "--budget-s", str(budget)]
    if rehearsal:
        cmd.append("--rehearse")
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_section_env(rehearsal), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    seconds = time.monotonic() - started
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"section": name, "status": "error", "figures": [], "rows": [], "skipped": [], "notes": [],
                  "error": None, "modules": {}, "device": None, "rehearsal": rehearsal, "budget_s": budget}
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    if timed_out:
        result["status"] = "timeout"
        result["error"] = f"killed at its {budget:.0f} s limit; what it recorded before is kept (log: {log_path})"
    elif code != 0 or result.get("status") != "ok":
        result["status"] = "error"
        result["error"] = result.get("error") or f"exit {code}; log tail:\n{tail}"
    result["seconds"] = round(seconds, 2)
    result["exit_code"] = code
    result["log"] = str(log_path)
    return result


def check_fields(results: dict) -> list[str]:
    """Every field results.json promises, in every section and figure; returns the problems."""
    problems = [f"results: missing {key}" for key in RESULT_FIELDS if key not in results]
    for name, section in results.get("sections", {}).items():
        problems += [f"{name}: missing {key}" for key in SECTION_FIELDS if key != "modules" and key not in section]
        for i, fig in enumerate(section.get("figures", [])):
            problems += [f"{name}: figure {i} ({fig.get('name')}): missing {key}" for key in FIGURE_FIELDS if key not in fig]
    return problems


def _summary(sections: dict[str, dict]) -> dict:
    figures = [f for s in sections.values() for f in s.get("figures", [])]
    return {
        "sections_ok": sorted(n for n, s in sections.items() if s.get("status") == "ok"),
        "sections_failed": sorted(n for n, s in sections.items() if s.get("status") != "ok"),
        "figures": len(figures),
        "targets_met": sum(f.get("met") is True for f in figures),
        "targets_missed": sum(f.get("met") is False for f in figures),
        "skipped_cases": sum(len(s.get("skipped", [])) for s in sections.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmctl.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="results folder (default: gpu-check)")
    parser.add_argument("--rehearse", action="store_true",
                        help="CPU rehearsal at tiny shapes (Triton's interpreter), checking fields and imports")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                        help="override one section's time limit (repeatable)")
    args = parser.parse_args(argv)

    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        print(f"error: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    if not args.rehearse and not _has_nvidia_gpu():
        print("error: no NVIDIA GPU here; `make gpu-check REHEARSE=1` (python -m cpmctl.gpu_check --rehearse) runs "
              "the CPU rehearsal", file=sys.stderr)
        return 2
    budgets = _parse_budgets(args.budget, REHEARSAL_BUDGETS if args.rehearse else GPU_BUDGETS)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sections: dict[str, dict] = {}
    for name in names:
        print(f"gpu-check: {name} (limit {budgets[name]:.0f} s) ...", flush=True)
        sections[name] = run_section(name, budgets[name], out, args.rehearse)
        s = sections[name]
        print(f"gpu-check: {name}: {s['status']} in {s['seconds']:.1f} s, {len(s.get('figures', []))} figures, "
              f"{len(s.get('skipped', []))} skipped", flush=True)

    foreign = foreign_modules({n: s.get("modules", {}) for n, s in sections.items()}, ALLOWED_DISTRIBUTIONS)
    env_section = sections.get("environment", {})
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m cpmctl.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "rehearsal": args.rehearse,
        "device": env_section.get("device") or ("cpu" if args.rehearse else "unknown (environment section did not report)"),
        "versions": _versions(),
        "budget_s": sum(budgets[n] for n in names),
        "total_s": round(time.monotonic() - started, 2),
        "sections": {n: {k: v for k, v in s.items() if k != "modules"} for n, s in sections.items()},
        "import_check": {"allowed_distributions": list(ALLOWED_DISTRIBUTIONS), "foreign": foreign, "ok": not foreign},
        "summary": _summary(sections),
    }
    problems = check_fields(results)
    if args.rehearse:
        problems += [f"{n}: no figures" for n, s in sections.items() if not s.get("figures")]
    results["field_check"] = {"ok": not problems, "problems": problems}
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(render_markdown(results))
    print(f"gpu-check: wrote {out / 'results.json'} and {out / 'results.md'} ({results['total_s']:.0f} s)")
    failed = results["summary"]["sections_failed"]
    for name in failed:
        print(f"gpu-check: section {name} {sections[name]['status']}: {str(sections[name].get('error'))[:300]}",
              file=sys.stderr)
    for problem in problems:
        print(f"gpu-check: field check: {problem}", file=sys.stderr)
    if foreign:
        print(f"gpu-check: imports the GPU image may lack: {foreign}", file=sys.stderr)
    if failed or (args.rehearse and (problems or foreign)):
        return 1
    return 0
