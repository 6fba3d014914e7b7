"""Test-wide setup: four fake CPU devices, set before JAX initialises its backends."""

import gc
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA:CPU maps each compiled executable's code into memory regions of its own. Kept for the whole
# session, the suite's ~1,000 regions per training test reached Linux's default limit of 65,530
# (vm.max_map_count) near its end, and the next compilation crashed with a segmentation fault.
# Past this many regions the compiled code is dropped (clearing after every test instead made
# the suite several times slower: shared functions recompiled for each test).
_MAX_MAPPINGS = 20_000


def _num_mappings() -> int:
  try:
    with open("/proc/self/maps", "rb") as maps:
      return sum(1 for _ in maps)
  except OSError:  # Not Linux: no such limit to keep under.
    return 0


@pytest.fixture(autouse=True)
def _bound_compiled_code():
  yield
  if _num_mappings() > _MAX_MAPPINGS:
    import jax  # pylint: disable=g-import-not-at-top

    jax.clear_caches()
    gc.collect()
