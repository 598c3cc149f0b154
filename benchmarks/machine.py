"""What every benchmark shares (imports nothing heavy): the machine line printed next to its
figures, and a child process run with its wall time and peak memory."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


STATUS_FIELDS = ("VmHWM", "RssAnon", "RssFile")


def run_with_memory(cmd: list[str], *, env: dict[str, str], cwd: Path, stderr=subprocess.STDOUT,
                    every_s: float = 0.02) -> dict:
    """Run `cmd` to its end. Returns its exit code, stdout (bytes), wall seconds, peak RSS in bytes
    from wait4's ru_maxrss (exact, this child alone) and the largest VmHWM / RssAnon / RssFile (bytes)
    seen by reading /proc/PID/status every `every_s` (file-backed pages are memory-mapped files')."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr)
    peaks = dict.fromkeys(STATUS_FIELDS, 0)
    done = threading.Event()

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            except (OSError, ValueError):
                pass
            done.wait(every_s)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    poller.join()
    return {"rc": os.waitstatus_to_exitcode(status), "stdout": stdout, "wall_s": wall,
            "peak_rss": usage.ru_maxrss * 1024, **{f"peak_{k}": v for k, v in peaks.items()}}
