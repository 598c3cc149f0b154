"""Shared fixtures: a slice of the stdlib corpus and a small tokenizer trained on it, built once
per session because the tokenizer and data tests both need them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when cpmctl_kernels is first
# imported. conftest is imported before any test module, so on a machine without an NVIDIA GPU
# (no driver tool, no device node: checked without importing torch) the kernel tests run on CPU
# through Triton's interpreter. An explicit TRITON_INTERPRET=0/1 wins.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def stdlib_text(tmp_path_factory) -> Path:
    """2,500 stdlib docstrings as a one-document-per-line text corpus."""
    from cpmctl.corpus import write_corpus_text

    path = tmp_path_factory.mktemp("corpus") / "stdlib.txt"
    write_corpus_text(path, max_docs=2500)
    return path


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory, stdlib_text):
    """A 1,000-piece unigram SentencePiece tokenizer with 100 sentinels, saved in its own dir."""
    from cpmctl.tokenizer import train_sentencepiece

    return train_sentencepiece(stdlib_text, tmp_path_factory.mktemp("tok") / "sp", 1000)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread (restored afterwards): training loops of tiny
    models are faster so, and far faster when other jobs share a small machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """`slow` tests run with CPMCTL_SLOW=1 (or `-m slow`); `gpu` tests only where CUDA exists."""
    import os

    run_slow = os.environ.get("CPMCTL_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    has_cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set CPMCTL_SLOW=1 or pass -m slow"))
        if "gpu" in item.keywords:
            if has_cuda is None:
                import torch

                has_cuda = torch.cuda.is_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
