"""What a section records, and how: figures with their targets, table rows, skipped cases, all
rewritten atomically to the section's JSON file after every change, so a section killed at its
time limit still leaves everything it measured."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

FIGURE_FIELDS = ("name", "value", "unit", "target", "met")
SECTION_FIELDS = ("section", "status", "device", "rehearsal", "budget_s", "seconds", "figures", "rows", "skipped",
                  "error", "notes", "modules")


def judge(value: float | None, at_least: float | None = None, at_most: float | None = None) -> tuple[str | None, bool | None]:
    """(target text, met) for a figure; (None, None) when the figure has no target."""
    if at_least is None and at_most is None:
        return None, None
    if at_least is not None:
        return f">= {at_least:g}", (value is not None and value >= at_least)
    return f"<= {at_most:g}", (value is not None and value <= at_most)


@dataclass
class Section:
    """One section's run: its deadline and what it has recorded so far."""

    name: str
    out: Path
    rehearsal: bool
    budget_s: float
    device: str = "cpu"
    started: float = field(default_factory=time.monotonic)
    figures: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "running"
    error: str | None = None
    imports: object = None  # an ImportRecorder (cpmctl.gpu_check.imports), when installed

    # -- time --
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float:
        # a margin for writing the results and the interpreter's exit
        return self.budget_s - 5.0 - self.elapsed()

    def fits(self, what: str, estimate_s: float) -> bool:
        """Whether `what` (estimated at `estimate_s`) fits the time left; records a skip if not."""
        if estimate_s <= self.time_left():
            return True
        self.skip(what, f"needs ~{estimate_s:.0f} s, {max(0.0, self.time_left()):.0f} s left of the section's budget")
        return False

    # -- recording --
    def figure(self, name: str, value, unit: str = "", *, at_least: float | None = None,
               at_most: float | None = None, note: str | None = None) -> dict:
        target, met = judge(value, at_least, at_most)
        fig = {"name": name, "value": value, "unit": unit, "target": target, "met": met}
        if note:
            fig["note"] = note
        self.figures.append(fig)
        self.save()
        return fig

    def row(self, table: str, **cells) -> None:
        self.rows.append({"table": table, **cells})
        self.save()

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"case": what, "reason": reason})
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.save()

    def as_dict(self, final: bool = False) -> dict:
        return {
            "section": self.name, "status": self.status, "device": self.device, "rehearsal": self.rehearsal,
            "budget_s": self.budget_s, "seconds": round(self.elapsed(), 2), "figures": self.figures, "rows": self.rows,
            "skipped": self.skipped, "error": self.error, "notes": self.notes,
            # who imported what: read off the sources once, at the end (it parses every loaded module)
            "modules": self.imports.as_dict() if (final and self.imports is not None) else {},
        }

    def save(self, final: bool = False) -> None:
        write_json_atomic(self.out, self.as_dict(final))


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
