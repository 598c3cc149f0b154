"""Peak memory of `cpmctl convert cpm2` on a BMInf checkpoint larger than one layer by far.

Writes a synthetic CPM-2.1-layout `checkpoint.pt` (int8 weights with fp16 row scales, fp16
embedding and head, fp32 norms; CPM-2's depth and vocabulary at a smaller width) once into
--work, then converts it to float32 twice, each in a child process:

- cpmctl: `convert_cpm2` (streaming: one tensor made at a time, spilled to scratch files);
- whole-model: the same reader and mapping, but every tensor made first and the state dict
  handed to the checkpoint writer at once (what a converter that loads the model does).

The parent samples each child's /proc/<pid>/status every 2 ms: peak RssAnon (memory that must
fit in RAM) and the child's own VmHWM (which also counts clean, memory-mapped file pages the
kernel can drop at will). Both outputs must have the same content hash.

    python benchmarks/convert_cpm2.py --work /tmp/cpm2_bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
import torch
from cpmctl.cpm2.convert import convert_cpm2, plan_conversion
from cpmctl.checkpoint import save_checkpoint
start = time.perf_counter()
if mode == "cpmctl":
    convert_cpm2(src, out)
else:
    plan, opened = plan_conversion(src)
    state = {{p.name: p.make() for p in plan.tensors}}
    save_checkpoint(out, plan.config, state, stage="whole-model")
seconds = time.perf_counter() - start
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"seconds": seconds, "vmhwm_kib": int(hwm)}}))
"""


def status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_child(mode: str, src: Path, out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    code = CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.Popen([sys.executable, "-c", code, mode, str(src), str(out)], stdout=subprocess.PIPE,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    peak_anon = 0
    while proc.poll() is None:
        anon = status_kib(proc.pid, "RssAnon")
        if anon is not None:
            peak_anon = max(peak_anon, anon)
        time.sleep(0.002)
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_anon_kib"] = peak_anon
    result["content_hash"] = json.loads((out / "cpmctl.json").read_text())["content_hash"]
    return result


def main() -> None:
    import torch

    import cpm2_writers as W
    from machine import cpu_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--d-ff", type=int, default=2560)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / "cpm2" / "checkpoint.pt"
    if not src.is_file():
        src.parent.mkdir(exist_ok=True)
        tree = W.shape_tree(26240, args.d, args.heads, 64, args.d_ff, args.layers, args.layers)
        W.write_bminf(src, tree, fill=W.random_fill(0))
    from cpmctl.cpm2.convert import plan_conversion

    plan, _ = plan_conversion(src)
    summary = plan.summary()
    print(f"machine: {cpu_model()}, torch {torch.__version__}")
    print(f"source {src} ({src.stat().st_size / 2**30:.2f} GiB); {summary['parameters']:,} parameters, "
          f"float32 output {summary['output_bytes'] / 2**30:.2f} GiB; dry-run peak estimate "
          f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB")
    results = {"parameters": summary["parameters"], "output_bytes": summary["output_bytes"],
               "source_bytes": src.stat().st_size, "estimate_bytes": summary["peak_memory_bytes"]}
    for mode in ("cpmctl", "whole-model"):
        r = run_child(mode, src, args.work / f"out-{mode}")
        results[mode] = r
        print(f"{mode:12s} {r['seconds']:7.1f} s   peak RssAnon {r['peak_rss_anon_kib'] / 2**20:6.2f} GiB   "
              f"VmHWM {r['vmhwm_kib'] / 2**20:6.2f} GiB   {r['content_hash'][:19]}")
    assert results["cpmctl"]["content_hash"] == results["whole-model"]["content_hash"], "outputs differ"
    ratio = results["whole-model"]["peak_rss_anon_kib"] / results["cpmctl"]["peak_rss_anon_kib"]
    print(f"peak anonymous memory: whole-model / cpmctl = {ratio:.1f}x; cpmctl peak / float32 model = "
          f"{results['cpmctl']['peak_rss_anon_kib'] * 1024 / summary['output_bytes']:.2f}")
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
