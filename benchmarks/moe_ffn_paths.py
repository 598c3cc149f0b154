"""The resident CPU MoE path (`cpmctl.moe.moe_ffn_reference`) of this tree against earlier revisions of it.

    .venv/bin/python benchmarks/moe_ffn_paths.py [--revisions ac882d1,73b234f] [--rounds 300]

Each revision's cpmctl/moe.py is taken from git (`git show REV:cpmctl/moe.py`) and loaded as a
module beside this tree's (so only that file differs; it imports the rest of cpmctl from this
tree). On the same weights and routing, every version is called in turn, `--rounds` times, and
the fastest call of each is kept (the machine is shared: the fastest call is the one others did
not slow). Ratios are time / this tree's time. Outputs of this tree and of each revision that
already computed per expert are checked equal bit for bit. Cases: issue 6's layer (d 1024,
32 experts of 128, ReLU, MoEfied weights of 1, 20% = top-6) and a SwiGLU layer with softmax
weights (top-2 of 16 experts of 256), at 1, 8 and 64 tokens, 2 torch threads by default.
ac882d1 is the last revision before experts were made exact per expert (issue 6). At decode sizes
(<= 8 tokens) the C++ kernel `cpmctl_cpu.sparse_ffn.moe_ffn` (what `--kernels auto` runs on a CPU) is
timed beside them (--no-kernel leaves it out); it sums in another order, so it is checked by its
largest difference, not bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

CASES = [
    dict(name="MoEfied ReLU, 20% (top-6 of 32x128), weights 1", d=1024, experts=32, expert_size=128, k=6, gated=False,
         activation="relu", ones=True),
    dict(name="SwiGLU, top-2 of 16x256, softmax weights", d=1024, experts=16, expert_size=256, k=2, gated=True,
         activation="silu", ones=False),
]


def load_revision(rev: str, tmp: Path):
    source = subprocess.run(["git", "show", f"{rev}:cpmctl/moe.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = tmp / f"moe_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"moe_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", default="ac882d1,73b234f")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-kernel", action="store_true", help="leave out the C++ kernel (cpmctl_cpu.sparse_ffn.moe_ffn)")
    args = parser.parse_args()
    import torch

    import cpmctl.moe as current
    from cpmctl.ffn import GATHER_MAX_TOKENS

    kernel = None
    if not args.no_kernel:
        sys.path.insert(0, str(ROOT / "kernels"))
        from cpmctl_cpu import sparse_ffn

        sparse_ffn.ops()
        kernel = sparse_ffn.moe_ffn

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        versions = {rev: load_revision(rev, Path(tmp)) for rev in args.revisions.split(",")}
    versions["this tree"] = current
    rows = []
    for case in CASES:
        g = torch.Generator().manual_seed(0)
        e, de, d, k = case["experts"], case["expert_size"], case["d"], case["k"]
        w_in = torch.randn(e, de, d, generator=g) * d**-0.5
        w_gate = torch.randn(e, de, d, generator=g) * d**-0.5 if case["gated"] else None
        w_out = torch.randn(e, de, d, generator=g) * de**-0.5
        for n in map(int, args.batches.split(",")):
            x = torch.randn(n, d, generator=g)
            ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
            weights = torch.ones(n, k) if case["ones"] else torch.softmax(torch.randn(n, k, generator=g), -1)
            call = (x, ids, weights, w_in, w_gate, w_out, None, None, None, case["activation"])
            paths = {rev: m.moe_ffn_reference for rev, m in versions.items()}
            if kernel is not None and n <= GATHER_MAX_TOKENS:  # the decode sizes cpmctl runs it at
                paths["C++ kernel"] = kernel
            best = dict.fromkeys(paths, float("inf"))
            with torch.inference_mode():
                want = current.moe_ffn_reference(*call)
                exact = {rev: bool(torch.equal(f(*call), want)) for rev, f in paths.items()}
                max_diff = {rev: float((f(*call) - want).abs().max()) for rev, f in paths.items()}
                for _ in range(10):
                    for f in paths.values():
                        f(*call)
                for _ in range(args.rounds):
                    for rev, f in paths.items():
                        start = time.perf_counter()
                        f(*call)
                        best[rev] = min(best[rev], time.perf_counter() - start)
            row = dict(case=case["name"], tokens=n, us={rev: round(t * 1e6, 1) for rev, t in best.items()},
                       vs_this_tree={rev: round(t / best["this tree"], 3) for rev, t in best.items()}, bit_equal=exact,
                       max_abs_diff=max_diff)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    record = dict(benchmark="moe_ffn_paths", date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=cpu_model(),
                  cores=os.cpu_count(), threads=args.threads, torch=torch.__version__, load_before=load_before,
                  load_after=os.getloadavg(), command="python benchmarks/moe_ffn_paths.py " + " ".join(sys.argv[1:]), rows=rows)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
