"""Keep freed host memory in the process instead of handing it back to the kernel (glibc only).

Why: glibc's malloc serves every request above 32 MiB (the most its mmap threshold can be raised to)
with a fresh ``mmap`` and gives it back with ``munmap`` on free. A batch of 1,024 MNIST images through
SimpleCNN's first convolution is a 103 MB activation, so every evaluation batch -- and the large
batches of STRIP, Neural Cleanse, the inversion detectors -- maps new pages, the kernel zeroes them
on first touch, and unmaps them again. Measured on a 2-core AVX2 CPU (BENCHMARKS.md, "Host
allocator"): a third of a detector's CPU time was kernel time in those page faults.

:func:`keep_freed_memory` turns ``mmap`` off for malloc (``M_MMAP_MAX`` 0, so large blocks come from
the heap) and raises the trim threshold (``M_TRIM_THRESHOLD``), so a freed block is reused by the
next batch of the same shape. Results are bit-identical (only where memory comes from changes); the
price is a higher resident size, since the heap keeps its peak (measured +27% on STRIP).

No library does this from inside a running process: jemalloc / tcmalloc need ``LD_PRELOAD`` before
Python starts, and glibc's ``MALLOC_*_`` variables are read only at start-up. ``mallopt`` through
ctypes can change both settings at any time. Set ``CUBA_HOST_ALLOCATOR=system`` to leave malloc
alone (e.g. to compare, or under another allocator); elsewhere than glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the heap's top kept before glibc trims it: mallopt takes a C int, so at most 2 GiB."""
ENV = "CUBA_HOST_ALLOCATOR"

_state: str | None = None


def keep_freed_memory() -> str:
    """Apply the policy once per process; returns what holds: "kept" (glibc tuned), "system" (the
    user opted out through CUBA_HOST_ALLOCATOR=system), or "unsupported" (not glibc, or mallopt refused)."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> str:
    choice = os.environ.get(ENV, "keep").strip().lower()
    if choice == "system":
        return "system"
    if choice != "keep":
        from .config import ConfigError

        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: expected 'keep' (default) or 'system'")
    if not _glibc():
        return "unsupported"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return "unsupported"
    # mallopt returns 1 on success, 0 on error
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "kept" if ok else "unsupported"


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # not a POSIX confstr name here (macOS, Windows, musl)
        return False
