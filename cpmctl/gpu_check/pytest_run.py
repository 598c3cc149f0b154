"""Section `tests`: `pytest -m "gpu or kernels"` in this process, with the CUDA code-path tests
(marked `gpu`) first, then the kernel tests.

Each test's outcome is recorded as it finishes, so a section killed at its limit keeps them; and
the session stops on its own once the time left is less than twice the longest test so far (the
tests not run are counted and reported). On CPU (the rehearsal) the `gpu` tests skip and the
kernel tests run under Triton's interpreter.
"""

from __future__ import annotations

from pathlib import Path

from cpmctl.gpu_check.record import Section

TESTS = Path(__file__).resolve().parents[2] / "tests"
MARKERS = "gpu or kernels"
# Lowering the kernels to sm_90 without a GPU (17 s here): on a GPU the tests compile them for real.
DESELECT = ("tests/test_kernels.py::test_kernels_compile_for_h100_quick",)


class Recorder:
    """A pytest plugin: GPU tests first, outcomes counted as they come, a stop before the budget."""

    def __init__(self, section: Section) -> None:
        self.section = section
        self.session = None
        self.selected = 0
        self.outcomes: dict[str, str] = {}
        self.longest = 0.0
        self.stopped = False

    def pytest_sessionstart(self, session) -> None:
        self.session = session

    def pytest_collection_modifyitems(self, config, items) -> None:
        # after the -m selection (it runs as a trylast hook below): CUDA code paths first
        items.sort(key=lambda item: 0 if item.get_closest_marker("gpu") else 1)

    def pytest_collection_finish(self, session) -> None:
        self.selected = len(session.items)

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.outcomes[report.nodeid] = "failed" if report.when == "call" else "error"
            message = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
            self.section.row("failures", test=report.nodeid, phase=report.when, message=message)
        elif report.skipped and report.nodeid not in self.outcomes:
            self.outcomes[report.nodeid] = "skipped"
        elif report.when == "call" and report.passed:
            self.outcomes[report.nodeid] = "passed"
        self.longest = max(self.longest, report.duration)
        if report.when == "teardown":
            self.publish()

    def pytest_runtest_logfinish(self, nodeid, location) -> None:
        if self.session is not None and not self.stopped and self.section.time_left() < max(5.0, 2 * self.longest):
            self.stopped = True
            self.session.shouldstop = "gpu-check: the section's time budget is spent"

    def publish(self) -> None:
        """The count figures as they stand (rewritten after every test: a kill keeps them)."""
        counts = self.counts()
        self.section.figures = [f for f in self.section.figures if not f["name"].startswith("tests ")]
        self.section.figure("tests passed", counts["passed"], "tests")
        self.section.figure("tests failed or errored", counts["failed"] + counts["error"], "tests", at_most=0)
        self.section.figure("tests skipped", counts["skipped"], "tests",
                            note="gpu tests skip without CUDA" if self.section.device == "cpu" else None)
        self.section.figure("tests not run (time budget)", counts["not_run"], "tests", at_most=0)

    def counts(self) -> dict[str, int]:
        counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
        for outcome in self.outcomes.values():
            counts[outcome] += 1
        counts["not_run"] = max(0, self.selected - len(self.outcomes))
        return counts


# run the reordering after pytest's own -m deselection and conftest's skip markers
Recorder.pytest_collection_modifyitems.trylast = True  # type: ignore[attr-defined]


def run(section: Section) -> None:
    import pytest

    recorder = Recorder(section)
    args = [str(TESTS), "-m", MARKERS, "-q", "-p", "no:cacheprovider", "--tb=short", "-rfE"]
    args += [f"--deselect={TESTS.parent / d}" for d in DESELECT]
    code = pytest.main(args, plugins=[recorder])
    recorder.publish()
    section.note(f"`pytest tests -m \"{MARKERS}\"` (less {', '.join(DESELECT)}): exit code {int(code)}; "
                 f"{recorder.selected} tests selected")
    if recorder.selected == 0:
        raise RuntimeError(f"no test matched -m {MARKERS!r}")
