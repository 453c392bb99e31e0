"""Memory that PyTorch frees on the CPU kept in the process for the next step, instead of handed back to the OS.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (dynamic, from 128 KiB up
to 32 MiB) with fresh pages from ``mmap`` and unmaps it on ``free``, and it trims the top of its heap once enough
there is free. A training step allocates and frees the same megabyte-sized activations again and again, so each one
came back as new pages: a page fault and a zeroed page for every 4 KiB the kernel writes. Measured on SmolLM2-135M
with LoRA (the vs-TRL benchmark's batches, 2-core VM): 31,000 to 55,000 page faults in each forward and backward;
with glibc's defaults the forward and backward took 1.08x to 1.12x the time it takes with the memory kept, which
faults a few times (two processes taking turns: ``benchmarks/host_memory.py``, docs/BENCHMARKS.md).

:func:`keep_freed_memory` raises the mmap threshold (so blocks come from the heap and go back to it) and turns the
heap's trimming off. It is process-wide and lasts for the process's life: the resident memory stays at the process's
high-water mark, which the next step reuses instead of faulting in again.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# 1 GiB; 32 MiB, the largest glibc before 2.35 accepts (its dynamic maximum; there blocks over 32 MiB, such as the
# LM head's logits, are still mapped afresh)
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
NO_TRIM = 2**31 - 1  # mallopt takes an int: the largest, so the heap's free top is kept unless over 2 GiB of it


def _address(function: ctypes._CFuncPtr) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def malloc_in_use() -> int:
    """The address of the ``malloc`` the process's calls resolve to (a preloaded allocator's, where one is)."""
    return _address(ctypes.CDLL(None).malloc)


def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (Linux) and its ``malloc`` is the one in use, else None: musl,
    macOS, Windows, or another allocator preloaded (jemalloc, tcmalloc), whose own settings apply instead."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL("libc.so.6")
    if malloc_in_use() != _address(libc.malloc):
        return None
    return libc


def keep_freed_memory() -> int | None:
    """Have glibc's malloc keep freed memory for reuse: blocks up to the returned size (bytes) come from the heap
    rather than fresh ``mmap`` pages, and the heap is not trimmed. None where :func:`glibc` finds no glibc malloc in
    use, or where glibc refused both thresholds (nothing changed). Process-wide and for the process's life (a
    notebook's kernel keeps it after ``train()``); forked children inherit it."""
    libc = glibc()
    if libc is None:
        return None
    for threshold in MMAP_THRESHOLDS:
        if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM)
            return threshold
    return None


def describe_threshold(threshold: int) -> str:
    """``threshold`` bytes as the log line says it: 1 GiB, 32 MiB."""
    return f"{threshold >> 30} GiB" if threshold >= 1 << 30 else f"{threshold >> 20} MiB"
