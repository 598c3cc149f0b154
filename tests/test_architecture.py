"""The layers of ARCHITECTURE.md, checked on the source: imports read with ast (imports inside
functions included), so a lazy import counts as much as a top-level one.

A module may import modules of its own layer or of lower layers; a stage never imports another
stage; the import graph has no cycle; the foundation (configs included) imports no torch; the
kernel package imports nothing of cpmctl.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cpmctl"
KERNELS = ROOT / "kernels" / "cpmctl_kernels"
CPU_KERNELS = ROOT / "kernels" / "cpmctl_cpu"

# Lowest first. A module name matches the first pattern that fits (fnmatch, on dotted names).
LAYERS: list[tuple[str, list[str]]] = [
    # Torch-free: errors, files, sizes, the model config and every stage's option dataclasses
    # (the config modules: any module whose own name or package is *config* / *configs*).
    ("foundation", ["cpmctl", "cpmctl.errors", "cpmctl.fsutil", "cpmctl.jsonl", "cpmctl.units", "cpmctl.config",
                    "cpmctl.recipes", "cpmctl.options", "*.configs", "*.configs.*", "*_config", "*_configs", "*.config_*"]),
    ("core", ["cpmctl.devices", "cpmctl.ffn", "cpmctl.moe", "cpmctl.model", "cpmctl.checkpoint", "cpmctl.tokenizer", "cpmctl.tokenizer_base",
              "cpmctl.corpus", "cpmctl.data", "cpmctl.hf", "cpmctl.hf.*", "cpmctl.cpm2", "cpmctl.cpm2.*", "cpmctl.static_cache", "cpmctl.compiled", "cpmctl.generate", "cpmctl.losses", "cpmctl.quant"]),
    ("library", ["cpmctl.tasks", "cpmctl.prompt", "cpmctl.task_model", "cpmctl.distill", "cpmctl.growth",
                 "cpmctl.iterations", "cpmctl.moefication", "cpmctl.moefication.*", "cpmctl.relufication", "cpmctl.offload", "cpmctl.offload.*",
                 "cpmctl.training", "cpmctl.training_state", "cpmctl.teacher_cache", "cpmctl.plan", "cpmctl.report", "cpmctl.quantize", "cpmctl.cpu_int4"]),
    ("stages", ["cpmctl.stages.*"]),
    ("pipeline", ["cpmctl.stages", "cpmctl.commands", "cpmctl.pipeline"]),
    ("cli", ["cpmctl.cli", "cpmctl.__main__", "cpmctl.gpu_check", "cpmctl.gpu_check.*"]),
]

# Edges that break a rule today and are being removed elsewhere; each says by what.
ALLOWED: set[tuple[str, str]] = set()


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str) -> set[str]:
    """Every module name an import statement in the file names (absolute; relative ones resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(internal edges: module -> package modules it imports, external: module -> other top-level names)."""
    files = {module_name(root, p): p for p in root.rglob("*.py")}
    internal, external = {}, {}
    for name, path in files.items():
        internal[name], external[name] = set(), set()
        for target in imported(path, name):
            if target.split(".")[0] != root.name:
                external[name].add(target.split(".")[0])
                continue
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name and target != root.name:
                internal[name].add(target)
    return internal, external


def layer_of(name: str) -> int | None:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return rank
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


INTERNAL, EXTERNAL = graph(PACKAGE)


def _edges() -> dict[str, set[str]]:
    return {a: {b for b in targets if (a, b) not in ALLOWED} for a, targets in INTERNAL.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in INTERNAL if layer_of(name) is None)
    assert not unplaced, f"modules in no layer: {unplaced}; place them in ARCHITECTURE.md and LAYERS here"


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in _edges().items() for b in sorted(targets)
              if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_stage_imports_a_stage():
    def stage(name: str) -> bool:
        return name.startswith("cpmctl.stages.") and layer_of(name) == 3

    crossing = [f"{a} imports {b}" for a, targets in INTERNAL.items() if stage(a) for b in sorted(targets) if stage(b)]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycle():
    assert cycles(_edges()) == []


def test_the_foundation_imports_no_torch():
    heavy = {"torch", "numpy", "triton", "cpmctl_kernels", "accelerate", "transformers"}
    found = [f"{name} imports {sorted(EXTERNAL[name] & heavy)}" for name in INTERNAL
             if layer_of(name) == 0 and EXTERNAL[name] & heavy]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("package", [KERNELS, CPU_KERNELS], ids=lambda path: path.name)
def test_the_kernel_package_stands_alone(package):
    internal, external = graph(package)
    assert internal  # the graph was read
    leaks = [f"{name} imports cpmctl" for name, names in external.items() if "cpmctl" in names]
    assert not leaks, "\n".join(leaks)


# Modules that speak the command line: the CLI, the command table, the option declarations, the
# stages, the pipeline (its recipes name steps' flags), the GPU check's own argparse entry point.
SPEAKS_FLAGS = ["cpmctl.cli", "cpmctl.__main__", "cpmctl.commands", "cpmctl.command_configs", "cpmctl.options",
                "cpmctl.stages", "cpmctl.stages.*", "cpmctl.pipeline", "cpmctl.gpu_check", "cpmctl.gpu_check.*"]
# Library modules that still name a flag; each says why and until when.
FLAG_NAMING_ALLOWED: dict[str, str] = {}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def flags_named(source: str) -> list[tuple[int, str]]:
    """(line, flag) for every `--flag` in the string constants of `source` (f-string parts
    included); docstrings and comments are not string constants that reach a user."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, flag) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            for flag in FLAG.findall(node.value)]


def test_the_library_names_no_flag():
    """Library errors say what is wrong in their own terms and name the setting with
    UserError(option=...); the command layer adds the flag (cpmctl.commands.in_command_terms)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(PACKAGE, path)
        if any(fnmatch.fnmatchcase(name, p) for p in SPEAKS_FLAGS) or name in FLAG_NAMING_ALLOWED:
            continue
        found += [f"{path.relative_to(ROOT)}:{line}: {flag}" for line, flag in flags_named(path.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


def test_the_flag_check_can_fail():
    source = '''"""Docstrings may say --force."""
def f(out, n):
    """So may this one: --kernels."""
    # and comments: --resume
    if n:
        raise ValueError(f"{out} exists; pass --force")
    return "a -- b, x--y, --Upper"
'''
    assert flags_named(source) == [(6, "--force")]


# -- the checks themselves can fail --------------------------------------------------------------------
@pytest.mark.parametrize("files, rule", [
    ({"cpmctl/a.py": "import cpmctl.b\n", "cpmctl/b.py": "def f():\n    import cpmctl.a\n"}, "cycle"),
    ({"cpmctl/stages/x.py": "from cpmctl.stages import y\n", "cpmctl/stages/y.py": ""}, "stage"),
    ({"cpmctl/errors.py": "def f():\n    from cpmctl.model import build_model\n", "cpmctl/model.py": ""}, "upward"),
    ({"cpmctl/errors.py": "import torch\n"}, "torch"),
])
def test_each_check_catches_its_violation(tmp_path, files, rule):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "cpmctl" / "__init__.py").write_text("")
    internal, external = graph(tmp_path / "cpmctl")
    if rule == "cycle":
        assert cycles(internal) == [["cpmctl.a", "cpmctl.b"]]
    elif rule == "stage":
        assert internal["cpmctl.stages.x"] == {"cpmctl.stages.y"}
        assert layer_of("cpmctl.stages.x") == layer_of("cpmctl.stages.y") == 3
    elif rule == "upward":
        assert internal["cpmctl.errors"] == {"cpmctl.model"} and layer_of("cpmctl.model") > layer_of("cpmctl.errors")
    else:
        assert external["cpmctl.errors"] == {"torch"} and layer_of("cpmctl.errors") == 0


def test_config_modules_are_foundation():
    for name in ("cpmctl.configs", "cpmctl.configs.moefy", "cpmctl.stage_configs", "cpmctl.stages.configs",
                 "cpmctl.moefy_config"):
        assert layer_of(name) == 0, name
    assert layer_of("cpmctl.stages.moefy") == 3
