"""Giving the memory that a long build or training run frees back to the
operating system.

A whole-KB build allocates and frees large batch tensors (decoded
pictures, backbone activations) between the small ones it keeps (index
rows). glibc's malloc serves them from its heap, and the kept rows pin the
freed space between them: measured on 17,000 entities with pictures, the
resident size grew by about 235 KB per entity, 4 GB of free but unreturned
memory at the end of the build. ``malloc_trim`` returns those pages. A
fixed, low mmap threshold would too, but it doubled the build's CPU time
(every large tensor mapped and faulted in afresh)."""
import ctypes
import ctypes.util
from typing import Callable, Optional


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` (None on other C libraries: macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the OS; False where the C library
    cannot (the memory is then reused, only not returned)."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class PeriodicRelease:
    """Calls :func:`release_freed_memory` every ``every`` batches of a long
    loop, not at every batch: a trim walks the whole heap, and the pages it
    returns are faulted in again when reused (measured in training, a trim
    every 10 updates cost 34 % more CPU, every 50 no measurable cost)."""

    def __init__(self, every: int = 16) -> None:
        if every < 1:
            raise ValueError(f"PeriodicRelease needs every >= 1, got {every}")
        self.every = every
        self.count = 0

    def step(self) -> None:
        self.count += 1
        if self.count % self.every == 0:
            release_freed_memory()
