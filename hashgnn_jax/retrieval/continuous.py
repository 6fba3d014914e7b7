"""Exact inner-product top lists of one item shard: a scan over tiles of items, no [C, I] array."""

import jax
import jax.numpy as jnp

from hashgnn_jax.retrieval import layout
from hashgnn_jax.retrieval import selection as selection_lib

P, USERS, ITEMS = layout.P, layout.USERS, layout.ITEMS  # Short names for the specs below.

# Items per tile of the continuous scan: 2**17 measured fastest of 2**13 .. 2**18 at 4.2M items.
TILE_ITEMS = 1 << 17


def continuous_shard(z, user_z, exclude, *, block_size, tile_blocks, valid_items, num_picks,
                      num_results, counting):
  """Exact inner-product top list (scores, local positions) [C, n] of one shard.

  z [S, K] by local position; user_z [C, K]; exclude: local positions [C, L], S for the rest, or
  None. The [C, S] products never exist at once: a scan over tiles of `tile_blocks` blocks keeps
  the best `num_picks` blocks with their scores, gathered from the tile's own product so that
  they equal the block keys bit for bit. counting: blocks and items are chosen by
  `selection.top_k` and `selection.largest_set` instead of `jax.lax.top_k` (the same lists).
  """
  top_k = selection_lib.top_k if counting else jax.lax.top_k
  num_users = user_z.shape[0]
  tile_items = tile_blocks * block_size
  num_blocks = z.shape[0] // block_size
  single_tile = num_blocks == tile_blocks
  # Counted blocks of a single tile come in block order: no keys to merge, no sort.
  in_block_order = single_tile and counting
  rows = jnp.arange(num_users)[:, None]

  def tile_best(tile):
    """The tile's best min(n', T) blocks: keys (None if in_block_order) and block ids [C, m],
    scores [C, m, b]."""
    start = tile * tile_items
    tile_z = jax.lax.dynamic_slice_in_dim(z, start, tile_items)  # [T * b, K]
    # Users-major: block keys and the picked blocks' scores then need no transpose.
    scores = jnp.einsum("ck,tk->ct", user_z, tile_z, precision=jax.lax.Precision.HIGHEST)
    if exclude is not None:
      local = exclude - start  # [C, L]
      local = jnp.where((local >= 0) & (local < tile_items), local, tile_items)
      scores = scores.at[rows, local].set(-jnp.inf, mode="drop")
    scores = scores.reshape(num_users, tile_blocks, block_size)  # [C, T, b]
    keys = jnp.max(scores, axis=2)
    blocks = tile * tile_blocks + jnp.arange(tile_blocks)  # [T]
    keys = jnp.where(blocks * block_size < valid_items, keys, -jnp.inf)
    if in_block_order:
      top = selection_lib.largest_set(keys, min(num_picks, tile_blocks))  # [C, m]
      tile_keys = None
    else:
      tile_keys, top = top_k(keys, min(num_picks, tile_blocks))  # [C, m]
    return tile_keys, blocks[top], scores[rows, top]

  def merge_tile(best, tile):
    # Kept blocks come first: they have lower indices, so they win ties as a flat top_k would.
    keys, blocks, scores = (jnp.concatenate(pair, axis=1) for pair in zip(best, tile_best(tile)))
    keys, keep = top_k(keys, num_picks)  # [C, n']
    blocks = jnp.take_along_axis(blocks, keep, axis=1)
    return (keys, blocks, jnp.take_along_axis(scores, keep[:, :, None], axis=1)), None

  if single_tile:
    keys, blocks, block_scores = tile_best(0)
  else:
    # Placeholders: block B lies beyond every real position, with no score to win.
    best = (
      jnp.full((num_users, num_picks), -jnp.inf),
      jnp.full((num_users, num_picks), num_blocks, jnp.int32),
      jnp.full((num_users, num_picks, block_size), -jnp.inf),
    )
    # The carry varies over shards once a tile is merged in, so it must start out that way too.
    best = jax.lax.pcast(best, (USERS, ITEMS), to="varying")
    tiles = jnp.arange(num_blocks // tile_blocks)
    (keys, blocks, block_scores), _ = jax.lax.scan(merge_tile, best, tiles)
  if block_size == 1 and not in_block_order:  # Blocks are items, ranked with ties in order.
    return keys[:, :num_results], blocks[:, :num_results]
  if not in_block_order:  # Blocks in key order: the items' tie rule needs them in block order.
    order = jnp.argsort(blocks, axis=1)  # [C, n']
    blocks = jnp.take_along_axis(blocks, order, axis=1)
    block_scores = jnp.take_along_axis(block_scores, order[:, :, None], axis=1)
  return layout.top_items(blocks, block_scores, None, valid_items=valid_items,
                          num_results=num_results, top_k=top_k)
