"""Keeps freed host memory in the process heap, so XLA:CPU calls stop page-faulting.

XLA:CPU mallocs an executable's temporaries (123 MB for the Gowalla-size step at batch 4096) on
every call and frees them afterwards. glibc hands blocks above its mmap threshold (32 MiB at
most), and any block too big for a thread's secondary arena, to fresh `mmap`s and unmaps them
on free, so every call faults in and zeroes its buffers again: 30k page faults per Gowalla/4096
train step, ~20% of the step on the 2-core CPU (BUILD_NOTES, "Reusing freed host memory").
The cost is that the process's RSS no longer shrinks after a peak: freed blocks stay in the heap
for the next call instead of going back to the kernel.
"""

import ctypes
import sys

from absl import logging

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_SETTINGS = (
    # Large blocks come from the heap, not from mmaps of their own.
    (_M_MMAP_MAX, 0),
    # One arena: a secondary arena's heaps are 64 MiB at most, and glibc maps a bigger block
    # with mmap whatever M_MMAP_MAX says; the main arena grows with brk instead.
    (_M_ARENA_MAX, 1),
    # Keep up to 2 GiB of free memory at the top of the heap rather than returning it.
    (_M_TRIM_THRESHOLD, _INT_MAX),
)


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed blocks; True if applied, False where it cannot be.

  Process-wide, so it is for the program that owns the process (`main.py`, the benchmarks), not
  for library imports. It takes effect for later allocations, including those of XLA's threads
  that already exist. A no-op off Linux and with a C library other than glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None)
  # gnu_get_libc_version exists only in glibc; musl's mallopt accepts nothing.
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return False
  applied = all([libc.mallopt(param, value) == 1 for param, value in _SETTINGS])
  if not applied:
    logging.warning("glibc mallopt refused a setting; freed host memory may still be unmapped.")
  return applied
