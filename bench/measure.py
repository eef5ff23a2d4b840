"""Run one command and measure it: wall time, CPU time, memory of its process tree.

``measure(cmd)`` starts ``cmd``, then polls it every ``interval`` seconds:

* memory: every poll reads ``/proc/<pid>/status`` of the process and of all its
  descendants and sums ``VmRSS`` (resident: anonymous + file-backed, e.g. mmap'd
  safetensors) and ``RssAnon`` (anonymous only: heap, tensors; what actually
  needs RAM) over the tree; the peaks are the max of these sums over the polls.
  ``VmHWM`` (kernel-tracked per-process RSS high-water mark, not subject to
  sampling) is recorded as the max over processes.  The list of descendants
  comes from psutil and is refreshed every ``tree_refresh`` seconds (walking
  /proc for children costs ~2 ms, reading one status file ~0.04 ms).
* CPU: user + sys from ``os.wait4`` on the child, i.e. the child plus every
  descendant it waited for (the same numbers as RUSAGE_CHILDREN deltas, but
  exact for this one child).  ``ru_maxrss`` of that call is kept as a
  cross-check of VmHWM.
* wall: ``time.perf_counter`` from just before spawn to reaping.
* noise: system-wide busy CPU time during the run (``psutil.cpu_times``) minus
  the child's own CPU time = ``other_cpu_s``, CPU used by anything else
  (other users' jobs, kernel writeback, this sampler: ~0.01 s per second); and
  ``steal_s``, time the hypervisor gave our vCPUs to someone else.  Large
  values mean the timing of that run is not trustworthy.

stdout/stderr go to temporary files (never pipes, which could fill and block
the child); the last lines of stderr are kept for failure reports.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

import psutil

MB = 1024 * 1024


@dataclass
class Measurement:
    cmd: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_bytes: int          # max over polls of sum(VmRSS) over the tree
    peak_anon_bytes: int         # max over polls of sum(RssAnon) over the tree
    max_hwm_bytes: int           # max over processes of VmHWM
    ru_maxrss_bytes: int         # from wait4 (largest single process)
    n_samples: int
    max_procs: int               # largest number of processes seen at once
    other_cpu_s: float = 0.0     # busy CPU time of the whole machine minus ours
    steal_s: float = 0.0
    stderr_tail: str = ""

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpu_s"] = self.cpu_s
        return d


_FIELDS = {b"VmRSS:": "rss", b"RssAnon:": "anon", b"VmHWM:": "hwm"}


def read_status(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / VmHWM of one process in bytes ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                key = line.split(None, 1)[0] if line else b""
                if key in _FIELDS:
                    out[_FIELDS[key]] = int(line.split()[1]) * 1024  # kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _busy(t) -> float:
    return t.user + t.nice + t.system + t.irq + t.softirq


def _tail(path: str, n_lines: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        lines = f.read().decode(errors="replace").splitlines()
    return "\n".join(lines[-n_lines:])


def measure(cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
            interval: float = 0.02, tree_refresh: float = 0.2,
            tail_lines: int = 30) -> Measurement:
    """Run ``cmd`` to completion and return its Measurement (never raises on
    a non-zero exit; the caller decides what a failure means)."""
    peak_rss = peak_anon = max_hwm = n_samples = max_procs = 0
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile(suffix=".stderr") as err:
        cpu0 = psutil.cpu_times()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        tree: list[int] = []
        next_refresh = 0.0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - t0
                cpu1 = psutil.cpu_times()
                break
            now = time.perf_counter()
            if now >= next_refresh:
                tree = [proc.pid] + _descendants(proc.pid)
                next_refresh = now + tree_refresh
            rss = anon = 0
            alive = 0
            for p in tree:
                st = read_status(p)
                if st:
                    alive += 1
                rss += st.get("rss", 0)
                anon += st.get("anon", 0)
                max_hwm = max(max_hwm, st.get("hwm", 0))
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            max_procs = max(max_procs, alive)
            n_samples += 1
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
        err.flush()
        tail = _tail(err.name, tail_lines)
    return Measurement(
        cmd=[str(c) for c in cmd], returncode=proc.returncode, wall_s=wall,
        user_s=ru.ru_utime, sys_s=ru.ru_stime,
        peak_rss_bytes=peak_rss, peak_anon_bytes=peak_anon, max_hwm_bytes=max_hwm,
        ru_maxrss_bytes=ru.ru_maxrss * 1024, n_samples=n_samples, max_procs=max_procs,
        other_cpu_s=max(0.0, _busy(cpu1) - _busy(cpu0) - ru.ru_utime - ru.ru_stime),
        steal_s=cpu1.steal - cpu0.steal, stderr_tail=tail,
    )


if __name__ == "__main__":  # quick manual check: python bench/measure.py CMD...
    import sys

    m = measure(sys.argv[1:])
    print(f"rc={m.returncode} wall={m.wall_s:.2f}s cpu={m.cpu_s:.2f}s "
          f"rss={m.peak_rss_bytes / MB:.0f}MB anon={m.peak_anon_bytes / MB:.0f}MB "
          f"hwm={m.max_hwm_bytes / MB:.0f}MB maxrss={m.ru_maxrss_bytes / MB:.0f}MB "
          f"samples={m.n_samples} procs={m.max_procs} other_cpu={m.other_cpu_s:.2f}s "
          f"steal={m.steal_s:.2f}s")
