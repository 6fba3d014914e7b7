"""Row-wise (lazy) Adam for the ID-embedding table, and the row bookkeeping it needs.

A step touches a few thousand of the table's rows (up to ~4.8M at Alibaba size); dense Adam would
read and write every row's parameters and both moments each step, and a dense all-reduce would
ship the whole table's gradient between devices. Here a step costs O(rows touched):

Semantics (the same as TF's LazyAdam and torch's SparseAdam):
- A row is *touched* in a step when it appears in the sampled computation graph of any device,
  whether or not its gradient is zero.
- A touched row's moments and value update with Adam's rule and its global-mean gradient g:
  m <- b1·m + (1−b1)·g, v <- b2·v + (1−b2)·g², x <- x − lr·m̂ / (√v̂ + eps), with the bias
  corrections m̂ = m / (1−b1^t), v̂ = v / (1−b2^t) using the global step count t.
- An untouched row and its moments stay exactly as they are: no momentum drift, no decay.
So when every row is touched every step, this is dense Adam (`optax.adam`) exactly.
"""

import flax
import jax
import jax.numpy as jnp

from hashgnn_jax import graph as graph_lib


@flax.struct.dataclass
class RowAdamState:
  count: jax.Array  # int32 scalar: updates applied so far (t).
  mu: jax.Array  # [R, D] first moments.
  nu: jax.Array  # [R, D] second moments.


def row_adam_init(table: jax.Array) -> RowAdamState:
  return RowAdamState(count=jnp.zeros((), jnp.int32), mu=jnp.zeros_like(table),
                      nu=jnp.zeros_like(table))


def combine_row_grads(ids: jax.Array, grads: jax.Array, marks: jax.Array,
                      axis_name: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The global-mean gradient of every row touched on any device.

  ids [S] (distinct per device, R for padding), grads [S, D] of this device and the
  `graph_lib.unique_nodes` marks [R + 1] -> (ids [G], grads [G, D], marks), identical on every
  device, padding ids being R. Each
  device's loss is a mean over its equal share of the batch, so the global gradient of a row is
  the sum of its per-device gradients over the device count, as `lax.pmean` gives densely.
  """
  num_devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  if num_devices == 1:
    return ids, grads, marks
  num_rows = marks.shape[0] - 1
  all_ids = jax.lax.all_gather(ids, axis_name).reshape(-1)  # [n·S]
  all_grads = jax.lax.all_gather(grads, axis_name).reshape(-1, grads.shape[-1])  # [n·S, D]
  valid = all_ids < num_rows
  size = min(all_ids.shape[0], num_rows)
  unique, _, inverse, marks = graph_lib.unique_nodes(all_ids, valid, size, marks)
  slots = jnp.where(valid, inverse, size)
  summed = jnp.zeros((size, grads.shape[-1]), grads.dtype).at[slots].add(all_grads, mode="drop")
  return unique, summed / num_devices, marks


def row_adam_update(table: jax.Array, state: RowAdamState, ids: jax.Array, grads: jax.Array, *,
                    learning_rate: float, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8) -> tuple[jax.Array, RowAdamState]:
  """Applies one lazy Adam step to rows `ids` [G] (distinct; `num_rows` = padding) of table [R, D].

  The defaults are optax.adam's.
  """
  count = state.count + 1
  # Padding reads row 0 (its results are dropped below): an in-bounds gather is ~2x faster on
  # CPU than mode="fill"'s checked one.
  valid = ids < table.shape[0]
  read = jnp.where(valid, ids, 0)
  gather = lambda a: a.at[read].get(mode="promise_in_bounds")  # [G, D]
  mu = b1 * gather(state.mu) + (1 - b1) * grads  # [G, D]
  nu = b2 * gather(state.nu) + (1 - b2) * grads * grads
  t = count.astype(grads.dtype)
  mu_hat = mu / (1 - b1**t)
  nu_hat = nu / (1 - b2**t)
  rows = gather(table) - learning_rate * mu_hat / (jnp.sqrt(nu_hat) + eps)
  # Padding ids are out of range, so mode="drop" leaves the table and moments untouched there.
  return table.at[ids].set(rows, mode="drop"), RowAdamState(
      count=count, mu=state.mu.at[ids].set(mu, mode="drop"),
      nu=state.nu.at[ids].set(nu, mode="drop"))
