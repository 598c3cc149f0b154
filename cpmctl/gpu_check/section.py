"""One section in this process: `python -m cpmctl.gpu_check.section NAME --result PATH --budget-s S`.

The runner starts this in a subprocess per section. An exception becomes the section's error
(with its traceback in the log), never the end of the whole check.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

from cpmctl.gpu_check import SECTIONS
from cpmctl.gpu_check.imports import install
from cpmctl.gpu_check.record import Section

MODULES = {
    "environment": "cpmctl.gpu_check.environment",
    "tests": "cpmctl.gpu_check.pytest_run",
    "kernels": "cpmctl.gpu_check.kernel_bench",
    "model": "cpmctl.gpu_check.model_bench",
    "decode": "cpmctl.gpu_check.decode_bench",
    "offload": "cpmctl.gpu_check.offload_bench",
    "hybrid": "cpmctl.gpu_check.hybrid_bench",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=SECTIONS)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--rehearse", action="store_true")
    args = parser.parse_args(argv)

    section = Section(args.name, args.result, args.rehearse, args.budget_s, imports=install())
    section.save()
    try:
        import torch

        if args.rehearse:
            section.device = "cpu"
        elif not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (run with --rehearse for the CPU rehearsal)")
        else:
            section.device = "cuda"
        importlib.import_module(MODULES[args.name]).run(section)
        section.status = "ok"
    except BaseException as exc:  # noqa: BLE001 - reported, and the runner goes on with the next section
        traceback.print_exc()
        section.status = "error"
        section.error = f"{type(exc).__name__}: {exc}"
    section.save(final=True)
    return 0 if section.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
