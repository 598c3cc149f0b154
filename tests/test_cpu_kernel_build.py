"""The C++ CPU kernels' builder: what it says when the machine cannot build, and when it rebuilds."""

from __future__ import annotations

import pytest

from cpmctl_cpu import CpuKernelBuildError, build_problem, load_ops
from cpmctl_cpu.build import build_name


def test_a_missing_compiler_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setattr("cpmctl_cpu.build._loaded", {})
    assert "no-such-compiler-xyz" in build_problem()
    with pytest.raises(CpuKernelBuildError) as raised:
        load_ops("gemv")
    assert "no-such-compiler-xyz" in str(raised.value) and "\n" not in str(raised.value)


def test_the_build_name_follows_the_source_flags_and_torch():
    name = build_name("gemv", "int main() {}")
    assert name.startswith("cpmctl_gemv_")
    assert build_name("gemv", "int main() {}") == name  # stable across runs: the cache is found
    assert build_name("gemv", "int main() { return 0; }") != name  # an edited source rebuilds
