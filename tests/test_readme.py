"""The README's walk-through, executed: the demo pipeline (what `make demo` runs), the step list
it prints against the commands the pipeline really ran, and every follow-up command; real-scale
commands of the README are dry-run. So the README cannot drift from what cpmctl does."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """Command lines of a bash block, comments stripped, continuations joined."""
    joined = block.replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def cpmctl(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpmctl.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_make_demo_runs_the_demo_recipe():
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^demo:.*\n\t(.*)$", makefile, flags=re.M).group(1)
    first = commands(blocks(section("Walk-through"), "bash")[0])[0]
    assert target == "$(VENV)/bin/" + first  # the README's first walk-through command is `make demo`'s


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the walk-through's pipeline once, as the README says, in a fresh directory."""
    cwd = tmp_path_factory.mktemp("walk")
    (cwd / "recipes").symlink_to(ROOT / "recipes")
    first = commands(blocks(section("Walk-through"), "bash")[0])[0]
    assert first.startswith("cpmctl run recipes/demo.toml runs/demo")
    done = cpmctl(shlex.split(first)[1:], cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((cwd / "runs" / "demo" / "pipeline.json").read_text())
    return cwd, {row["step"]: row for row in rows}, done.stdout


def test_walk_through_step_list_is_what_the_pipeline_ran(demo):
    _, rows, stdout = demo
    listed = commands(blocks(section("Walk-through"), "bash")[1])
    assert listed == [row["command"] for row in rows.values()]
    # the summary table ends the run, one line per step
    table = stdout[stdout.rindex("┏"):]
    for name in rows:
        assert f"│ {name}" in table


def test_demo_quality_figures(demo):
    _, rows, _ = demo
    result = {name: row["result"] for name, row in rows.items()}
    teacher, ki = result["teacher"]["final_eval_loss"], result["ki-pretrain"]["final_eval_loss"]
    assert teacher < math.log(4000) - 2  # trained: far below a uniform guess over the vocabulary
    assert ki < teacher  # the grown model, pre-trained with the teacher, beats its teacher
    assert result["inherit"]["parameters_out"] > 2 * result["inherit"]["parameters_src"]
    layers = result["moefy"]["layers"].values()
    recall = sum(layer["recall"] for layer in layers) / len(layers)
    assert recall > 1.2 * result["moefy"]["top_k"] / result["moefy"]["experts"]  # the router beats chance
    assert result["prompt-tune"]["trainable_percent"] < 1 and result["prompt-tune"]["test"]["accuracy"] > 2 / 8  # chance 1/8
    assert result["task-teacher"]["dev"]["accuracy"] > 0.6
    assert result["mixkd"]["dev"]["accuracy"] > 0.6 and len(result["mixkd"]["student_layers"]) == 2
    offload = result["infer-offload"]["stats"]["offload"]
    assert offload["slots"] < offload["units"] and offload["weights_peak_bytes"] <= offload["budget_bytes"]


def test_walk_through_follow_up_commands(demo):
    """Every command after the pipeline's step list runs, and says what the README says."""
    cwd, _, _ = demo
    follow_ups = [c for block in blocks(section("Walk-through"), "bash")[2:] for c in commands(block)]
    assert len(follow_ups) >= 4
    outputs = {}
    for line in follow_ups:
        argv = shlex.split(line)
        assert argv[0] == "cpmctl", line
        done = cpmctl(argv[1:], cwd)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        outputs[line] = done.stdout
    offloaded = [json.loads(out)["result"] for line, out in outputs.items() if "--offload" in line and "--json" in line]
    resident = [json.loads(out)["result"] for line, out in outputs.items() if "infer runs/demo/moe" in line and "--offload" not in line
                and "--json" in line and "--prompt" not in line]
    assert offloaded and resident
    # streamed from disk under the budget, the MoE model says exactly what it says resident
    assert [o["text"] for o in offloaded[0]["outputs"]] == [o["text"] for o in resident[0]["outputs"]]


def test_real_scale_commands_dry_run(tmp_path):
    """The README's real-scale recipe commands, each with --dry-run: shapes, memory, no weights."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    lines = [c for block in blocks(section("Recipes at real scale"), "bash") for c in commands(block)]
    assert len(lines) >= 5
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "cpmctl" and argv[1] == "run", line
        done = cpmctl(argv[1:] + ["--dry-run"], tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        assert "memory per device" in done.stdout
    assert not (tmp_path / "runs").exists()


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_result_links_point_at_benchmark_sections():
    headings = re.findall(r"^#+ (.*)$", (ROOT / "BENCHMARKS.md").read_text(), flags=re.M)
    anchors = {github_anchor(h) for h in headings}
    links = re.findall(r"\(BENCHMARKS\.md#([^)]+)\)", README)
    assert len(links) >= 8
    for link in links:
        assert link in anchors, f"README links to BENCHMARKS.md#{link}, which is no heading there"
