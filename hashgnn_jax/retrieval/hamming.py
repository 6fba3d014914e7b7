"""Exact Hamming top lists of one item shard: block keys by XOR + popcount, then selection.

Selection by counting (the default on CPU). Hamming scores are integers in [0, K], so the choice
of blocks and items needs no top_k: the blocks to keep are found by counting
(`selection.smallest_set`: the (n + p)-th smallest key by binary search over distances, each kept
block's column by a prefix count over bit-packed words and another binary search), which also
leaves them in block order; the items of those blocks are chosen the same way and then ordered by
a bitonic sorting network over (distance, slot) keys packed into int32, or left in position order
where the caller re-ranks them (hierarchical search). The results are top_k's. Ordered lists of
more than `COUNTING_MAX_SLOTS`, and rows longer than a list's slots times
`_COUNTING_ENTRIES_PER_SLOT` (ordered) or `_UNORDERED_ENTRIES_PER_SLOT` still go to top_k.
bench/retrieval.py, all users, K = 32, one device: Hamming search at the MovieLens shape 0.16 s
against top_k's 0.27.
"""

import functools

import jax
import jax.numpy as jnp

from hashgnn_jax.retrieval import codes as codes_lib
from hashgnn_jax.retrieval import layout
from hashgnn_jax.retrieval import selection as selection_lib

P, USERS, ITEMS = layout.P, layout.USERS, layout.ITEMS  # Short names for the specs below.

# On CPU, a shard whose packed codes take at most this many bytes gets its block distances
# computed users-major (`block_distances_by_user`): the codes then stay in cache while every user
# reads them all, and no transpose is needed. Measured (2-core CPU with 512 KiB of L2 per core,
# 1,024 users a call), against blocks-major plus a transpose: 1.1-2.5x faster at the MovieLens,
# Pinterest and Gowalla shapes (K = 32 and 64, up to 320 KiB of codes) and at 256 to 384 KiB,
# level to 1.3x slower from 512 KiB to 2 MiB.
USERS_MAJOR_MAX_BYTES = 384 << 10
# Counting selection (`selection`) for ordered lists of up to this many slots (k rounded up to a
# power of two) over rows of up to `_COUNTING_ENTRIES_PER_SLOT` entries per slot; beyond either,
# top_k. Measured on CPU at k = 100: 1.4-1.5x faster than top_k over rows of 404 to 3,952
# entries. The sorting network that orders a list grows as k log2(k)**2, so long ordered lists
# stay on top_k.
COUNTING_MAX_SLOTS = 128
_COUNTING_ENTRIES_PER_SLOT = 32
# Unordered lists (chosen blocks; hierarchical candidates, re-ranked anyway) need no network, so
# any k counts, over up to this many entries per slot. In isolation (512 rows, 2-core CPU)
# `selection.smallest_set` beat top_k up to 65,536 entries at k = 500, but in the search at 256
# the Alibaba shape (32,560 blocks a shard) counted and was slower (bench/retrieval.py, 2
# devices: Hamming 1,010 s against 842, hierarchical M = 500 1,360 against 1,190; extrapolated),
# so rows that long stay on top_k.
_UNORDERED_ENTRIES_PER_SLOT = 32


def _block_minimum(distances: list[jax.Array], num_words: int) -> jax.Array:
  """Elementwise minimum of a block's per-code distances, as keys of one shard: [1, ...].

  Narrow keys (uint8 below 256 bits) make a transposed copy of them cheap.
  """
  dtype = jnp.uint8 if num_words * codes_lib.WORD_BITS < 256 else jnp.int32
  return functools.reduce(jnp.minimum, distances).astype(dtype)[None]



def as_distances(scores, num_bits):
  """Hamming scores (-distance or -inf) as int32 distances, -inf as num_bits + 1 (the worst)."""
  return jnp.where(jnp.isneginf(scores), num_bits + 1, -scores).astype(jnp.int32)


def _counting_applies(num_entries, k, *, counting, ordered):
  """Whether `_hamming_columns` and `_hamming_top_k` count rather than call top_k."""
  width = 1 << (k - 1).bit_length()
  if not ordered:
    return counting and num_entries <= _UNORDERED_ENTRIES_PER_SLOT * width
  # The final sort packs (distance, slot) into one int32 key: fine for any K below 2**24 bits.
  return counting and width <= COUNTING_MAX_SLOTS and num_entries <= (
    _COUNTING_ENTRIES_PER_SLOT * width
  )


def _hamming_columns(scores, k, *, num_bits, counting):
  """Columns [C, k] of the top k Hamming scores [C, N] (-distance or -inf), ascending.

  The set `jax.lax.top_k` picks (ties: lower columns), in column order.
  """
  if _counting_applies(scores.shape[1], k, counting=counting, ordered=False):
    return selection_lib.smallest_set(as_distances(scores, num_bits), k, num_bits + 1)
  return jnp.sort(jax.lax.top_k(scores, k)[1], axis=1)


def _hamming_top_k(scores, k, *, num_bits, counting, ordered=True):
  """`jax.lax.top_k` for Hamming scores [C, N] (-distance or -inf): equal values and columns.

  With counting, the chosen columns are ordered by a sorting network over (distance, slot) pairs
  packed into one int32 key: slots follow column order, so ties go to lower columns as in top_k.
  ordered=False leaves them in column order where counting applies (an unsorted top_k).
  """
  if not _counting_applies(scores.shape[1], k, counting=counting, ordered=ordered):
    return jax.lax.top_k(scores, k)
  distances = as_distances(scores, num_bits)
  columns = selection_lib.smallest_set(distances, k, num_bits + 1)  # [C, k] ascending
  if not ordered:
    return jnp.take_along_axis(scores, columns, axis=1), columns
  distances = jnp.take_along_axis(distances, columns, axis=1)
  shift = max(k - 1, 1).bit_length()
  top = selection_lib.smallest((distances << shift) | jnp.arange(k, dtype=jnp.int32), k)
  distances = top >> shift
  top_scores = jnp.where(distances > num_bits, -jnp.inf, -distances.astype(jnp.float32))
  return top_scores, jnp.take_along_axis(columns, top & ((1 << shift) - 1), axis=1)


def _mark(shape, rows, slots, offsets) -> jax.Array:
  """Bool `shape` [C, m, b], True at (rows, slots, offsets); out-of-range slots are dropped."""
  return jnp.zeros(shape, bool).at[rows, slots, offsets].set(True, mode="drop")



@functools.partial(jax.jit, static_argnames=("mesh", "block_size"))
def block_distances(words, user_words, *, mesh, block_size):
  """Smallest Hamming distance per block and user, [D, B, C] (sharded like `words`)."""

  def shard_fn(words, user_words):
    block_words = words[0].reshape(-1, block_size, words.shape[-1])  # [B, b, W]
    # Users vary fastest: each code is read once per chunk, not once per user.
    distances = [
      codes_lib.popcount_distance(user_words[None], block_words[:, t, None])
      for t in range(block_size)
    ]  # b x [B, C]
    return _block_minimum(distances, words.shape[-1])

  return jax.shard_map(
    shard_fn, mesh=mesh, in_specs=(P(ITEMS), P(USERS)), out_specs=P(ITEMS, None, USERS)
  )(words, user_words)


@functools.partial(jax.jit, static_argnames=("mesh",))
def block_distances_by_user(words_by_offset, user_words, *, mesh):
  """Smallest Hamming distance per user and block, [D, C, B], from codes laid out [D, b, W, B].

  Entry [t, w, j] of a shard's layout is word w of the t-th code of block j, so each (t, w) is a
  row of B words that the users' loop reads in order.
  """

  def shard_fn(words_by_offset, user_words):
    by_offset = words_by_offset[0]  # [b, W, B]
    distances = [
      codes_lib.popcount_distance(user_words[:, :, None], by_offset[t][None], axis=1)
      for t in range(by_offset.shape[0])
    ]  # b x [C, B]
    return _block_minimum(distances, by_offset.shape[1])

  return jax.shard_map(
    shard_fn, mesh=mesh, in_specs=(P(ITEMS), P(USERS)), out_specs=P(ITEMS, USERS)
  )(words_by_offset, user_words)


@jax.jit
def users_major(distances):
  """`block_distances` [D, B, C] -> [D, C, B], the layout selection needs.

  A jit of its own: within the search, XLA:CPU fused the transpose into each of its consumers
  (every counting pass among them) and so transposed the keys up to 8 times per search.
  """
  return jnp.swapaxes(distances, 1, 2)


def hamming_shard(words, user_words, distances, exclude, *, valid_items, num_picks,
                   num_results, counting, ordered=True):
  """Exact Hamming top list (scores, local positions) [C, n] of one shard.

  words [S, W] by local position; user_words [C, W]; distances [C, B] (block distances);
  exclude: local positions [C, L], ascending within the shard and S for the rest, or None;
  counting: select by counting and sorting networks instead of top_k (`_hamming_top_k`);
  ordered=False: the list may come in position order instead (`_hamming_top_k`).
  """
  num_bits = words.shape[1] * codes_lib.WORD_BITS
  top_k = functools.partial(
    _hamming_top_k, num_bits=num_bits, counting=counting, ordered=ordered
  )
  num_users, num_blocks = distances.shape
  block_size = words.shape[0] // num_blocks
  block_words = words.reshape(num_blocks, block_size, -1)  # [B, b, W]
  rows = jnp.arange(num_users)[:, None]
  # Float keys: lax.top_k on int32 lowers to a full sort on CPU; distances <= K are exact.
  keys = -distances.astype(jnp.float32)  # [C, B]
  keys = jnp.where(jnp.arange(num_blocks) * block_size < valid_items, keys, -jnp.inf)

  if block_size == 1:  # Blocks are items: the keys are the scores.
    if exclude is not None:
      keys = keys.at[rows, exclude].set(-jnp.inf, mode="drop")
    return top_k(keys, min(num_results, num_blocks))

  def block_scores(blocks):  # [C, m] -> [C, m, b]
    # Block ids come from selection, so always in range: an unchecked gather.
    picked_words = block_words.at[blocks].get(mode="promise_in_bounds")  # [C, m, b, W]
    return -codes_lib.popcount_distance(user_words[:, None, None], picked_words).astype(jnp.float32)

  if exclude is not None:
    ex_blocks, ex_offsets = exclude // block_size, exclude % block_size  # [C, L]
    # Exclusions of one block are adjacent; the first of each run recomputes that block's key.
    is_start = jnp.concatenate([rows >= 0, ex_blocks[:, 1:] != ex_blocks[:, :-1]], axis=1)
    run_start = jax.lax.cummax(jnp.where(is_start, jnp.arange(exclude.shape[1]), 0), axis=1)
    run_scores = block_scores(jnp.minimum(ex_blocks, num_blocks - 1))  # [C, L, b]
    run_excluded = _mark(run_scores.shape, rows, run_start, ex_offsets)
    kept_best = jnp.max(jnp.where(run_excluded, -jnp.inf, run_scores), axis=2)  # [C, L]
    targets = jnp.where(is_start, ex_blocks, num_blocks)  # Out of range: dropped.
    keys = keys.at[rows, targets].set(kept_best, mode="drop")
  picked = _hamming_columns(
    keys, min(num_picks, num_blocks), num_bits=num_bits, counting=counting
  )  # [C, m]
  excluded = None
  if exclude is not None:
    slots = jax.vmap(jnp.searchsorted)(picked, ex_blocks)  # [C, L]
    found = jnp.take_along_axis(picked, jnp.minimum(slots, picked.shape[1] - 1), axis=1)
    slots = jnp.where(found == ex_blocks, slots, picked.shape[1])
    excluded = _mark(picked.shape + (block_size,), rows, slots, ex_offsets)
  return layout.top_items(picked, block_scores(picked), excluded, valid_items=valid_items,
                    num_results=num_results, top_k=top_k)
