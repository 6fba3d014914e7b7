"""Keeps freed host memory in the process heap, so XLA:CPU calls stop page-faulting.

XLA:CPU mallocs an executable's temporaries (123 MB for the Gowalla-size step at batch 4096) on
every call and frees them afterwards. glibc hands blocks above its mmap threshold (32 MiB at
most), and any block too big for a thread's secondary arena, to fresh `mmap`s and unmaps them
on free, so every call faults in and zeroes its buffers again: 30k page faults per Gowalla/4096
train step, ~20% of the step on the 2-core CPU (docs/experiments.md, "Reusing freed host memory").
The cost is that up to ~`max_block_bytes` of freed memory stays in the process (its RSS) for the
next call instead of going back to the kernel. It was measured only for XLA:CPU, so `main.py`
applies it only where `jax_runs_on_cpu_only()`; on a GPU or TPU host the step's temporaries live
in device memory and the setting would only change the host process's malloc unmeasured.
"""

import ctypes
import importlib.metadata
import importlib.util
import pkgutil
import sys

from absl import logging

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# Blocks up to this size come from the heap and are kept there when freed; bigger ones still get
# mmaps of their own, returned on free. At Alibaba size and batch 4096 the step's temporaries are
# 2.5 GB: keeping those too (no mmaps, no trimming) took the step's peak RSS from 7.1 to 13.8 GiB,
# with no step time gain measured against the noise there.
DEFAULT_MAX_BLOCK_BYTES = 2**30


def jax_runs_on_cpu_only() -> bool:
  """Whether JAX will pick the CPU backend alone, decided without starting any backend.

  Starting one would start its threads, and a thread keeps the malloc arena it first used, so
  `reuse_freed_memory` must come before. `jax_platforms` (flag or JAX_PLATFORMS) decides when
  set; otherwise JAX takes any installed accelerator plugin (CUDA, ROCm, TPU).
  """
  import jax  # pylint: disable=g-import-not-at-top

  platforms = jax.config.jax_platforms
  if platforms:
    return all(name.strip() == "cpu" for name in platforms.split(","))
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  if importlib.util.find_spec("libtpu") is not None:
    return False
  namespace = importlib.util.find_spec("jax_plugins")
  return namespace is None or not any(pkgutil.iter_modules(namespace.submodule_search_locations))


def reuse_freed_memory(max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> bool:
  """Sets glibc's malloc to keep freed blocks up to `max_block_bytes` for reuse.

  Returns True if applied, False where it cannot be: off Linux, or with a C library other than
  glibc. Process-wide, so it is for the program that owns the process (`main.py`, the
  benchmarks), not for library imports; call it before JAX's first computation, since a thread
  keeps the malloc arena it first used.
  """
  if not 0 < max_block_bytes < 2**31:
    raise ValueError(f"max_block_bytes: expected 1 to 2**31 - 1 (a C int), got {max_block_bytes}")
  if not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None)
  # gnu_get_libc_version exists only in glibc; musl's mallopt accepts nothing.
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return False
  settings = (
      # Blocks below the threshold come from the heap instead of mmaps of their own.
      (_M_MMAP_THRESHOLD, max_block_bytes),
      # Free memory at the top of the heap is returned to the kernel only beyond this much.
      (_M_TRIM_THRESHOLD, max_block_bytes),
      # One arena: a secondary arena's heaps hold 64 MiB at most, and glibc maps a bigger block
      # with mmap whatever the threshold says; the main arena grows with brk instead.
      (_M_ARENA_MAX, 1),
  )
  applied = all([libc.mallopt(param, value) == 1 for param, value in settings])
  if not applied:
    logging.warning("glibc's mallopt refused a setting; freed host memory may still be unmapped.")
  return applied
