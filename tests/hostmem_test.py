"""hostmem: after reuse_freed_memory(), big freed blocks are reused instead of faulted in anew."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from hashgnn_jax import hostmem

# Each process mallocs, fills and frees a 96 MiB block several times (as XLA:CPU does with an
# executable's temporaries; NumPy would not do here, it asks for huge pages), on the main thread
# and on a new thread (glibc gives it a secondary arena), and reports page faults per cycle after
# a warm-up. 96 MiB is above glibc's largest mmap threshold (32 MiB) and a secondary arena's heap
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

    max_bytes = int(sys.argv[1])
    applied = hostmem.reuse_freed_memory(max_bytes) if max_bytes else None

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


def _probe(max_block_bytes):
  out = subprocess.run([sys.executable, "-c", _PROBE, str(max_block_bytes)], capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_on_every_thread():
  result = _probe(hostmem.DEFAULT_MAX_BLOCK_BYTES)
  assert result["applied"] is True
  assert result["main"] < 0.05 * _PAGES, result
  assert result["thread"] < 0.05 * _PAGES, result


@pytest.mark.parametrize("max_block_bytes", [0, 2**26])
def test_each_cycle_faults_its_block_in_without_it_or_above_the_bound(max_block_bytes):
  # 0: glibc's defaults, the module's premise; 64 MiB: blocks above the bound keep their mmaps.
  result = _probe(max_block_bytes)
  assert result["main"] > 0.9 * _PAGES, result
  assert result["thread"] > 0.9 * _PAGES, result


def test_rejects_a_bound_mallopt_cannot_take():
  with pytest.raises(ValueError, match="max_block_bytes"):
    hostmem.reuse_freed_memory(2**31)


@pytest.mark.parametrize("platforms, expected", [
  ("cpu", True), ("cuda", False), ("cpu,cuda", False), ("tpu", False)])
def test_cpu_only_follows_jax_platforms(monkeypatch, platforms, expected):
  import jax  # pylint: disable=g-import-not-at-top
  previous = jax.config.jax_platforms
  try:
    jax.config.update("jax_platforms", platforms)
    assert hostmem.jax_runs_on_cpu_only() is expected
  finally:
    jax.config.update("jax_platforms", previous)


def test_cpu_only_is_false_with_an_accelerator_plugin_installed(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(hostmem.importlib.metadata, "entry_points",
                      lambda group: ["jax_cuda12_plugin"] if group == "jax_plugins" else [])
  previous = jax.config.jax_platforms
  try:
    jax.config.update("jax_platforms", None)  # Unset: JAX would take the plugin.
    assert hostmem.jax_runs_on_cpu_only() is False
    jax.config.update("jax_platforms", "cpu")  # Set: it decides.
    assert hostmem.jax_runs_on_cpu_only() is True
  finally:
    jax.config.update("jax_platforms", previous)
