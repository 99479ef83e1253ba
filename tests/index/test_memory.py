import ctypes
import os
import platform
import sys

import pytest

from spacy_m3el.index import memory
from spacy_m3el.index.memory import PeriodicRelease, release_freed_memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="malloc_trim is glibc's")


def resident_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@glibc
def test_freed_blocks_pinned_by_kept_ones_go_back_to_the_os():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.realloc.restype, libc.realloc.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 96 << 10  # under glibc's smallest mmap threshold: on the heap
    blocks = [libc.malloc(size) for _ in range(2500)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    # each block shrunk to a 256-byte head: 2,500 freed tails (240 MB), each pinned by the next block's head,
    # as a build's freed batch tensors are by the index rows it keeps
    heads = [libc.realloc(block, 256) for block in blocks]
    before = resident_mb()
    assert release_freed_memory() is True
    assert before - resident_mb() > 150
    for head in heads:
        libc.free(head)


def test_periodic_release_trims_every_n_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    release = PeriodicRelease(every=3)
    for _ in range(7):
        release.step()
    assert len(calls) == 2
    with pytest.raises(ValueError, match="every >= 1"):
        PeriodicRelease(every=0)


def test_without_malloc_trim_nothing_is_released(monkeypatch):
    monkeypatch.setattr(memory, "_MALLOC_TRIM", None)
    assert release_freed_memory() is False
