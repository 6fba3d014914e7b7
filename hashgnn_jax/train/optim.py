"""Row-wise (lazy) Adam for the ID-embedding table, and the row bookkeeping it needs.

A step touches a few thousand of the table's rows (up to ~4.8M at Alibaba size); dense Adam would
read and write every row's parameters and both moments each step, and a dense all-reduce would
ship the whole table's gradient between devices. Here a step costs O(rows touched), except where
a step may touch a large share of the table, where one sequential pass is cheaper than random row
access (`row_adam_update`); either way the update is the same:

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
import optax

from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.train import schedules


# From this share of the table's rows touched (at most) per step, one sequential pass over the whole
# table beats random row access (`row_adam_update`). Measured on a 2-core CPU, benchmark config:
# at a share of 1 (Gowalla size, batch 256 or 4096) streaming was 16-23% faster, at 0.40 (Alibaba
# size, batch 4096) 5% faster, and at 0.025 (Alibaba, batch 256) 8x slower. Re-measured after the
# slot index: streaming still level or faster at shares 1 (Gowalla and MovieLens/4096) and 0.40.
STREAMING_SHARE = 0.25


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
  unique, summed, marks = sum_by_row(all_ids, all_ids < num_rows, all_grads, num_rows, marks)
  return unique, summed / num_devices, marks


def sum_by_row(ids: jax.Array, valid: jax.Array, grads: jax.Array, num_rows: int,
               marks: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ids [m] (valid ones below num_rows), grads [m, D] -> (distinct ids [G] in first-occurrence
  order, padded with marks' N; the sum of each one's gradients [G, D]; marks), G = min(m,
  num_rows). Entries add in their order in `ids`, so callers that list the same entries in the
  same order get the same sums bit for bit."""
  size = min(ids.shape[0], num_rows)
  unique, _, inverse, marks = graph_lib.unique_nodes(ids, valid, size, marks)
  slots = jnp.where(valid, inverse, size)
  summed = jnp.zeros((size, grads.shape[-1]), grads.dtype).at[slots].add(grads, mode="drop")
  return unique, summed, marks


def _in_id_order(ids: jax.Array, grads: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """ids [G] (distinct below num_rows, padding num_rows) and grads [G, D], ids ascending.

  Why: rows read and written in id order cost less than in the sampler's order, as the hardware
  prefetches along the table. Same-process A/B, benchmark configuration, 2-core CPU, Alibaba
  size: batch 256 55.2 -> 45.3 ms a step, batch 4096 524 -> 446 ms. A sort of 41k ids would
  cost ~7 ms on XLA:CPU; instead each id's rank comes from a bitmap of the ids: the set bits
  below it, counted per 32-bit word (a prefix sum over num_rows / 32 words, the one part of the
  cost that grows with the table: ~150k words at Alibaba size) and within its word by popcount.
  Padding takes keys past every row, num_rows + its index, so it ranks last and stays distinct.
  """
  size = ids.shape[0]
  keys = jnp.where(ids < num_rows, ids, num_rows + jnp.arange(size, dtype=ids.dtype))
  word, bit = keys >> 5, jnp.left_shift(jnp.uint32(1), (keys & 31).astype(jnp.uint32))
  # Distinct keys set distinct bits, so adding the bits of one word is or-ing them.
  words = jnp.zeros(((num_rows + size) // 32 + 1,), jnp.uint32).at[word].add(
      bit, mode="promise_in_bounds")
  counts = jax.lax.population_count(words).astype(jnp.int32)
  rank = (jnp.cumsum(counts) - counts)[word] + jax.lax.population_count(
      words[word] & (bit - 1)).astype(jnp.int32)  # [G], a permutation of 0..G-1

  def place(x):
    return jnp.zeros_like(x).at[rank].set(x, mode="promise_in_bounds", unique_indices=True)

  return place(ids), place(grads)


def row_adam_update(table: jax.Array, state: RowAdamState, ids: jax.Array, grads: jax.Array, *,
                    learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, weight_decay: float = 0.0,
                    streaming: bool | None = None) -> tuple[jax.Array, RowAdamState]:
  """Applies one lazy Adam step to rows `ids` [G] (distinct; `num_rows` = padding) of table [R, D].

  The defaults are optax.adam's; a schedule is called with the count of earlier updates, as
  optax.adam calls it, so both follow one lr(t) in step. weight_decay > 0 is optax.adamw's
  decoupled decay (lr · weight_decay · row added to the step), lazily: only the touched rows
  decay, so a row's shrinkage follows how often it is trained, not the step count. Two
  implementations of the same update:
  - gathered: read the G rows of the table and both moments, update, write them back, in id order
    (`_in_id_order`); O(G) (and O(R / 32) cheap work), but each access is a random row (~3-6 ns
    per element on CPU, against ~0.3 when sequential);
  - streaming: number the touched rows' slots in a dense [R] index, then one sequential pass over
    all R rows that updates the touched ones (reading their gradients through the index) and
    keeps the rest; O(R) cheap work plus one scatter of G ints.
  `streaming=None` takes the streaming one when G >= R * STREAMING_SHARE (G is static: the
  largest number of rows a step can touch).
  """
  if callable(learning_rate):
    learning_rate = learning_rate(state.count)
  count = state.count + 1
  t = count.astype(grads.dtype)

  def adam(rows, mu, nu, grads):
    mu = b1 * mu + (1 - b1) * grads
    nu = b2 * nu + (1 - b2) * grads * grads
    mu_hat = mu / (1 - b1**t)
    nu_hat = nu / (1 - b2**t)
    step = mu_hat / (jnp.sqrt(nu_hat) + eps)
    if weight_decay:
      step = step + weight_decay * rows
    return rows - learning_rate * step, mu, nu

  if streaming is None:
    streaming = ids.shape[0] >= table.shape[0] * STREAMING_SHARE
  if streaming:
    # Each row's slot in `grads`, G where untouched; padding ids are out of range, so
    # mode="drop" leaves them out. An [R] index instead of an [R, D] scatter of the gradients:
    # steps 11-30% faster (2-core CPU, benchmark config, MovieLens, Gowalla and Alibaba size, the
    # same results bit for bit) and no table-sized gradient buffer.
    num_slots = ids.shape[0]
    slot_of = jnp.full(table.shape[:1], num_slots, jnp.int32).at[ids].set(
        jnp.arange(num_slots, dtype=jnp.int32), mode="drop")  # [R]
    touched = (slot_of < num_slots)[:, None]  # [R, 1]
    # Untouched rows read some slot's gradient; the select below discards what they compute.
    row_grads = grads.at[jnp.minimum(slot_of, num_slots - 1)].get(mode="promise_in_bounds")
    new = adam(table, state.mu, state.nu, row_grads)  # [R, D] each
    table, mu, nu = (jnp.where(touched, a, b) for a, b in zip(new, (table, state.mu, state.nu)))
    return table, RowAdamState(count=count, mu=mu, nu=nu)
  ids, grads = _in_id_order(ids, grads, table.shape[0])
  # Padding reads row 0 (its results are dropped below): an in-bounds gather is ~2x faster on
  # CPU than mode="fill"'s checked one.
  valid = ids < table.shape[0]
  read = jnp.where(valid, ids, 0)
  gather = lambda a: a.at[read].get(mode="promise_in_bounds")  # [G, D]
  rows, mu, nu = adam(gather(table), gather(state.mu), gather(state.nu), grads)
  # Padding ids are out of range, so mode="drop" leaves the table and moments untouched there.
  return table.at[ids].set(rows, mode="drop"), RowAdamState(
      count=count, mu=state.mu.at[ids].set(mu, mode="drop"),
      nu=state.nu.at[ids].set(nu, mode="drop"))


# The hash layer(s) and the scores' learned temperature: what `train.trainable="hash"` leaves to
# learn, and what a run started from another's trains afresh with it (`state.with_trained`).
HASH_LAYERS = ("user_hash", "item_hash", "log_temperature")


def create_optimizer(train_config, num_steps: int) -> optax.GradientTransformation:
  """Adam on the learning-rate schedule of a run of `num_steps` (the cosine's length).

  With `train.trainable` "hash", every parameter outside HASH_LAYERS gets a zero update (the
  row-wise table is skipped by the step itself), so the encoder stays bit for bit as it started.
  """
  if train_config.lr_schedule == "constant" and train_config.warmup_steps == 0:
    # A float, not a schedule: optax then keeps no step count in Adam's state, so constant-rate
    # runs keep the checkpoint structure they had before schedules existed, and can resume.
    adam = optax.adam(train_config.learning_rate)
  else:
    adam = optax.adam(schedules.create_learning_rate(train_config, max(num_steps, 1)))
  if train_config.get("trainable", "all") == "all":
    return adam

  def labels(params):
    return {name: jax.tree.map(lambda _, n=name: "train" if n in HASH_LAYERS else "freeze", sub)
            for name, sub in params.items()}

  return optax.multi_transform({"train": adam, "freeze": optax.set_to_zero()}, labels)
