"""Binary hash codes and exact top-n retrieval over all items, one chunk of users at a time.

Continuous codes z in [-1, 1] become binary codes through sign(z) with sign(0) = +1, i.e. a bit is
1 iff z >= 0. Retrieval is exact (brute force over every item) and deterministic:

Tie-breaking rule. Among items with equal score, the item that comes earlier in the permutation
returned by `tie_break_order` ranks higher. Item arrays are stored permuted by that order, so the
rule follows from `jax.lax.top_k` returning the lower index first among equal values; positions are
mapped back to item ids at the end.

Excluded items (e.g. a user's training items) get score -inf, so they never outrank a kept item.
When fewer kept items than `num_results` exist, the tail of the ranking is filled with item id -1
and score -inf.

All work is per user chunk: memory is O(C * I) for C users in the chunk and I items.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32
SEARCH_MODES = ("hamming", "hierarchical", "continuous")


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


@jax.jit
def hamming_distances(user_words: jax.Array, item_words: jax.Array) -> jax.Array:
  """Hamming distances [C, I] (int32) between packed codes [C, W] and [I, W]."""
  if user_words.shape[1] != item_words.shape[1]:
    raise ValueError(
      f"Word counts differ: users have {user_words.shape[1]}, items have {item_words.shape[1]}."
    )
  distances = jnp.zeros((user_words.shape[0], item_words.shape[0]), jnp.int32)  # [C, I]
  # Accumulating one word at a time keeps the live intermediate at [C, I] instead of [C, I, W].
  for w in range(user_words.shape[1]):
    diff = user_words[:, w, None] ^ item_words[None, :, w]  # [C, I]
    distances = distances + jax.lax.population_count(diff).astype(jnp.int32)
  return distances


def tie_break_order(num_items: int, seed: int) -> np.ndarray:
  """Seeded random permutation of item ids; earlier items win ties (see module docstring)."""
  return np.random.default_rng(seed).permutation(num_items)


def _positions_of(tie_order: np.ndarray) -> np.ndarray:
  """Inverse permutation: position of each item id within `tie_order`."""
  positions = np.empty_like(tie_order)
  positions[tie_order] = np.arange(tie_order.shape[0], dtype=tie_order.dtype)
  return positions


def _check_exclude(exclude, *, num_users: int, num_items: int) -> np.ndarray:
  """Validates a padded [C, L] exclusion array of item ids and returns it as int32."""
  exclude = np.asarray(exclude)
  if exclude.ndim != 2 or exclude.shape[0] != num_users:
    raise ValueError(f"exclude must have shape [{num_users}, L], got {exclude.shape}.")
  if not np.issubdtype(exclude.dtype, np.integer):
    raise ValueError(f"exclude must hold integer item ids, got dtype {exclude.dtype}.")
  if exclude.size and (exclude.min() < -1 or exclude.max() >= num_items):
    raise ValueError(f"exclude ids must lie in [0, {num_items}) or be -1 padding.")
  return exclude.astype(np.int32)


def _mask_excluded(scores: jax.Array, exclude, positions: jax.Array) -> jax.Array:
  """Sets scores [C, I] (item axis permuted) of excluded item ids [C, L] to -inf."""
  if exclude is None:
    return scores
  num_users, num_items = scores.shape
  # Padding (-1) goes to an out-of-range column, which mode="drop" discards.
  columns = jnp.where(exclude >= 0, positions[jnp.maximum(exclude, 0)], num_items)  # [C, L]
  rows = jnp.broadcast_to(jnp.arange(num_users)[:, None], columns.shape)  # [C, L]
  return scores.at[rows, columns].set(-jnp.inf, mode="drop")


def _to_item_ids(scores: jax.Array, positions: jax.Array, tie_order: jax.Array) -> jax.Array:
  """Maps permuted positions [C, n] to item ids, with -1 where the score is -inf (excluded)."""
  return jnp.where(jnp.isneginf(scores), -1, tie_order[positions])


@functools.partial(jax.jit, static_argnames=("mode", "num_results", "num_candidates"))
def _search_chunk(
  item_words: jax.Array,  # [I, W], permuted
  item_z: jax.Array,  # [I, K], permuted
  tie_order: jax.Array,  # [I]
  item_positions: jax.Array,  # [I]
  user_z: jax.Array,  # [C, K]
  exclude,  # [C, L] or None
  *,
  mode: str,
  num_results: int,
  num_candidates: int | None,
) -> tuple[jax.Array, jax.Array]:
  """Exact top-n search for one chunk of users; returns (item ids, scores), each [C, n]."""
  if mode == "continuous":
    scores = jnp.matmul(user_z, item_z.T, precision=jax.lax.Precision.HIGHEST)  # [C, I]
    scores = _mask_excluded(scores, exclude, item_positions)
    top_scores, top_pos = jax.lax.top_k(scores, num_results)  # [C, n]
    return _to_item_ids(top_scores, top_pos, tie_order), top_scores

  # Float keys: lax.top_k on int32 lowers to a full sort on CPU; distances <= K are exact.
  distances = hamming_distances(pack_bits(user_z), item_words)  # [C, I]
  scores = _mask_excluded(-distances.astype(jnp.float32), exclude, item_positions)
  if mode == "hamming":
    top_scores, top_pos = jax.lax.top_k(scores, num_results)  # [C, n]
    return _to_item_ids(top_scores, top_pos, tie_order), top_scores

  cand_scores, cand_pos = jax.lax.top_k(scores, num_candidates)  # [C, M], in Hamming rank order
  # A full [C, I] product keeps memory at O(C * I), unlike gathering [C, M, K] candidate codes.
  inner = jnp.matmul(user_z, item_z.T, precision=jax.lax.Precision.HIGHEST)  # [C, I]
  cand_inner = jnp.take_along_axis(inner, cand_pos, axis=1)  # [C, M]
  # Excluded candidates must stay below every kept one after re-ranking too.
  cand_inner = jnp.where(jnp.isneginf(cand_scores), -jnp.inf, cand_inner)
  # top_k prefers lower columns among ties, i.e. the better Hamming rank: a stable re-rank.
  top_scores, top_cols = jax.lax.top_k(cand_inner, num_results)  # [C, n]
  top_pos = jnp.take_along_axis(cand_pos, top_cols, axis=1)  # [C, n]
  return _to_item_ids(top_scores, top_pos, tie_order), top_scores


class ItemIndex:
  """Device-resident item codes for exact Hamming, hierarchical and inner-product search."""

  def __init__(self, item_z, *, tie_seed: int):
    item_z = np.asarray(item_z, dtype=np.float32)
    if item_z.ndim != 2 or item_z.shape[0] == 0:
      raise ValueError(f"item_z must have shape [I, K] with I > 0, got {item_z.shape}.")
    self.num_items, self.num_bits = item_z.shape
    order = tie_break_order(self.num_items, tie_seed)
    self.tie_order = order
    self._tie_order = jnp.asarray(order, dtype=jnp.int32)  # [I]
    self._positions = jnp.asarray(_positions_of(order), dtype=jnp.int32)  # [I]
    self._z = jnp.asarray(item_z[order])  # [I, K]
    self._words = pack_bits(self._z)  # [I, W]

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
    if exclude is not None:
      exclude = _check_exclude(exclude, num_users=user_z.shape[0], num_items=self.num_items)
    item_ids, scores = _search_chunk(
      self._words,
      self._z,
      self._tie_order,
      self._positions,
      user_z,
      exclude,
      mode=mode,
      num_results=num_results,
      num_candidates=num_candidates,
    )
    return np.asarray(item_ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)


@functools.partial(jax.jit, static_argnames=("num_users", "num_results"))
def _rank_shared_scores(
  permuted_scores: jax.Array,  # [I]
  tie_order: jax.Array,  # [I]
  positions: jax.Array,  # [I]
  exclude,  # [C, L] or None
  *,
  num_users: int,
  num_results: int,
) -> jax.Array:
  """Ranks one score vector for every user of a chunk, honouring exclusions; ids [C, n]."""
  scores = jnp.broadcast_to(permuted_scores, (num_users, permuted_scores.shape[0]))  # [C, I]
  scores = _mask_excluded(scores, exclude, positions)
  top_scores, top_pos = jax.lax.top_k(scores, num_results)  # [C, n]
  return _to_item_ids(top_scores, top_pos, tie_order)


def rank_by_item_score(
  item_scores,
  *,
  num_results: int,
  tie_order,
  exclude=None,
  num_users: int | None = None,
) -> np.ndarray:
  """Ranks items by one user-independent score (e.g. popularity); item ids int64 [C, n].

  Exactly one of `exclude` ([C, L] item ids, -1 padded) or `num_users` (C) sets the chunk size.
  Scores are compared in float32 (integer counts are exact below 2**24); ties follow `tie_order`.
  """
  item_scores = np.asarray(item_scores, dtype=np.float32)
  if item_scores.ndim != 1:
    raise ValueError(f"item_scores must have shape [I], got {item_scores.shape}.")
  num_items = item_scores.shape[0]
  tie_order = np.asarray(tie_order)
  is_permutation = np.array_equal(np.sort(tie_order), np.arange(num_items))
  if tie_order.shape != (num_items,) or not is_permutation:
    raise ValueError(f"tie_order must be a permutation of range({num_items}).")
  if (exclude is None) == (num_users is None):
    raise ValueError("Pass exactly one of exclude (per-user exclusions) or num_users.")
  if not 1 <= num_results <= num_items:
    raise ValueError(f"num_results={num_results} must lie in [1, num_items={num_items}].")
  if exclude is not None:
    num_users = np.shape(exclude)[0]
    exclude = _check_exclude(exclude, num_users=num_users, num_items=num_items)
  item_ids = _rank_shared_scores(
    jnp.asarray(item_scores[tie_order]),
    jnp.asarray(tie_order, dtype=jnp.int32),
    jnp.asarray(_positions_of(tie_order), dtype=jnp.int32),
    exclude,
    num_users=num_users,
    num_results=num_results,
  )
  return np.asarray(item_ids, dtype=np.int64)
