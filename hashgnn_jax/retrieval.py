"""Binary hash codes and exact top-n retrieval over all items, one chunk of users at a time.

Continuous codes z in [-1, 1] become binary codes through sign(z) with sign(0) = +1, i.e. a bit is
1 iff z >= 0. Retrieval is exact (every item is scored) and deterministic:

Tie-breaking rule. Among items with equal score, the item that comes earlier in the permutation
returned by `tie_break_order` ranks higher. Item arrays are stored permuted by that order, every
selection below prefers the lower position among equal scores (as `jax.lax.top_k` does), and
positions are mapped back to item ids at the end. Results therefore equal one flat `top_k` over the
permuted item axis, ties included.

Excluded items (e.g. a user's training items) get score -inf, so they never outrank a kept item.
When fewer kept items than `num_results` exist, the tail of the ranking is filled with item id -1
and score -inf.

Algorithm. XLA's CPU top_k is a single-threaded heap pass costing far more per item than the
scoring, plus ~15 us per call at k = 100, so selection is two-level and every core gets a share.
Devices form a mesh of user shards (a chunk's users split, items replicated) × item shards (items
split into contiguous position ranges, lists merged). Within an item shard, positions are cut into
blocks of b consecutive positions; per user:
  1. block keys [C, I / b]: each block's best score. Hamming keys come from a fused pass over the
     packed codes with users as the fastest axis, then transposed in a jit of its own (fused with
     the transpose, the pass would read every code once per user instead of once per chunk); on
     CPU, a shard whose codes fit in cache is read users-major from a copy laid out by offset
     within the block, which needs no transpose.
     Continuous keys come from a scan over tiles of 2**17 items: per tile a [T, C] product, its
     block maxima, and its best blocks with their scores merged into a running best, so no [C, I]
     array exists and re-ranked scores equal the keys bit for bit.
  2. each block holding an excluded item has its key recomputed over its kept items (continuous:
     excluded products are set to -inf in the tile); blocks of padding get key -inf;
  3. the top n + p blocks by key (ties: lower block first) are kept, p = 1 when a block mixes items
     and padding, else 0, and their items re-ranked by score.
Every block ranked above the block of a true top-n item x holds its own item ranking above x, or is
the mixed block, so x's block is among the top n + p: the shard's top n is exact. With b = 1 the
keys are the scores and one top_k does. Per-shard lists merge by rank (a binary search per entry;
lower shards win ties), so results equal one flat top_k. Hierarchical search takes the Hamming top
M the same way, with the inner products of those M, and re-ranks them stably.

Selection by counting (the default on CPU). Hamming scores are integers in [0, K], so step 3's
choices need no top_k: the blocks to keep are found by counting (`selection.smallest_set`: the
(n + p)-th smallest key by binary search over distances, each kept block's column by a prefix count
and another binary search), which also leaves them in block order; the items of those blocks are
chosen the same way and then ordered by a bitonic sorting network over (distance, slot) keys
packed into int32. The hierarchical re-rank sorts by (inner product, Hamming rank) with networks
too; with one item shard it sorts by (inner product, distance, position) inside the shard, so the
Hamming list it re-ranks needs no ordering of its own. The results are top_k's. Lists of more
than `_COUNTING_MAX_SLOTS` and rows longer than `_COUNTING_ENTRIES_PER_SLOT` times the list still
go to top_k. bench/retrieval.py, all users,
K = 32, one device: Hamming search at the MovieLens shape 0.16 s against top_k's 0.27.

Memory per device is O(C * I / b) for Hamming and hierarchical search and O(C * 2**17) for
continuous search (C users of the chunk on the device, I items of its shard).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hashgnn_jax import selection as selection_lib

WORD_BITS = 32
SEARCH_MODES = ("hamming", "hierarchical", "continuous")
_USERS, _ITEMS = "users", "items"  # Mesh axes: a chunk's users, and the item shards.
_P = jax.sharding.PartitionSpec
# Upper bound of the automatic block size. CPU: larger blocks measured slower in the fused key pass.
# Elsewhere 128, measured on a GPU (H200, Alibaba shape, 4,096 users a call, top-100): Hamming
# search took 17.3 ms at b = 128 against 23.2 at 64 for K = 32, and 23.3 against 135 for K = 64,
# where XLA split the key pass at b = 64 into six kernels (TPUs unmeasured).
_MAX_BLOCK_SIZE = {"cpu": 64}
_MAX_BLOCK_SIZE_ELSEWHERE = 128
# Default item sharding from this many items: below it, splitting users costs no merge.
_ITEM_SHARDING_FROM = 1 << 21
# On CPU, a shard whose packed codes take at most this many bytes gets its block distances
# computed users-major (`_block_distances_by_user`): the codes then stay in cache while every user
# reads them all, and no transpose is needed. Measured (2-core CPU with 512 KiB of L2 per core,
# 1,024 users a call), against blocks-major plus a transpose: 1.1-2.5x faster at the MovieLens,
# Pinterest and Gowalla shapes (K = 32 and 64, up to 320 KiB of codes) and at 256 to 384 KiB,
# level to 1.3x slower from 512 KiB to 2 MiB.
_USERS_MAJOR_MAX_BYTES = 384 << 10
# Items per tile of the continuous scan: 2**17 measured fastest of 2**13 .. 2**18 at 4.2M items.
_TILE_ITEMS = 1 << 17
# Counting selection (`selection`) for lists of up to this many slots (k rounded up to a power of
# two), over rows of up to this many entries per slot; beyond either, top_k. Measured on CPU at
# k = 100: 1.4-1.5x faster than top_k over rows of 404 to 3,952 entries; at k = 500 (hierarchical
# M = 500, Gowalla shape, 2 devices, 6,144 users) slower: 2.15 s against top_k's 1.35 s.
_COUNTING_MAX_SLOTS = 128
_COUNTING_ENTRIES_PER_SLOT = 32
SELECTIONS = ("auto", "top_k", "counting")


def _num_words(num_bits: int) -> int:
  """Number of uint32 words needed to hold `num_bits` bits."""
  return -(-num_bits // WORD_BITS)


@jax.jit
def pack_bits(codes: jax.Array) -> jax.Array:
  """Packs sign bits of codes [n, K] into uint32 [n, ceil(K / 32)]; word w bit j is code 32w + j."""
  n, num_bits = codes.shape
  num_words = _num_words(num_bits)
  bits = (codes >= 0).astype(jnp.uint32)  # [n, K]
  # Zero padding bits are identical for every code, so they never add to an XOR distance.
  bits = jnp.pad(bits, ((0, 0), (0, num_words * WORD_BITS - num_bits)))
  bits = bits.reshape(n, num_words, WORD_BITS)  # [n, W, 32]
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  # The shifted bits are disjoint powers of two, so their sum is their bitwise OR.
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)  # [n, W]


def _popcount_distance(words_a: jax.Array, words_b: jax.Array, axis: int = -1) -> jax.Array:
  """Hamming distances (int32) between packed codes, words along `axis`, the rest broadcast."""
  word = functools.partial(jax.lax.index_in_dim, axis=axis, keepdims=False)
  # One word at a time, so a fused loop never holds a [..., W] intermediate.
  return sum(
    jax.lax.population_count(word(words_a, w) ^ word(words_b, w)).astype(jnp.int32)
    for w in range(words_a.shape[axis])
  )


def _block_minimum(distances: list[jax.Array], num_words: int) -> jax.Array:
  """Elementwise minimum of a block's per-code distances, as keys of one shard: [1, ...].

  Narrow keys (uint8 below 256 bits) make a transposed copy of them cheap.
  """
  dtype = jnp.uint8 if num_words * WORD_BITS < 256 else jnp.int32
  return functools.reduce(jnp.minimum, distances).astype(dtype)[None]


@jax.jit
def hamming_distances(user_words: jax.Array, item_words: jax.Array) -> jax.Array:
  """Hamming distances [C, I] (int32) between packed codes [C, W] and [I, W]."""
  if user_words.shape[1] != item_words.shape[1]:
    raise ValueError(
      f"Word counts differ: users have {user_words.shape[1]}, items have {item_words.shape[1]}."
    )
  return _popcount_distance(user_words[:, None, :], item_words[None, :, :])


def tie_break_order(num_items: int, seed: int) -> np.ndarray:
  """Seeded random permutation of item ids; earlier items win ties (see module docstring)."""
  return np.random.default_rng(seed).permutation(num_items)


def _positions_of(tie_order: np.ndarray) -> np.ndarray:
  """Inverse permutation: position of each item id within `tie_order`."""
  positions = np.empty_like(tie_order)
  positions[tie_order] = np.arange(tie_order.shape[0], dtype=tie_order.dtype)
  return positions


def _check_exclude(exclude, *, num_users: int, num_items: int) -> np.ndarray:
  """Validates a padded [C, L] exclusion array of item ids and returns it as int64."""
  exclude = np.asarray(exclude)
  if exclude.ndim != 2 or exclude.shape[0] != num_users:
    raise ValueError(f"exclude must have shape [{num_users}, L], got {exclude.shape}.")
  if not np.issubdtype(exclude.dtype, np.integer):
    raise ValueError(f"exclude must hold integer item ids, got dtype {exclude.dtype}.")
  if exclude.size and (exclude.min() < -1 or exclude.max() >= num_items):
    raise ValueError(f"exclude ids must lie in [0, {num_items}) or be -1 padding.")
  return exclude.astype(np.int64)


def _sorted_exclusions(exclude: np.ndarray, item_positions: np.ndarray, sentinel: int):
  """Positions of excluded ids [C, L], ascending per row, `sentinel` as padding; None if empty.

  The width is cut to the longest row rounded up to a power of two, so chunks of light users cost
  little and few shapes compile.
  """
  kept = exclude >= 0
  longest = int(kept.sum(axis=1).max(initial=0))
  if longest == 0:
    return None
  width = 1 << (longest - 1).bit_length()
  if not kept[:, width:].any():  # Padding at the end, as graph rows give it: sort less.
    exclude, kept = exclude[:, :width], kept[:, :width]
  positions = np.sort(np.where(kept, item_positions[np.maximum(exclude, 0)], sentinel), axis=1)
  positions = np.pad(positions, ((0, 0), (0, max(width - positions.shape[1], 0))),
                     constant_values=sentinel)
  return positions[:, :width].astype(np.int32)


def _as_distances(scores, num_bits):
  """Hamming scores (-distance or -inf) as int32 distances, -inf as num_bits + 1 (the worst)."""
  return jnp.where(jnp.isneginf(scores), num_bits + 1, -scores).astype(jnp.int32)


def _counting_applies(num_entries, k, *, counting):
  """Whether `_hamming_columns` and `_hamming_top_k` count rather than call top_k."""
  width = 1 << (k - 1).bit_length()
  # The final sort packs (distance, slot) into one int32 key: fine for any K below 2**24 bits.
  return counting and width <= _COUNTING_MAX_SLOTS and num_entries <= (
    _COUNTING_ENTRIES_PER_SLOT * width
  )


def _hamming_columns(scores, k, *, num_bits, counting):
  """Columns [C, k] of the top k Hamming scores [C, N] (-distance or -inf), ascending.

  The set `jax.lax.top_k` picks (ties: lower columns), in column order.
  """
  if _counting_applies(scores.shape[1], k, counting=counting):
    return selection_lib.smallest_set(_as_distances(scores, num_bits), k, num_bits + 1)
  return jnp.sort(jax.lax.top_k(scores, k)[1], axis=1)


def _hamming_top_k(scores, k, *, num_bits, counting, ordered=True):
  """`jax.lax.top_k` for Hamming scores [C, N] (-distance or -inf): equal values and columns.

  With counting, the chosen columns are ordered by a sorting network over (distance, slot) pairs
  packed into one int32 key: slots follow column order, so ties go to lower columns as in top_k.
  ordered=False leaves them in column order where counting applies (an unsorted top_k).
  """
  if not _counting_applies(scores.shape[1], k, counting=counting):
    return jax.lax.top_k(scores, k)
  distances = _as_distances(scores, num_bits)
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


def _top_items(picked, scores, excluded, *, valid_items, num_results, top_k=jax.lax.top_k):
  """Top `num_results` (scores, local positions) [C, n] among the items of picked blocks.

  picked [C, m] ascending; scores [C, m, b]; excluded [C, m, b] bool or None; positions at or
  beyond valid_items are padding; top_k: `jax.lax.top_k` or a replacement with its semantics.
  """
  num_users, _, block_size = scores.shape
  positions = picked[:, :, None] * block_size + jnp.arange(block_size)  # [C, m, b]
  kept = positions < valid_items
  if excluded is not None:
    kept &= ~excluded
  # Ascending blocks keep the candidates in position order, so ties still favour lower positions.
  scores = jnp.where(kept, scores, -jnp.inf).reshape(num_users, -1)  # [C, m * b]
  top_scores, top = top_k(scores, min(num_results, scores.shape[1]))  # [C, n]
  return top_scores, jnp.take_along_axis(positions.reshape(num_users, -1), top, axis=1)


@functools.partial(jax.jit, static_argnames=("mesh", "block_size"))
def _block_distances(words, user_words, *, mesh, block_size):
  """Smallest Hamming distance per block and user, [D, B, C] (sharded like `words`)."""

  def shard_fn(words, user_words):
    block_words = words[0].reshape(-1, block_size, words.shape[-1])  # [B, b, W]
    # Users vary fastest: each code is read once per chunk, not once per user.
    distances = [
      _popcount_distance(user_words[None], block_words[:, t, None]) for t in range(block_size)
    ]  # b x [B, C]
    return _block_minimum(distances, words.shape[-1])

  return jax.shard_map(
    shard_fn, mesh=mesh, in_specs=(_P(_ITEMS), _P(_USERS)), out_specs=_P(_ITEMS, None, _USERS)
  )(words, user_words)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _block_distances_by_user(words_by_offset, user_words, *, mesh):
  """Smallest Hamming distance per user and block, [D, C, B], from codes laid out [D, b, W, B].

  Entry [t, w, j] of a shard's layout is word w of the t-th code of block j, so each (t, w) is a
  row of B words that the users' loop reads in order.
  """

  def shard_fn(words_by_offset, user_words):
    by_offset = words_by_offset[0]  # [b, W, B]
    distances = [
      _popcount_distance(user_words[:, :, None], by_offset[t][None], axis=1)
      for t in range(by_offset.shape[0])
    ]  # b x [C, B]
    return _block_minimum(distances, by_offset.shape[1])

  return jax.shard_map(
    shard_fn, mesh=mesh, in_specs=(_P(_ITEMS), _P(_USERS)), out_specs=_P(_ITEMS, _USERS)
  )(words_by_offset, user_words)


@jax.jit
def _users_major(distances):
  """`_block_distances` [D, B, C] -> [D, C, B], the layout selection needs.

  A jit of its own: within the search, XLA:CPU fused the transpose into each of its consumers
  (every counting pass among them) and so transposed the keys up to 8 times per search.
  """
  return jnp.swapaxes(distances, 1, 2)


def _hamming_shard(words, user_words, distances, exclude, *, valid_items, num_picks,
                   num_results, counting, ordered=True):
  """Exact Hamming top list (scores, local positions) [C, n] of one shard.

  words [S, W] by local position; user_words [C, W]; distances [C, B] (block distances);
  exclude: local positions [C, L], ascending within the shard and S for the rest, or None;
  counting: select by counting and sorting networks instead of top_k (`_hamming_top_k`);
  ordered=False: the list may come in position order instead (`_hamming_top_k`).
  """
  num_bits = words.shape[1] * WORD_BITS
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
    return -_popcount_distance(user_words[:, None, None], picked_words).astype(jnp.float32)

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
  return _top_items(picked, block_scores(picked), excluded, valid_items=valid_items,
                    num_results=num_results, top_k=top_k)


def _continuous_shard(z, user_z, exclude, *, block_size, tile_blocks, valid_items, num_picks,
                      num_results):
  """Exact inner-product top list (scores, local positions) [C, n] of one shard.

  z [S, K] by local position; user_z [C, K]; exclude: local positions [C, L], S for the rest, or
  None. The [C, S] products never exist at once: a scan over tiles of `tile_blocks` blocks keeps
  the best `num_picks` blocks with their scores, gathered from the tile's own product so that
  they equal the block keys bit for bit.
  """
  num_users = user_z.shape[0]
  tile_items = tile_blocks * block_size
  num_blocks = z.shape[0] // block_size
  rows = jnp.arange(num_users)[:, None]

  def tile_best(tile):
    """The tile's best min(n', T) blocks: keys and block ids [C, m], scores [C, m, b]."""
    start = tile * tile_items
    tile_z = jax.lax.dynamic_slice_in_dim(z, start, tile_items)  # [T * b, K]
    scores = jnp.einsum("tk,ck->tc", tile_z, user_z, precision=jax.lax.Precision.HIGHEST)
    if exclude is not None:
      local = exclude - start  # [C, L]
      local = jnp.where((local >= 0) & (local < tile_items), local, tile_items)
      scores = scores.at[local, rows].set(-jnp.inf, mode="drop")
    scores = scores.reshape(tile_blocks, block_size, num_users)  # [T, b, C]
    blocks = tile * tile_blocks + jnp.arange(tile_blocks)  # [T]
    keys = jnp.where(blocks * block_size < valid_items, jnp.max(scores, axis=1).T, -jnp.inf)
    tile_keys, top = jax.lax.top_k(keys, min(num_picks, tile_blocks))  # [C, m]
    return tile_keys, blocks[top], scores[top, :, rows]

  def merge_tile(best, tile):
    # Kept blocks come first: they have lower indices, so they win ties as a flat top_k would.
    keys, blocks, scores = (jnp.concatenate(pair, axis=1) for pair in zip(best, tile_best(tile)))
    keys, keep = jax.lax.top_k(keys, num_picks)  # [C, n']
    blocks = jnp.take_along_axis(blocks, keep, axis=1)
    return (keys, blocks, jnp.take_along_axis(scores, keep[:, :, None], axis=1)), None

  if num_blocks == tile_blocks:
    keys, blocks, block_scores = tile_best(0)
  else:
    # Placeholders: block B lies beyond every real position, with no score to win.
    best = (
      jnp.full((num_users, num_picks), -jnp.inf),
      jnp.full((num_users, num_picks), num_blocks, jnp.int32),
      jnp.full((num_users, num_picks, block_size), -jnp.inf),
    )
    # The carry varies over shards once a tile is merged in, so it must start out that way too.
    best = jax.lax.pcast(best, (_USERS, _ITEMS), to="varying")
    tiles = jnp.arange(num_blocks // tile_blocks)
    (keys, blocks, block_scores), _ = jax.lax.scan(merge_tile, best, tiles)
  if block_size == 1:  # Blocks are items, already ranked with ties in position order.
    return keys[:, :num_results], blocks[:, :num_results]
  order = jnp.argsort(blocks, axis=1)  # [C, n']
  return _top_items(
    jnp.take_along_axis(blocks, order, axis=1),
    jnp.take_along_axis(block_scores, order[:, :, None], axis=1),
    None,
    valid_items=valid_items,
    num_results=num_results,
  )


def _search_shard(words, z, user_words, user_z, distances, exclude=None, *, mode, num_results,
                  num_candidates, num_items, num_picks_extra, block_size, tile_blocks, counting,
                  rerank=False):
  """One shard's exact top list: (scores, global positions[, inner products]) [1, C, n].

  Hierarchical mode returns the Hamming top M with their inner products, for `_search` to merge
  and re-rank; with rerank=True (the only item shard) it re-ranks them itself and returns the
  top n by inner product.
  """
  words, z = words[0], z[0]  # [S, W], [S, K] by local position
  shard_items = z.shape[0]
  offset = jax.lax.axis_index(_ITEMS) * shard_items
  if exclude is not None:
    local = exclude[0] - offset  # [C, L]
    exclude = jnp.where((local >= 0) & (local < shard_items), local, shard_items)
  num_wanted = num_candidates if mode == "hierarchical" else num_results
  kwargs = {
    "valid_items": jnp.clip(num_items - offset, 0, shard_items),
    "num_picks": num_wanted + num_picks_extra,
    "num_results": num_wanted,
  }
  if mode == "continuous":
    top_scores, top_pos = _continuous_shard(
      z, user_z, exclude, block_size=block_size, tile_blocks=tile_blocks, **kwargs
    )
    return top_scores[None], (top_pos + offset)[None]
  top_scores, top_pos = _hamming_shard(
    words, user_words, distances[0], exclude, counting=counting, ordered=not rerank, **kwargs
  )
  if mode == "hamming":
    return top_scores[None], (top_pos + offset)[None]
  # Positions are the shard's own, so in range: an unchecked gather (hierarchical M = 100 search
  # 0-10% faster at the MovieLens and Pinterest shapes, same process, 2-core CPU).
  candidates = z.at[top_pos].get(mode="promise_in_bounds")  # [C, M, K]
  inner = jnp.einsum("ck,cmk->cm", user_z, candidates, precision=jax.lax.Precision.HIGHEST)
  # Excluded candidates must stay below every kept one after re-ranking too.
  inner = jnp.where(jnp.isneginf(top_scores), -jnp.inf, inner)
  if not rerank:
    return top_scores[None], (top_pos + offset)[None], inner[None]
  # The stable re-rank of the Hamming list is the order of (-inner product, distance, position).
  # The list holds each distance's candidates in position order, sorted or not, so the list's slot
  # can stand for the position, and the Hamming list needs no sorting network of its own.
  num_bits = words.shape[1] * WORD_BITS
  top = selection_lib.argsort(
    -inner, _as_distances(top_scores, num_bits), max_tie=num_bits + 1
  )[:, :num_results]  # [C, n]
  top_pos = jnp.take_along_axis(top_pos, top, axis=1)
  return jnp.take_along_axis(inner, top, axis=1)[None], (top_pos + offset)[None]


def _merge_shards(scores, *values, num_results):
  """Top `num_results` of per-shard lists [D, C, k], each sorted; returns scores and `values`.

  A merge by ranks, not a top_k: XLA's CPU top_k costs ~15 us per user at k = 100 even over a few
  hundred entries, a binary search per entry a fraction of that.
  """
  num_shards, num_users, k = scores.shape
  if num_shards == 1:  # One shard's list is the answer.
    return scores[0], *(v[0] for v in values)
  keys = -scores  # Ascending within each list.
  rank = jnp.broadcast_to(jnp.arange(k), scores.shape)  # [D, C, k]
  for s in range(num_shards):
    for t in range(num_shards):
      if t != s:
        # Entries of lower shards have lower positions, so they win ties.
        search = functools.partial(jnp.searchsorted, side="right" if t < s else "left")
        rank = rank.at[s].add(jax.vmap(search)(keys[t], keys[s]))
  rows = jnp.arange(num_users)[None, :, None]
  slots = jnp.where(rank < num_results, rank, num_results)  # Out of range: dropped.

  def place(x):
    return jnp.zeros((num_users, num_results), x.dtype).at[rows, slots].set(x, mode="drop")

  return place(scores), *(place(v) for v in values)


@functools.partial(
  jax.jit,
  static_argnames=(
    "mesh", "mode", "num_results", "num_candidates", "num_items", "num_picks_extra", "block_size",
    "tile_blocks", "counting",
  ),
)
def _search(words, z, tie_order, user_words, user_z, distances, exclude, *, mesh, mode,
            num_results, num_candidates, num_items, num_picks_extra, block_size, tile_blocks,
            counting):
  """Exact top-n (item ids, scores) [C, n] for one chunk of users over a sharded ItemIndex.

  distances: block distances [D, C, B] of the chunk, or None in continuous mode; counting:
  counting selection and sorting networks instead of top_k for Hamming lists and the
  hierarchical re-rank.
  """
  extra_args = () if exclude is None else (exclude[None],)
  hierarchical = mode == "hierarchical"
  network_rerank = hierarchical and counting and num_candidates <= _COUNTING_MAX_SLOTS
  # With one item shard a shard's candidates are final: re-ranked in the shard by distance as
  # well as inner product, they spare counting the Hamming list's sorting network.
  rerank = network_rerank and mesh.shape[_ITEMS] == 1
  shard_fn = jax.shard_map(
    functools.partial(
      _search_shard,
      mode=mode,
      num_results=num_results,
      num_candidates=num_candidates,
      num_items=num_items,
      num_picks_extra=num_picks_extra,
      block_size=block_size,
      tile_blocks=tile_blocks,
      counting=counting,
      rerank=rerank,
    ),
    mesh=mesh,
    in_specs=(_P(_ITEMS), _P(_ITEMS), _P(_USERS), _P(_USERS), _P(_ITEMS, _USERS))
    + (_P(None, _USERS),) * len(extra_args),
    out_specs=(_P(_ITEMS, _USERS),) * (3 if hierarchical and not rerank else 2),
  )
  shard_lists = shard_fn(words, z, user_words, user_z, distances, *extra_args)
  if hierarchical and not rerank:
    _, top_pos, inner = _merge_shards(*shard_lists, num_results=num_candidates)  # [C, M]
    # Both prefer lower columns among ties, i.e. the better Hamming rank: a stable re-rank.
    if network_rerank:
      top = selection_lib.argsort(-inner)[:, :num_results]  # [C, n]
      top_scores = jnp.take_along_axis(inner, top, axis=1)
    else:
      top_scores, top = jax.lax.top_k(inner, num_results)  # [C, n]
    top_pos = jnp.take_along_axis(top_pos, top, axis=1)
  else:
    top_scores, top_pos = _merge_shards(*shard_lists, num_results=num_results)
  item_ids = jnp.where(jnp.isneginf(top_scores), -1, tie_order[jnp.minimum(top_pos, num_items - 1)])
  return item_ids, top_scores


def _auto_block_size(shard_items: int, platform: str) -> int:
  """About sqrt(items / 128), a power of two: balances block keys against re-ranked candidates.

  Capped at `_MAX_BLOCK_SIZE` for the devices' `platform` ("cpu", "gpu", ...).

  Counting selection alone would favour larger blocks (Gowalla's 40,981 items: Hamming search
  293 ms at b = 32 against 343 at b = 16, 6,144 users), but hierarchical search with M = 500, the
  evaluation's default, stays on top_k, which then ranks twice the candidates: 1.72 s against
  1.39 s on 2 devices.
  """
  target = max(shard_items // 128, 1) ** 0.5
  cap = _MAX_BLOCK_SIZE.get(platform, _MAX_BLOCK_SIZE_ELSEWHERE)
  return min(1 << max(int(np.log2(target)), 0), cap)


def index_layout(num_items: int, devices, *, item_shards: int | None = None,
                 block_size: int | None = None) -> tuple[int, int]:
  """The (item shards, block size) an `ItemIndex` of `num_items` items on `devices` takes.

  None picks the default, as `ItemIndex` does; a benchmark can read the automatic block size
  here without packing a whole index for it.
  """
  if item_shards is None:
    item_shards = len(devices) if num_items >= _ITEM_SHARDING_FROM else 1
  if item_shards < 1 or len(devices) % item_shards:
    raise ValueError(f"item_shards={item_shards} must divide the {len(devices)} devices.")
  if block_size is not None and block_size < 1:
    raise ValueError(f"block_size={block_size} must be >= 1.")
  shard_items = -(-num_items // item_shards)
  return item_shards, block_size or _auto_block_size(shard_items, devices[0].platform)


class ItemIndex:
  """Device-resident item codes for exact Hamming, hierarchical and inner-product search.

  `devices` (default: all local devices) form a mesh of user shards × `item_shards`: each chunk's
  users are split over the first axis (items replicated) and the items over the second (lists
  merged). XLA's CPU top-k is single-threaded per device, so both put every core to work; user
  shards cost no merge, item shards divide the memory. `item_shards` defaults to all devices from
  `_ITEM_SHARDING_FROM` items, else 1. `block_size` (default: automatic) sets the two-level
  selection of the module docstring. `selection` picks how Hamming lists and the hierarchical
  re-rank are chosen and ordered: "top_k", "counting" (counting selection and sorting networks,
  faster than XLA's CPU top_k up to a few thousand entries per list; `selection` module), or
  "auto": counting on CPU devices, top_k elsewhere. Results are the same either way.
  """

  def __init__(self, item_z, *, tie_seed: int, devices=None, item_shards: int | None = None,
               block_size: int | None = None, selection: str = "auto"):
    item_z = np.asarray(item_z, dtype=np.float32)
    if item_z.ndim != 2 or item_z.shape[0] == 0:
      raise ValueError(f"item_z must have shape [I, K] with I > 0, got {item_z.shape}.")
    self.num_items, self.num_bits = item_z.shape
    devices = jax.local_devices() if devices is None else list(devices)
    item_shards, self.block_size = index_layout(self.num_items, devices, item_shards=item_shards,
                                                block_size=block_size)
    self._mesh = jax.sharding.Mesh(
      np.array(devices).reshape(-1, item_shards), (_USERS, _ITEMS)
    )
    shard_items = -(-self.num_items // item_shards)
    if selection not in SELECTIONS:
      raise ValueError(f"Unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}.")
    self._counting = selection == "counting" or (
      selection == "auto" and devices[0].platform == "cpu"
    )
    blocks_needed = -(-shard_items // self.block_size)
    self._tile_blocks = min(blocks_needed, max(_TILE_ITEMS // self.block_size, 1))
    blocks_per_shard = -(-blocks_needed // self._tile_blocks) * self._tile_blocks
    padded_items = item_shards * blocks_per_shard * self.block_size
    # Whole blocks of padding get key -inf; the one block mixing items and padding may win on a
    # padded item, so it takes one extra pick (module docstring).
    self._num_picks_extra = int(self.num_items % self.block_size != 0)
    order = tie_break_order(self.num_items, tie_seed)
    self.tie_order = order
    self._item_positions = _positions_of(order)
    # On every device, so that no search copies it there.
    replicated = jax.sharding.NamedSharding(self._mesh, _P())
    self._tie_order = jax.device_put(order.astype(np.int32), replicated)  # [I]
    permuted = np.zeros((padded_items, self.num_bits), np.float32)
    permuted[:self.num_items] = item_z[order]
    words = np.asarray(pack_bits(permuted))  # [P, W]
    sharding = jax.sharding.NamedSharding(self._mesh, _P(_ITEMS))
    self._words = jax.device_put(words.reshape(item_shards, -1, words.shape[1]), sharding)
    self._z = jax.device_put(permuted.reshape(item_shards, -1, self.num_bits), sharding)
    self._words_by_offset = None  # [D, b, W, B] where `_block_distances_by_user` pays.
    if devices[0].platform == "cpu" and words.nbytes // item_shards <= _USERS_MAJOR_MAX_BYTES:
      by_offset = words.reshape(item_shards, -1, self.block_size, words.shape[1])
      self._words_by_offset = jax.device_put(by_offset.transpose(0, 2, 3, 1), sharding)

  def search(
    self,
    user_z,
    *,
    mode: str,
    num_results: int,
    num_candidates: int | None = None,
    exclude=None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-n items per user, best first: (item ids int64 [C, n], scores float32 [C, n])."""
    if mode not in SEARCH_MODES:
      raise ValueError(f"Unknown mode {mode!r}; valid modes are {', '.join(SEARCH_MODES)}.")
    user_z = np.asarray(user_z, dtype=np.float32)
    if user_z.ndim != 2 or user_z.shape[1] != self.num_bits:
      raise ValueError(f"user_z must have shape [C, {self.num_bits}], got {user_z.shape}.")
    if not 1 <= num_results <= self.num_items:
      raise ValueError(f"num_results={num_results} must lie in [1, num_items={self.num_items}].")
    if mode == "hierarchical":
      if num_candidates is None or not num_results <= num_candidates <= self.num_items:
        raise ValueError(
          "hierarchical search needs num_results <= num_candidates <= num_items, got "
          f"num_results={num_results}, num_candidates={num_candidates}, "
          f"num_items={self.num_items}."
        )
    else:
      # Only the hierarchical mode uses it; dropping it avoids needless recompiles.
      num_candidates = None
    num_users = user_z.shape[0]
    if exclude is not None:
      exclude = _check_exclude(exclude, num_users=num_users, num_items=self.num_items)
      exclude = _sorted_exclusions(exclude, self._item_positions, np.iinfo(np.int32).max)
    # Every user shard takes an equal part of the chunk.
    pad = -num_users % self._mesh.shape[_USERS]
    user_z = jax.device_put(
      np.pad(user_z, ((0, pad), (0, 0))), jax.sharding.NamedSharding(self._mesh, _P(_USERS))
    )
    if exclude is not None:
      exclude = np.pad(exclude, ((0, pad), (0, 0)), constant_values=np.iinfo(np.int32).max)
    user_words = pack_bits(user_z)  # [C, W], sharded like user_z
    distances = None
    if mode != "continuous" and self._words_by_offset is not None:
      distances = _block_distances_by_user(self._words_by_offset, user_words, mesh=self._mesh)
    elif mode != "continuous":
      # Separate jits: fused with the transpose that selection needs, the key pass would loop
      # over users outermost and re-read every code once per user (3x slower, measured).
      distances = _users_major(
        _block_distances(self._words, user_words, mesh=self._mesh, block_size=self.block_size)
      )
    item_ids, scores = _search(
      self._words,
      self._z,
      self._tie_order,
      user_words,
      user_z,
      distances,
      exclude,
      mesh=self._mesh,
      mode=mode,
      num_results=num_results,
      num_candidates=num_candidates,
      num_items=self.num_items,
      num_picks_extra=self._num_picks_extra,
      block_size=self.block_size,
      tile_blocks=self._tile_blocks,
      counting=self._counting,
    )
    item_ids = np.asarray(item_ids, dtype=np.int64)[:num_users]
    return item_ids, np.asarray(scores, dtype=np.float32)[:num_users]


class ScoreRanking:
  """Items ranked by one user-independent score (e.g. popularity), with per-user exclusions.

  Scores are compared in float32 (integer counts are exact below 2**24); ties follow `tie_order`;
  items scored -inf are never ranked. The ranking is sorted once; `top` only drops exclusions.
  """

  def __init__(self, item_scores, *, tie_order):
    item_scores = np.asarray(item_scores, dtype=np.float32)
    if item_scores.ndim != 1:
      raise ValueError(f"item_scores must have shape [I], got {item_scores.shape}.")
    self.num_items = item_scores.shape[0]
    tie_order = np.asarray(tie_order)
    is_permutation = np.array_equal(np.sort(tie_order), np.arange(self.num_items))
    if tie_order.shape != (self.num_items,) or not is_permutation:
      raise ValueError(f"tie_order must be a permutation of range({self.num_items}).")
    permuted = item_scores[tie_order]
    # A stable sort of the permuted scores is the tie-breaking rule itself.
    order = tie_order[np.argsort(-permuted, kind="stable")]
    self._ranked = order[: np.count_nonzero(~np.isneginf(permuted))]  # [R] item ids, best first

  def top(self, *, num_results: int, exclude=None, num_users: int | None = None) -> np.ndarray:
    """Best `num_results` item ids int64 [C, n] per user, -1 filled.

    Exactly one of `exclude` ([C, L] item ids, -1 padded) or `num_users` (C) sets the chunk size.
    """
    if (exclude is None) == (num_users is None):
      raise ValueError("Pass exactly one of exclude (per-user exclusions) or num_users.")
    if not 1 <= num_results <= self.num_items:
      raise ValueError(f"num_results={num_results} must lie in [1, num_items={self.num_items}].")
    width = 0
    if exclude is not None:
      exclude = _check_exclude(exclude, num_users=np.shape(exclude)[0], num_items=self.num_items)
      num_users, width = exclude.shape
    # A user's top n lies within the global top n + L: at most L of those are excluded.
    candidates = self._ranked[:num_results + width]  # [k]
    kept = np.ones((num_users, len(candidates)), bool)  # [C, k]
    if width:
      # One int64 key per (row, item) pair turns set membership into a sorted search.
      row_keys = np.arange(num_users)[:, None] * (self.num_items + 1)  # [C, 1]
      excluded = np.sort((row_keys + np.where(exclude >= 0, exclude, self.num_items)).ravel())
      keys = row_keys + candidates  # [C, k]
      kept = excluded[np.minimum(np.searchsorted(excluded, keys), excluded.size - 1)] != keys
    rank = np.cumsum(kept, axis=1) - 1  # [C, k]
    rows, cols = np.nonzero(kept & (rank < num_results))
    item_ids = np.full((num_users, num_results), -1, np.int64)
    item_ids[rows, rank[rows, cols]] = candidates[cols]
    return item_ids


def rank_by_item_score(
  item_scores,
  *,
  num_results: int,
  tie_order,
  exclude=None,
  num_users: int | None = None,
) -> np.ndarray:
  """One-off `ScoreRanking(item_scores, tie_order=tie_order).top(...)`; item ids int64 [C, n]."""
  return ScoreRanking(item_scores, tie_order=tie_order).top(
    num_results=num_results, exclude=exclude, num_users=num_users
  )
