"""cpmctl's C++ CPU kernels: the matrix-vector products of decode, where torch's eager kernels
leave most of the memory bandwidth unused.

Each kernel is a C++ source in this folder, compiled on first use for the running machine
(`build.load_ops`, `-march=native`) and registered as torch operators, so a kernel runs eagerly
and inside `torch.compile` graphs alike. Like `cpmctl_kernels` (the Triton kernels), the package
imports torch only, never cpmctl, and raises its own errors: `CpuKernelBuildError` when this
machine cannot build a kernel (no C++ compiler, no ninja), `CpuKernelInputError` for operands a
kernel does not take. Each kernel has a torch reference it is tested against.
"""

from cpmctl_cpu.build import CpuKernelBuildError, CpuKernelInputError, build_problem, load_ops

__all__ = ["CpuKernelBuildError", "CpuKernelInputError", "build_problem", "load_ops"]
