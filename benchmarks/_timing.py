"""Timing helpers shared by the benchmark scripts (imported as a sibling module when a script runs)."""
from __future__ import annotations

import ctypes


def steady_malloc() -> bool:
    """glibc only: never give freed memory back to the OS (M_TRIM_THRESHOLD) nor mmap big blocks (M_MMAP_THRESHOLD).

    Without it, page faults on freshly mapped activation buffers make the same model's timings
    differ by 1.5-2x between processes. Returns whether the thresholds were set.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
