"""Keep freed memory in the process for the next tensor instead of handing it back to the OS.

A merge allocates and frees the same few buffer sizes thousands of times: each tensor read, its
fp32 tiles, its result. glibc's malloc serves a large request with a fresh mapping and unmaps it
on free (above a threshold that starts at 128 KiB and adapts only up to 32 MiB), and trims the
heap's free top, so the next buffer is new pages again: one fault and one zeroing per 4 KiB.
Measured on the 1B benchmark (2 cores, a VM where a fault is dear): task arithmetic to tmpfs
took 22 s, 17 of them in the kernel, and 12 s (6 in the kernel) once freed memory is kept; to
disk 34 s, then 24 s; a DARE tile's sign election 12 ms, then 2. With both thresholds at
128 MiB, malloc reuses freed buffers, and resident memory stays near its peak between tensors.
Larger buffers (a whole embedding matrix) still get their own mapping, returned on free: with
1 GiB the heap kept those too, and a whole-tensor merge's peak grew from fragmentation (TIES
at 1B: 1482 MB resident against 1310 MB at 128 MiB).

Set once per process (glibc only; elsewhere nothing changes). MERGESMITH_KEEP_FREED_MEMORY=0
leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os

KEEP_BELOW = 128 << 20  # bytes: larger buffers still get their own mapping, freed on free
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Have malloc keep freed buffers up to KEEP_BELOW for reuse; True when it does."""
    global _kept
    if _kept is None:
        _kept = False
        if os.environ.get("MERGESMITH_KEEP_FREED_MEMORY", "1") != "0":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc (macOS, Windows)
                return _kept
            _kept = bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)
                         and mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
    return _kept


GLIBC_THRESHOLD = 128 << 10  # glibc's initial mmap and trim thresholds


def return_freed_memory() -> None:
    """Undo keep_freed_memory, for a command that allocates a few large buffers of varied sizes
    rather than the same few over and over: extract-lora (a task vector, its Gram matrix and
    float64 blocks per module), where malloc's per-thread arenas kept them in pieces and the
    peak of identical runs (1B, one layer) varied from 350 to 570 MB; handed back, 289 MB each
    time, as fast."""
    global _kept
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, GLIBC_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, GLIBC_THRESHOLD)
    _kept = False
