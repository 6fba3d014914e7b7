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
     Continuous keys come from a scan over tiles of 2**17 items: per tile a [C, T] product, its
     block maxima, and its best blocks with their scores merged into a running best, so no [C, I]
     array exists and re-ranked scores equal the keys bit for bit. On CPU, blocks and items are
     chosen by counting over the float keys' bits (`selection.top_k`), not by top_k.
  2. each block holding an excluded item has its key recomputed over its kept items (continuous:
     excluded products are set to -inf in the tile); blocks of padding get key -inf;
  3. the top n + p blocks by key (ties: lower block first) are kept, p = 1 when a block mixes items
     and padding, else 0, and their items re-ranked by score.
Every block ranked above the block of a true top-n item x holds its own item ranking above x, or is
the mixed block, so x's block is among the top n + p: the shard's top n is exact. With b = 1 the
keys are the scores and one top_k does. Per-shard lists merge by rank (a binary search per entry;
lower shards win ties), so results equal one flat top_k. Hierarchical search takes the Hamming top
M the same way, with the inner products of those M, and re-ranks them stably.

Memory per device is O(C * I / b) for Hamming and hierarchical search and O(C * 2**17) for
continuous search (C users of the chunk on the device, I items of its shard).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hashgnn_jax.retrieval import codes as codes_lib
from hashgnn_jax.retrieval import continuous
from hashgnn_jax.retrieval import hamming
from hashgnn_jax.retrieval import layout
from hashgnn_jax.retrieval import selection as selection_lib

P, USERS, ITEMS = layout.P, layout.USERS, layout.ITEMS  # Short names for the specs below.

SEARCH_MODES = ("hamming", "hierarchical", "continuous")
SELECTIONS = ("auto", "top_k", "counting")


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
  offset = jax.lax.axis_index(ITEMS) * shard_items
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
    top_scores, top_pos = continuous.continuous_shard(
      z, user_z, exclude, block_size=block_size, tile_blocks=tile_blocks, counting=counting,
      **kwargs
    )
    return top_scores[None], (top_pos + offset)[None]
  # Hierarchical candidates are re-ranked anyway: counting may leave them in position order.
  top_scores, top_pos = hamming.hamming_shard(
    words, user_words, distances[0], exclude, counting=counting, ordered=mode == "hamming",
    **kwargs
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
  num_bits = words.shape[1] * codes_lib.WORD_BITS
  top = _rerank(inner, top_scores, num_results, num_bits=num_bits, counting=counting)  # [C, n]
  top_pos = jnp.take_along_axis(top_pos, top, axis=1)
  return jnp.take_along_axis(inner, top, axis=1)[None], (top_pos + offset)[None]


def _rerank(inner, hamming_scores, num_results, *, num_bits, counting):
  """Slots [C, n] of the stable re-rank of Hamming lists [C, M] by inner products [C, M].

  The stable re-rank is the order of (-inner product, distance, position). Lists hold each
  distance's candidates in position order, sorted by distance or not, so the slot can stand for
  the position. Without counting, lists come from top_k, sorted, and top_k's own tie rule (lower
  slots) is the stable one.
  """
  if not counting:
    return jax.lax.top_k(inner, num_results)[1]
  distances = hamming.as_distances(hamming_scores, num_bits)
  return selection_lib.smallest_indices(-inner, distances, num_results, max_tie=num_bits + 1)


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
  # With one item shard a shard's candidates are final, so the shard re-ranks them itself.
  rerank = hierarchical and mesh.shape[ITEMS] == 1
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
    in_specs=(P(ITEMS), P(ITEMS), P(USERS), P(USERS), P(ITEMS, USERS))
    + (P(None, USERS),) * len(extra_args),
    out_specs=(P(ITEMS, USERS),) * (3 if hierarchical and not rerank else 2),
  )
  shard_lists = shard_fn(words, z, user_words, user_z, distances, *extra_args)
  if hierarchical and not rerank:
    num_bits = words.shape[-1] * codes_lib.WORD_BITS
    if counting:
      # Lists may be unordered. Shards hold ascending position ranges and each list keeps its
      # ties in position order, so in the lists laid end to end a lower column is a lower
      # position among equal distances: the counted M best are the merged list, as a set.
      scores, top_pos, inner = (
        jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1) for x in shard_lists
      )  # [C, D * M]
      picked = selection_lib.smallest_set(
        hamming.as_distances(scores, num_bits), num_candidates, num_bits + 1
      )  # [C, M]
      scores, top_pos, inner = (jnp.take_along_axis(x, picked, axis=1)
                                for x in (scores, top_pos, inner))
    else:
      scores, top_pos, inner = _merge_shards(*shard_lists, num_results=num_candidates)  # [C, M]
    top = _rerank(inner, scores, num_results, num_bits=num_bits, counting=counting)  # [C, n]
    top_scores = jnp.take_along_axis(inner, top, axis=1)
    top_pos = jnp.take_along_axis(top_pos, top, axis=1)
  else:
    top_scores, top_pos = _merge_shards(*shard_lists, num_results=num_results)
  item_ids = jnp.where(jnp.isneginf(top_scores), -1, tie_order[jnp.minimum(top_pos, num_items - 1)])
  return item_ids, top_scores


class ItemIndex:
  """Device-resident item codes for exact Hamming, hierarchical and inner-product search.

  `devices` (default: all local devices) form a mesh of user shards × `item_shards`: each chunk's
  users are split over the first axis (items replicated) and the items over the second (lists
  merged). XLA's CPU top-k is single-threaded per device, so both put every core to work; user
  shards cost no merge, item shards divide the memory. `item_shards` defaults to all devices from
  `ITEM_SHARDING_FROM` items, else 1. `block_size` (default: automatic) sets the two-level
  selection of the module docstring; Hamming and hierarchical searches for long lists halve it
  (`_hamming_block_size`). `selection` picks how Hamming lists and the hierarchical
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
    item_shards, self.block_size = layout.index_layout(
        self.num_items, devices, item_shards=item_shards, block_size=block_size)
    self._mesh = jax.sharding.Mesh(
      np.array(devices).reshape(-1, item_shards), (USERS, ITEMS)
    )
    shard_items = -(-self.num_items // item_shards)
    if selection not in SELECTIONS:
      raise ValueError(f"Unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}.")
    self._counting = selection == "counting" or (
      selection == "auto" and devices[0].platform == "cpu"
    )
    blocks_needed = -(-shard_items // self.block_size)
    self._tile_blocks = min(blocks_needed, max(continuous.TILE_ITEMS // self.block_size, 1))
    blocks_per_shard = -(-blocks_needed // self._tile_blocks) * self._tile_blocks
    padded_items = item_shards * blocks_per_shard * self.block_size
    order = codes_lib.tie_break_order(self.num_items, tie_seed)
    self.tie_order = order
    self._item_positions = codes_lib.positions_of(order)
    # On every device, so that no search copies it there.
    replicated = jax.sharding.NamedSharding(self._mesh, P())
    self._tie_order = jax.device_put(order.astype(np.int32), replicated)  # [I]
    permuted = np.zeros((padded_items, self.num_bits), np.float32)
    permuted[:self.num_items] = item_z[order]
    words = np.asarray(codes_lib.pack_bits(permuted))  # [P, W]
    sharding = jax.sharding.NamedSharding(self._mesh, P(ITEMS))
    self._words = jax.device_put(words.reshape(item_shards, -1, words.shape[1]), sharding)
    self._z = jax.device_put(permuted.reshape(item_shards, -1, self.num_bits), sharding)
    self._shard_items = padded_items // item_shards
    # Where `block_distances_by_user` pays, the codes laid out [D, b, W, B] per block size b.
    self._users_major = (devices[0].platform == "cpu"
                         and words.nbytes // item_shards <= hamming.USERS_MAJOR_MAX_BYTES)
    self._words_by_offset = {}

  def _hamming_block_size(self, num_picks: int) -> int:
    """Block size of a Hamming or hierarchical search keeping `num_picks` blocks per shard.

    The layout's block size, halved while above sqrt(shard items / picks), where block keys and
    the picked blocks' items balance: the evaluation's M = 500 keeps 501 blocks, and at the
    automatic size (set for top-100 lists) it re-ranks 16 items per candidate at the Gowalla
    shape. Halving keeps the codes' layout: a block of b / 2 is half a block of b.
    """
    size = self.block_size
    while size % 2 == 0 and size * size * num_picks > self._shard_items:
      size //= 2
    return size

  def _distances(self, user_words, block_size: int):
    """Block distances [D, C, B] of a chunk's packed codes for blocks of `block_size`."""
    if not self._users_major:
      # Separate jits: fused with the transpose that selection needs, the key pass would loop
      # over users outermost and re-read every code once per user (3x slower, measured).
      return hamming.users_major(
        hamming.block_distances(self._words, user_words, mesh=self._mesh, block_size=block_size)
      )
    if block_size not in self._words_by_offset:
      words = np.asarray(self._words)  # [D, S, W], small: it fits the users-major bound.
      by_offset = words.reshape(words.shape[0], -1, block_size, words.shape[2])
      self._words_by_offset[block_size] = jax.device_put(
        by_offset.transpose(0, 2, 3, 1), self._words.sharding)
    return hamming.block_distances_by_user(self._words_by_offset[block_size], user_words,
                                           mesh=self._mesh)

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
      exclude = codes_lib.check_exclude(exclude, num_users=num_users, num_items=self.num_items)
      exclude = codes_lib.sorted_exclusions(exclude, self._item_positions, np.iinfo(np.int32).max)
    # Every user shard takes an equal part of the chunk.
    pad = -num_users % self._mesh.shape[USERS]
    user_z = jax.device_put(
      np.pad(user_z, ((0, pad), (0, 0))), jax.sharding.NamedSharding(self._mesh, P(USERS))
    )
    if exclude is not None:
      exclude = np.pad(exclude, ((0, pad), (0, 0)), constant_values=np.iinfo(np.int32).max)
    user_words = codes_lib.pack_bits(user_z)  # [C, W], sharded like user_z
    block_size, distances = self.block_size, None
    if mode != "continuous":
      block_size = self._hamming_block_size((num_candidates or num_results) + 1)
      distances = self._distances(user_words, block_size)
    # Whole blocks of padding get key -inf; the one block mixing items and padding may win on a
    # padded item, so it takes one extra pick (module docstring).
    num_picks_extra = int(self.num_items % block_size != 0)
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
      num_picks_extra=num_picks_extra,
      block_size=block_size,
      tile_blocks=self._tile_blocks,
      counting=self._counting,
    )
    item_ids = np.asarray(item_ids, dtype=np.int64)[:num_users]
    return item_ids, np.asarray(scores, dtype=np.float32)[:num_users]
