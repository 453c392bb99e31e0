"""A write that runs out of space, said in one line; output folders checked before the expensive work.

A full disk reaches Python in three shapes: an ``OSError`` with errno ENOSPC or EDQUOT (``open``, ``json.dump``), a
safetensors error whose text says "No space left on device (os error 28)", and torch.save's C++ stream errors
("basic_ios::clear: iostream error", "[enforce fail at inline_container.cc] unexpected pos ...") that carry no errno
at all. The last is recognised by the space left on the file system at the moment it failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
NEARLY_FULL = 1 << 20  # bytes: less than this left after a failed write is a full disk, whatever the error said


class DiskFullError(RuntimeError):
    """A write ran out of space; the message names the place, the bytes free and needed, and what is left on disk."""


def tree_bytes(path: str) -> int:
    """Bytes in the files under ``path`` (a file: its size; nothing there: 0)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(folder, name))
    return total


def free_bytes(path: str) -> int:
    """Free bytes on the file system that holds ``path`` (or would: its nearest existing folder)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of these tensors; a ZeRO-3 partitioned parameter counts whole (``ds_numel``)."""
    return sum(getattr(t, "ds_numel", t.numel()) * t.element_size() for t in tensors)


def size(n: int) -> str:
    """``415958 bytes (406.2 KiB)``"""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n} bytes ({n / scale:.1f} {unit})"
    return f"{n} bytes"


def out_of_space(error: BaseException, free: int, remaining: int) -> bool:
    """Whether ``error`` was a full disk: ENOSPC / EDQUOT (or their wording) anywhere in its chain; or, for an I/O
    error without an errno (torch's C++ writer, safetensors), less space ``free`` than the write still needed
    (``remaining``) or under a MiB."""
    seen, chain = set(), error
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in FULL_ERRNOS:
            return True
        if any(words in str(chain) for words in FULL_WORDS):
            return True
        chain = chain.__cause__ or chain.__context__
    io_error = isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError"
    return io_error and free < max(remaining, NEARLY_FULL)


@contextlib.contextmanager
def reporting_full_disk(target: str, partial: str, *, needed: Callable[[], tuple[int, str]],
                        then: Callable[[], str]) -> Iterator[None]:
    """Around a write of ``target`` through ``partial`` (a ``.tmp`` file or folder renamed into place at the end): if
    it runs out of space, ``partial`` is removed and :class:`DiskFullError` raised in one line — the place, the bytes
    free now, ``needed()`` (bytes, and what that figure is), and ``then()``: what is left on disk and what to do.
    Any other error goes on as it was."""
    try:
        yield
    except Exception as error:
        written, free = tree_bytes(partial), free_bytes(partial)
        try:
            total, basis = needed()
        except Exception:  # an estimate that fails must not hide the error
            total, basis = 0, ""
        if not out_of_space(error, free, total - written):
            raise
        if os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)
        elif os.path.exists(partial):
            os.remove(partial)
        free = max(free_bytes(target), free + written)  # a file the failed writer still holds open is freed later
        need = f"about {size(total)} needed ({basis})" if total else "the space needed is not known"
        raise DiskFullError(
            f"no space left on {target}: {size(free)} free, {need}; the partial {partial} was removed; {then()}"
        ) from error


def unwritable(folder: str) -> str | None:
    """Why ``folder`` cannot be written (it is made if missing, and a file made and removed in it), or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        parent = os.path.abspath(folder)
        while parent != os.path.dirname(parent):
            if os.path.exists(parent) and not os.path.isdir(parent):
                return f"{parent} is a file"
            parent = os.path.dirname(parent)
        return error.strerror or str(error)
    return None
