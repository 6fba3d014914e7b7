"""Runs that span several processes: `jax.distributed` start, and what the processes agree on.

One process per host (or per GPU) runs the same command. `initialize` joins them before JAX's
first computation; afterwards `jax.devices()` lists every process's devices, the pmapped train
step reduces over all of them, and each process feeds only its own devices. A plain
single-process run calls nothing here and behaves as before.

When to join (`mode`):
- "off": never.
- "on": always; what is not given is detected by JAX (TPU pod slices, Slurm, Open MPI) or fails
  with JAX's error naming the missing setting.
- "auto" (the default): when a coordinator address is given (flag or JAX_COORDINATOR_ADDRESS),
  or a scheduler started this process as one of several (Slurm's SLURM_STEP_NUM_TASKS or Open
  MPI's OMPI_COMM_WORLD_SIZE above 1). A TPU VM slice sets neither; `launch/tpu_pod.sh` passes
  `--distributed=on`.
"""

import os

import jax
from jax.experimental import multihost_utils
import numpy as np

MODES = ("auto", "on", "off")

# Scheduler variables that count the processes started for one job step.
_PROCESS_COUNT_VARIABLES = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


def _int_from_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name}={value!r}: expected an integer.") from None


def wanted(mode: str, coordinator_address: str | None) -> bool:
  """Whether `initialize` joins a multi-process run under `mode` (see the module docstring)."""
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r} is not one of {MODES}.")
  if mode != "auto":
    return mode == "on"
  if coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  return any((_int_from_env(name) or 1) > 1 for name in _PROCESS_COUNT_VARIABLES)


def initialize(mode: str = "auto", *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout_seconds: int = 100, cpu_only: bool = False) -> bool:
  """Joins the run's processes via `jax.distributed.initialize` if `wanted`; returns whether.

  num_processes and process_id fall back to JAX_NUM_PROCESSES and JAX_PROCESS_ID, then to JAX's
  cluster detection. heartbeat_timeout_seconds bounds how long the others run on after a process
  dies: the coordination service then stops them with an error. cpu_only: JAX runs on host CPUs,
  whose cross-process collectives need gloo (set before any backend starts).
  """
  if not wanted(mode, coordinator_address):
    return False
  if num_processes is None:
    num_processes = _int_from_env("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _int_from_env("JAX_PROCESS_ID")
  if cpu_only:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  return True


def describe() -> str:
  """One line on this process and its devices, for the log."""
  local = jax.local_devices()
  return (f"JAX process {jax.process_index()}/{jax.process_count()} (pid {os.getpid()}): "
          f"{len(local)} local "
          f"{local[0].platform} devices ({', '.join(str(d.id) for d in local)}) of "
          f"{jax.device_count()} in all.")


def is_main() -> bool:
  """Whether this process writes the run's files (logs, metrics, exports, caches)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`; nothing in a single-process run."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def main_first(name: str, fn):
  """fn() on process 0 first, then on the others: a cache fn writes is read by the rest.

  Only one process ever writes: the others start once process 0 has returned (or failed: then
  they fail on their own reading, naming the same file).
  """
  if jax.process_count() == 1:
    return fn()
  result = None
  if is_main():
    try:
      result = fn()
    finally:
      barrier(name)
    return result
  barrier(name)
  return fn()


def local_copy(tree):
  """The tree with every array that spans other processes' devices replaced by this process's
  copy (the arrays must be replicated); arrays already local are kept as they are."""

  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f"An array sharded over processes ({x.sharding}) has no local copy.")
      return x.addressable_data(0)
    return x

  return jax.tree.map(local, tree)


def as_global(tree, sharding: jax.sharding.NamedSharding):
  """The tree's arrays as global arrays of the replicated `sharding`, without copying.

  pmap returns an unreplicated output (out_axes None) as a host-local array: each process holds
  its copies on its own devices, and Orbax cannot save such an array across processes. The same
  per-device buffers, named as shards of one replicated global array, can be. Single-process
  trees are returned as they are.
  """
  if jax.process_count() == 1:
    return tree
  local = set(sharding.addressable_devices)

  def to_global(x):
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
      return x
    by_device = {shard.device: shard.data for shard in x.addressable_shards}
    if not local <= set(by_device):
      # Fewer copies than local devices (an array made outside the step): place the rest.
      by_device = {d: jax.device_put(x.addressable_data(0), d) for d in local}
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [by_device[d] for d in sorted(local, key=lambda d: d.id)])

  return jax.tree.map(to_global, tree)


def gather_rows(rows: np.ndarray) -> list[np.ndarray]:
  """Every process's `rows` [n_i, ...] (same trailing shape and dtype), in process order.

  Counts are exchanged first, so the parts may differ in length.
  """
  if jax.process_count() == 1:
    return [rows]
  counts = multihost_utils.process_allgather(np.int32(len(rows)))  # [P]
  padded = np.zeros((int(counts.max()),) + rows.shape[1:], rows.dtype)
  padded[:len(rows)] = rows
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, max, ...]
  return [gathered[p, :int(n)] for p, n in enumerate(counts)]
