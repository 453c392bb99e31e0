"""Memory that PyTorch frees on the CPU kept in the process for the next step, instead of handed back to the OS.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (dynamic, from 128 KiB up
to 32 MiB) with fresh pages from ``mmap`` and unmaps it on ``free``, and it trims the top of its heap once enough
there is free. A training step allocates and frees the same megabyte-sized activations again and again, so each one
came back as new pages: a page fault and a zeroed page for every 4 KiB the kernel writes. Measured on SmolLM2-135M
with LoRA (the vs-TRL benchmark's batches, 2-core VM): 30,000 to 55,000 page faults in each forward and backward,
and 1.08x to 1.12x its time (medians of 12 pairs run alternately, two runs) against the same step with the memory
kept, which faults 5 times (docs/BENCHMARKS.md).

:func:`keep_freed_memory` raises the mmap threshold (so blocks come from the heap and go back to it) and turns the
heap's trimming off. The process's peak memory stays what the step needs; what it frees is reused, not returned.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # 1 GiB; 32 MiB, the largest every glibc accepts (its dynamic maximum)
NO_TRIM = 2**31 - 1  # mallopt takes an int: the largest, so the heap's free top is never handed back


def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (Linux), else None (musl, macOS, Windows: left as they are)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def keep_freed_memory() -> int | None:
    """Have glibc's malloc keep freed memory for reuse: blocks up to the returned size (bytes) come from the heap
    rather than fresh ``mmap`` pages, and the heap is never trimmed. None where the C library is not glibc or
    refused both thresholds (nothing changed). Process-wide and for the process's life; forked children inherit it."""
    libc = glibc()
    if libc is None:
        return None
    for threshold in MMAP_THRESHOLDS:
        if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM)
            return threshold
    return None
