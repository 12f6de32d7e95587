"""Giving memory freed by a finished layer back to the system.

A decoder layer's tensors are tens of MB each, which falls under glibc's adaptive threshold
for memory maps, so they are carved from the heap; a heap fragmented by them is not returned
by itself, and resident memory grows by about one layer's weights per layer visited. Every
layer-by-layer loop calls :func:`return_freed_memory` after a layer.
"""

from __future__ import annotations

from collections.abc import Callable


def _trimmer() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0) and None


_TRIM: Callable[[], None] | None = None


def return_freed_memory() -> None:
    """Return the heap memory freed so far to the system (``malloc_trim``; nothing elsewhere)."""
    global _TRIM
    if _TRIM is None:
        _TRIM = _trimmer()
    _TRIM()


__all__ = ["return_freed_memory"]
