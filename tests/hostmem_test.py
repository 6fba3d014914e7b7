"""hostmem: after reuse_freed_memory(), big freed blocks are reused instead of faulted in anew."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

# Each process mallocs, fills and frees a 96 MiB block several times (as XLA:CPU does with an
# executable's temporaries; NumPy would not do here, it asks for huge pages), on the main thread and on
# a new thread (glibc gives it a secondary arena), and reports page faults per cycle after a
# warm-up. 96 MiB is above glibc's largest mmap threshold (32 MiB) and a secondary arena's heap
# (64 MiB), the two ways a block ends up in an mmap of its own.
_PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys, threading
    from hashgnn_jax import hostmem

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    SIZE = 3 * 2**25

    def cycle():
      block = libc.malloc(SIZE)
      ctypes.memset(block, 1, SIZE)
      libc.free(block)

    applied = hostmem.reuse_freed_memory() if sys.argv[1] == "reuse" else None

    def faults_per_cycle(out):
      for _ in range(2):
        cycle()
      start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(4):
        cycle()
      out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 4)

    faults = []
    faults_per_cycle(faults)
    thread = threading.Thread(target=faults_per_cycle, args=(faults,))
    thread.start()
    thread.join()
    print(json.dumps({"applied": applied, "main": faults[0], "thread": faults[1]}))
""")
_PAGES = 3 * 2**25 // 4096

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt settings are glibc's")


def _probe(mode):
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_on_every_thread():
  result = _probe("reuse")
  assert result["applied"] is True
  assert result["main"] < 0.05 * _PAGES, result
  assert result["thread"] < 0.05 * _PAGES, result


def test_without_it_each_cycle_faults_its_block_in():
  # The premise of the module: glibc's defaults unmap such blocks on free.
  result = _probe("default")
  assert result["main"] > 0.9 * _PAGES, result
  assert result["thread"] > 0.9 * _PAGES, result
