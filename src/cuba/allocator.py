"""Keep freed host memory in the process instead of handing it back to the kernel (glibc, CPU runs).

Why: glibc's malloc serves every request above 32 MiB (the most its mmap threshold can be raised to)
with a fresh ``mmap`` and gives it back with ``munmap`` on free. A batch of 1,024 MNIST images through
SimpleCNN's first convolution is a 103 MB activation, so every evaluation batch -- and the large
batches of STRIP, Neural Cleanse, the inversion detectors -- maps new pages, the kernel zeroes them
on first touch, and unmaps them again. Measured on a 2-core AVX2 CPU (BENCHMARKS.md, "Host
allocator"): 15-29% of a detector's CPU seconds were kernel time in those page faults.

:func:`keep_freed_memory` turns ``mmap`` off for malloc (``M_MMAP_MAX`` 0, so large blocks come from
the heap) and raises the trim threshold (``M_TRIM_THRESHOLD``), so a freed block is reused by the
next batch of the same shape. Only where memory comes from changes: the measured runs' results
were bit-identical. The price is resident memory: the heap keeps its peak, and because torch asks
for 64-byte-aligned blocks (glibc then requests a little more than a freed block of the same size
holds) it can grow by a few of the largest blocks before freed ones merge and get reused (measured:
+9 to +27% peak RSS on three detectors). :func:`release_freed_memory` (``malloc_trim``) hands the
free part back; :func:`cuba.engine.make_engine` calls it when a run or a defense starts, so what one
phase kept does not pile up under the next. It covers allocations of the main thread, where cuba
computes (glibc's other threads' arenas still map their largest blocks).

No library does this from inside a running process: jemalloc / tcmalloc need ``LD_PRELOAD`` before
Python starts, and glibc's ``MALLOC_*_`` variables are read only at start-up. ``mallopt`` through
ctypes can change both settings at any time. Set ``CUBA_HOST_ALLOCATOR=system`` to leave malloc
alone (e.g. to compare); under a preloaded allocator, and elsewhere than glibc, it does nothing.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536
"""glibc's own M_MMAP_MAX, put back if the second setting fails."""
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the heap's top kept before glibc trims it: mallopt takes a C int, so at most 2 GiB."""
ENV = "CUBA_HOST_ALLOCATOR"

_state: str | None = None
_libc: ctypes.CDLL | None = None


def keep_freed_memory() -> str:
    """Apply the policy once per process; returns what holds: "kept" (glibc tuned), "system" (the
    user opted out through CUBA_HOST_ALLOCATOR=system), "preloaded" (LD_PRELOAD names another
    malloc: glibc's settings would not reach it) or "unsupported" (not glibc, or mallopt refused)."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def current() -> str:
    """The policy's state without applying it: as :func:`keep_freed_memory` says, or "untouched"
    (no CPU engine was made in this process)."""
    return _state or "untouched"


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel (``malloc_trim(0)``), where the policy holds."""
    if _state == "kept" and _libc is not None:
        _libc.malloc_trim(0)


def _apply() -> str:
    global _libc
    choice = os.environ.get(ENV, "").strip().lower() or "keep"
    if choice == "system":
        return "system"
    if choice != "keep":
        from .config import ConfigError

        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: expected 'keep' (default) or 'system'")
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc / tcmalloc: glibc's malloc is not the one in use
        return "preloaded"
    if not _glibc():
        return "unsupported"
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname on every Linux it runs on
    except OSError:
        return "unsupported"
    # mallopt returns 1 on success, 0 on error
    if libc.mallopt(M_MMAP_MAX, 0) != 1:
        return "unsupported"
    if libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)  # not half a policy
        return "unsupported"
    _libc = libc
    return "kept"


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # not a POSIX confstr name here (macOS, Windows, musl)
        return False
