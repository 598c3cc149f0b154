"""Compile a kernel source of this folder once per machine and source text, and load its operators.

torch's JIT extension builder does the work (ninja, the running torch's headers and libraries);
the build lands in torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions), under a name that carries a hash of the source, the flags and the
torch version, so an edited source or another torch never loads a stale library. A second process
(or a second run) loads the cached library in milliseconds.

Flags: `-O3 -march=native`, because the build runs on the machine that runs the kernel (AVX-512,
VNNI or AMX where the CPU has them); `-fopenmp` at compile time only, so that `at::parallel_for`
runs on the OpenMP runtime torch itself loaded (and `torch.set_num_threads` applies), not on a
second copy of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17")

_loaded: dict[str, object] = {}
_lock = threading.Lock()


class CpuKernelBuildError(RuntimeError):
    """This machine cannot build a C++ kernel (what is missing, in one line)."""


class CpuKernelInputError(ValueError):
    """Operands a C++ kernel does not take (shape, dtype, device, layout), in one line."""


def build_problem() -> str | None:
    """Why a kernel cannot be built here, or None when it can (a compiler and ninja are found)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH; the CPU kernels are compiled on first use"
    from torch.utils import cpp_extension  # only when a kernel is wanted: it imports setuptools (+0.3 s)

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja); the CPU kernels are compiled with it"
    return None


def build_name(stem: str, source: str) -> str:
    """The extension's name: the source stem plus a hash of everything the library depends on."""
    digest = hashlib.sha256("\0".join((source, " ".join(CFLAGS), torch.__version__)).encode()).hexdigest()
    return f"cpmctl_{stem}_{digest[:16]}"


def load_ops(stem: str) -> object:
    """Build (once) and load `<stem>.cpp` of this folder; returns `torch.ops.<namespace>`, the
    namespace the source registers its operators in (`TORCH_LIBRARY(cpmctl_<stem>, m)`).
    Raises CpuKernelBuildError when the machine cannot build it."""
    with _lock:
        if stem in _loaded:
            return _loaded[stem]
        problem = build_problem()
        if problem is not None:
            raise CpuKernelBuildError(problem)
        from torch.utils import cpp_extension  # see build_problem

        path = SOURCE_DIR / f"{stem}.cpp"
        source = path.read_text()
        try:
            cpp_extension.load(name=build_name(stem, source), sources=[str(path)], extra_cflags=list(CFLAGS),
                               is_python_module=False, verbose=False)
        except (RuntimeError, OSError) as error:  # a compiler error: its last line says what
            last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise CpuKernelBuildError(f"building the CPU kernel {stem}.cpp failed: {last}") from error
        ops = getattr(torch.ops, f"cpmctl_{stem}")
        _loaded[stem] = ops
        return ops


__all__ = ["CpuKernelBuildError", "CpuKernelInputError", "build_problem", "load_ops"]
