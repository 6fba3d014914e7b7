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
popular rows answers more requests (the exchange's buffers are sized for the worst case anyway).
"""

import dataclasses
import functools

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


def lookup(blocks: jax.Array, ids: jax.Array, valid: jax.Array, axis: str
           ) -> tuple[jax.Array, jax.Array]:
  """Inside the step: the rows `ids` [S] (where valid) of the sharded table, [S, E].

  blocks [L, E] is this device's block. Every device sends each owner the (local) ids it wants
  of that owner's rows, L where none; owners answer with those rows (zero for L) and each
  device sums the n answers, of which one at most is non-zero, so the result is exact. Returns
  (rows [S, E], requests [n, S]: the local ids every device asked of this one, which
  `owned_gradients` reads to route the gradients back).

  Each request list is sized S, the worst case of every row on one owner, so the exchange moves
  n·S ids and rows per device, as the replicated layout's all-gather of gradients does.
  """
  num_devices, rows = jax.lax.axis_size(axis), blocks.shape[0]
  owners = jnp.arange(num_devices, dtype=ids.dtype)[:, None]  # [n, 1]
  local = ids[None, :] - owners * rows  # [n, S]
  mine = valid[None, :] & (local >= 0) & (local < rows)
  asked = jax.lax.all_to_all(jnp.where(mine, local, rows), axis, 0, 0)  # [n, S] asked of me
  answers = blocks.at[asked].get(mode="fill", fill_value=0)  # [n, S, E]
  got = jax.lax.all_to_all(answers, axis, 0, 0)  # [n, S, E]: owner o's answer in row o
  return jnp.sum(got, axis=0), asked


def owned_gradients(asked: jax.Array, grads: jax.Array, rows: int, marks: jax.Array, axis: str
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The global-mean gradient of each of this device's rows that some device touched.

  asked [n, S] from `lookup` (local ids, `rows` = L where not asked), grads [S, E] this device's
  row gradients, marks [M + 1] the `graph_lib.unique_nodes` scratch of any M >= L (the train
  state's) -> (local ids [G], grads [G, E], marks), G = min(n·S, L), padding ids M: what
  `optim.row_adam_update` takes for this device's block, which drops ids past it.

  Every device's gradients go to every owner, which keeps the entries it was asked for. They
  are summed in device order, as `optim.combine_row_grads` sums them in the replicated layout,
  so both layouts update the same rows by the same sums.
  """
  num_devices = asked.shape[0]
  received = jax.lax.all_to_all(jnp.broadcast_to(grads, (num_devices,) + grads.shape),
                                axis, 0, 0).reshape(-1, grads.shape[-1])  # [n·S, E]
  asked = asked.reshape(-1)  # [n·S]
  unique, summed, marks = optim.sum_by_row(asked, asked < rows, received, rows, marks)
  return unique, summed / num_devices, marks
