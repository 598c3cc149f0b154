"""What one expert load costs on this machine: ways to copy 1 MiB pieces of a file that sits in the
page cache into a buffer of our own (what `--offload disk` does per expert on CPU).

    .venv/bin/python benchmarks/offload_copy.py /tmp/offload_bench/moe/model.safetensors
    .venv/bin/python benchmarks/offload_copy.py FILE --piece-kib 1024 --pieces 600 --rounds 3

Ways, each over the same random piece offsets, in alternating order over --rounds rounds:
  pread          os.preadv into a preallocated buffer (no mapping: RSS stays the buffer);
  pread+crc32    the same, then zlib.crc32 over the piece (a checksum on every load);
  mmap-fresh     copy out of a fresh read-only memory map of the file (page faults included), then
                 madvise(MADV_DONTNEED) on the piece so its pages leave this process's RSS again;
  mmap-mapped    copy out of a map whose pages were already touched (the resident model's case).
The file is read once first, so every way reads from the page cache. Prints ms per MiB and GB/s
(median over rounds) and how much file-backed RSS each way leaves mapped (for mmap-mapped: the
pieces it keeps mapped, as a resident model does).
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402


def rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--piece-kib", type=int, default=1024)
    parser.add_argument("--pieces", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np

    size = args.file.stat().st_size
    piece = args.piece_kib * 1024
    if size < 2 * piece:
        raise SystemExit(f"{args.file} is smaller than two pieces")
    page = mmap.PAGESIZE
    rng = np.random.default_rng(args.seed)
    # Page-aligned offsets, so madvise can take the piece's own pages.
    offsets = ((rng.integers(0, (size - piece) // page, args.pieces)) * page).tolist()
    fd = os.open(args.file, os.O_RDONLY)
    buffer = np.empty(piece, dtype=np.uint8)
    view = memoryview(buffer)
    with open(args.file, "rb") as fh:  # warm the page cache
        while fh.read(64 << 20):
            pass

    def pread(crc: bool) -> int:
        before = rss_file_bytes()
        for off in offsets:
            os.preadv(fd, [view], off)
            if crc:
                zlib.crc32(view)
        return rss_file_bytes() - before

    def mmap_fresh() -> int:
        before = rss_file_bytes()
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            src = np.frombuffer(m, dtype=np.uint8)
            for off in offsets:
                np.copyto(buffer, src[off : off + piece])
                m.madvise(mmap.MADV_DONTNEED, off, piece)
            grown = rss_file_bytes() - before  # while the map is still open
            del src
        return grown

    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    mapped_src = np.frombuffer(mapped, dtype=np.uint8)
    for off in offsets:  # touch them once: the resident model's pages stay mapped
        np.copyto(buffer, mapped_src[off : off + piece])

    def mmap_mapped() -> int:
        for off in offsets:
            np.copyto(buffer, mapped_src[off : off + piece])
        return len(offsets) * piece  # the touched pieces stay mapped (counted once, before the rounds)

    ways = {"pread": lambda: pread(False), "pread+crc32": lambda: pread(True), "mmap-fresh": mmap_fresh,
            "mmap-mapped": mmap_mapped}
    times: dict[str, list[float]] = {name: [] for name in ways}
    rss: dict[str, int] = {}
    names = list(ways)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            grown = ways[name]()
            times[name].append(time.perf_counter() - t0)
            rss[name] = max(rss.get(name, 0), grown)
    print(f"# {cpu_model()}, {os.cpu_count()} cores, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.file} "
          f"({size / 1e9:.2f} GB), {args.pieces} random pieces of {args.piece_kib} KiB, {args.rounds} rounds, page cache warm")
    print("| way | ms per MiB | GB/s | file-backed RSS it adds (MiB) |")
    print("|---|---|---|---|")
    mib = piece / 2**20
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t / args.pieces / mib * 1e3:.3f} | {args.pieces * piece / t / 1e9:.2f} | {rss[name] / 2**20:.0f} |")
    del mapped_src
    mapped.close()
    os.close(fd)


if __name__ == "__main__":
    main()
