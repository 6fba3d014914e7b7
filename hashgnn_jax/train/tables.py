"""The ID-embedding table and its Adam moments sharded by rows over the training devices.

`train.embedding_layout="sharded"`: device i of n owns the block of rows [i·L, (i + 1)·L), L =
ceil(R / n), of the table and of both moments, so each device holds 1/n of them rather than all
three whole. Inside the step (`train.step`) a device asks each owner for the rows its sample
reads and sends it the gradients of those rows back (`lookup`, `owned_gradients`); the owner
applies the row-wise Adam update to its block alone. Dense parameters stay replicated.

Arrays of this layout, `[n, L, E]`, are what the pmapped step maps over its first axis. Saved
checkpoints hold them as `[n·L, E]` arrays sharded by rows (`to_saved`), written by each owner
without gathering the table anywhere; rows past R are padding (never read, never updated), so a
checkpoint restores onto any device count, or into the replicated `[R, E]` layout, by padding or
cutting rows (`train.checkpointing`).

Blocks rather than rows dealt round-robin: a block is one contiguous slice of the saved array, so
saving and restoring are plain sharded reads and writes. The price is balance: an owner of many
popular rows answers more requests, and the fitted request lists (`fit_capacity`) are as long as
the busiest owner's.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hashgnn_jax.train import optim


@dataclasses.dataclass(frozen=True)
class RowSharding:
  """Which device owns which rows of a table of `num_rows` rows, over `devices` (all processes')."""
  devices: tuple[jax.Device, ...]
  num_rows: int
  axis: str = "batch"

  @property
  def num_shards(self) -> int:
    return len(self.devices)

  @property
  def rows_per_device(self) -> int:
    return -(-self.num_rows // self.num_shards)

  @functools.cached_property
  def sharding(self) -> jax.sharding.NamedSharding:
    """Split on the first axis over `devices`: the layout of [n, L, E] and of saved [n·L, E]."""
    mesh = jax.sharding.Mesh(np.array(self.devices), (self.axis,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(self.axis))

  def saved_shape(self, width: int) -> tuple[int, int]:
    return (self.num_shards * self.rows_per_device, width)

  def split(self, table) -> jax.Array:
    """A whole table [R, E] (host or device array) -> [n, L, E], each block on its owner.

    Each process copies only its own devices' blocks; padding rows are zero.
    """
    rows, width = self.rows_per_device, table.shape[1]

    def block(index):
      owner = index[0].start or 0
      part = np.asarray(table[owner * rows:(owner + 1) * rows])
      out = np.zeros((1, rows, width), part.dtype)
      out[0, :part.shape[0]] = part
      return out

    return jax.make_array_from_callback((self.num_shards, rows, width), self.sharding, block)

  def zeros(self, width: int, dtype) -> jax.Array:
    """[n, L, E] zeros made on each owner: moments never exist whole."""
    shape = (self.num_shards, self.rows_per_device, width)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.sharding)()

  def to_saved(self, blocks: jax.Array) -> jax.Array:
    """[n, L, E] -> [n·L, E] split by rows, from the same device buffers (no gather)."""
    width = blocks.shape[2]
    shards = [s.data.reshape(s.data.shape[1:]) for s in blocks.addressable_shards]
    return jax.make_array_from_single_device_arrays(self.saved_shape(width), self.sharding,
                                                    shards)

  def from_saved(self, saved: jax.Array) -> jax.Array:
    """[n·L, E] split by rows -> [n, L, E], the step's layout."""
    rows, width = self.rows_per_device, saved.shape[1]
    shards = [s.data.reshape(1, rows, width) for s in saved.addressable_shards]
    return jax.make_array_from_single_device_arrays((self.num_shards, rows, width),
                                                    self.sharding, shards)

  def gather(self, blocks: jax.Array) -> np.ndarray:
    """[n, L, E] -> the whole table [R, E] on the host (every process gets all of it)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      blocks = multihost_utils.process_allgather(blocks, tiled=True)
    whole = np.asarray(blocks)
    return whole.reshape(-1, whole.shape[-1])[:self.num_rows]


class Requests(NamedTuple):
  """Where `lookup` put each wanted row, which `owned_gradients` reads to route its gradient.

  asked [n, C]: the local ids every device asked of this one (L where a slot is unused);
  owner, slot [S]: each wanted id's owner and its place in the list sent there (C: not sent).
  """
  asked: jax.Array
  owner: jax.Array
  slot: jax.Array


def lookup(blocks: jax.Array, ids: jax.Array, valid: jax.Array, axis: str, capacity: int
           ) -> tuple[jax.Array, Requests, jax.Array]:
  """Inside the step: the rows `ids` [S] (where valid) of the sharded table, [S, E].

  blocks [L, E] is this device's block. Every device sends each owner a list of `capacity` = C
  slots holding the local ids it wants of that owner's rows, in their order in `ids`, L in
  unused slots; owners answer with those rows (zero for L). Returns (rows [S, E], Requests,
  fits: whether no list overflowed on this device; where one did, the ids past C read zero
  rows and the step must not use them).

  C = S cannot overflow (every row on one owner); the step's fitted C (`fit_capacity`) is
  near S / n, so each device moves n·C ids and rows rather than n·S.
  """
  num_devices, rows = jax.lax.axis_size(axis), blocks.shape[0]
  owner = jnp.where(valid, ids // rows, num_devices)  # [S]; n: none
  # Each id's place among the ids for its owner: a running count over a one-hot [n, S].
  to_owner = owner[None, :] == jnp.arange(num_devices, dtype=owner.dtype)[:, None]
  place = jnp.cumsum(to_owner, axis=1, dtype=jnp.int32) - 1  # [n, S]
  slot = jnp.take_along_axis(place, jnp.minimum(owner, num_devices - 1)[None, :], 0)[0]  # [S]
  slot = jnp.where(valid & (slot < capacity), slot, capacity)
  fits = jnp.all(jnp.sum(to_owner, axis=1) <= capacity)
  sent = jnp.full((num_devices, capacity), rows, ids.dtype).at[owner, slot].set(
      ids - owner * rows, mode="drop")  # [n, C]
  asked = jax.lax.all_to_all(sent, axis, 0, 0)  # [n, C]: row o is what device o asked of me
  answers = blocks.at[asked].get(mode="fill", fill_value=0)  # [n, C, E]
  got = jax.lax.all_to_all(answers, axis, 0, 0)  # [n, C, E]: owner o's answers in row o
  return got.at[owner, slot].get(mode="fill", fill_value=0), Requests(asked, owner, slot), fits


def owned_gradients(requests: Requests, grads: jax.Array, rows: int, marks: jax.Array,
                    axis: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The global-mean gradient of each of this device's rows that some device touched.

  requests from `lookup` (its `asked` holding `rows` = L where nothing is asked), grads [S, E]
  this device's row gradients, marks [M + 1] the `graph_lib.unique_nodes` scratch of any M >= L
  (the train state's) -> (local ids [G], grads [G, E], marks), G = min(n·C, L), padding ids M:
  what `optim.row_adam_update` takes for this device's block, which drops ids past it.

  Each gradient goes back to its row's owner in the slot its id went in. An owner's lists keep
  every device's ids in their order in that device's sample and arrive in device order, so the
  sums run in the order `optim.combine_row_grads` sums the replicated layout's gradients, and
  both layouts update the same rows by the same sums.
  """
  num_devices, capacity = requests.asked.shape
  sent = jnp.zeros((num_devices, capacity, grads.shape[-1]), grads.dtype).at[
      requests.owner, requests.slot].set(grads, mode="drop")  # [n, C, E]
  received = jax.lax.all_to_all(sent, axis, 0, 0).reshape(-1, grads.shape[-1])  # [n·C, E]
  asked = requests.asked.reshape(-1)  # [n·C]
  unique, summed, marks = optim.sum_by_row(asked, asked < rows, received, rows, marks)
  return unique, summed / num_devices, marks


# Fitted request lists: the most ids one sampled batch asked of one owner, times this, rounded
# up to a multiple of _CAPACITY_ALIGN. An owner's count is a sum over many rows, so it varies
# little between batches; a batch that overflows costs one more step with full lists
# (`train.step.make_stepper`).
_CAPACITY_MARGIN = 1.1
_CAPACITY_ALIGN = 128


def fit_capacity(samples, rows_per_device: int, num_devices: int) -> int:
  """A `lookup` capacity that holds the requests of `samples` (`sampler.fit_samples`) to any
  one owner, with a margin; at most L = rows_per_device (an owner has no more rows to give, and
  a device's sample asks for each row once)."""
  most = 0
  for blocks in samples:
    ids = np.asarray(blocks.nodes)[np.asarray(blocks.valid)]
    most = max(most, int(np.bincount(ids // rows_per_device, minlength=num_devices).max()))
  capacity = int(np.ceil(most * _CAPACITY_MARGIN / _CAPACITY_ALIGN)) * _CAPACITY_ALIGN
  return min(capacity, rows_per_device)
