"""How an index lays items out over devices and blocks, and the re-rank of picked blocks' items.

Devices form a mesh of user shards (`USERS`: a chunk's users split, items replicated) × item
shards (`ITEMS`: contiguous position ranges); within a shard, positions are cut into blocks of b
consecutive positions whose best scores are the first level of the two-level selection (`index`).
"""

import jax
import jax.numpy as jnp
import numpy as np

USERS, ITEMS = "users", "items"  # Mesh axes: a chunk's users, and the item shards.
P = jax.sharding.PartitionSpec
# Upper bound of the automatic block size. CPU: larger blocks measured slower in the fused key pass.
# Elsewhere 128, measured on a GPU (H200, Alibaba shape, 4,096 users a call, top-100): Hamming
# search took 17.3 ms at b = 128 against 23.2 at 64 for K = 32, and 23.3 against 135 for K = 64,
# where XLA split the key pass at b = 64 into six kernels (TPUs unmeasured).
_MAX_BLOCK_SIZE = {"cpu": 64}
_MAX_BLOCK_SIZE_ELSEWHERE = 128
# Default item sharding from this many items: below it, splitting users costs no merge.
ITEM_SHARDING_FROM = 1 << 21


def top_items(picked, scores, excluded, *, valid_items, num_results, top_k=jax.lax.top_k):
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



def auto_block_size(shard_items: int, platform: str) -> int:
  """About sqrt(items / 128), a power of two: balances block keys against re-ranked candidates.

  Capped at `_MAX_BLOCK_SIZE` for the devices' `platform` ("cpu", "gpu", ...).

  Counting selection alone would favour larger blocks (Gowalla's 40,981 items: Hamming search
  293 ms at b = 32 against 343 at b = 16, 6,144 users). They were kept because hierarchical
  search with M = 500 then ranked twice the candidates on top_k (1.72 s against 1.39 s on 2
  devices); it now counts and searches halved blocks (`ItemIndex._hamming_block_size`), and
  larger layout blocks are not yet re-measured.
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
    item_shards = len(devices) if num_items >= ITEM_SHARDING_FROM else 1
  if item_shards < 1 or len(devices) % item_shards:
    raise ValueError(f"item_shards={item_shards} must divide the {len(devices)} devices.")
  if block_size is not None and block_size < 1:
    raise ValueError(f"block_size={block_size} must be >= 1.")
  shard_items = -(-num_items // item_shards)
  return item_shards, block_size or auto_block_size(shard_items, devices[0].platform)
