"""Binary codes and what every search shares: bit packing, popcount distances, the tie rule and
exclusion lists.

A bit is 1 iff z >= 0 (sign(0) = +1). Tie rule: among items of equal score, the item earlier in
`tie_break_order`'s seeded permutation ranks higher; indexes store items permuted by it, so every
selection prefers the lower position (`index` module docstring).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32


def num_words(num_bits: int) -> int:
  """Number of uint32 words needed to hold `num_bits` bits."""
  return -(-num_bits // WORD_BITS)


def pack_flags(flags: jax.Array) -> jax.Array:
  """Packs bool flags [..., N] into uint32 [..., ceil(N / 32)]; word w bit j is flag 32w + j."""
  *rows, n = flags.shape
  width = num_words(n)
  # Zero padding bits: for codes they are identical for every code, so never add to a distance.
  bits = jnp.pad(flags.astype(jnp.uint32), [(0, 0)] * len(rows) + [(0, width * WORD_BITS - n)])
  bits = bits.reshape(*rows, width, WORD_BITS)  # [..., W, 32]
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  # The shifted bits are disjoint powers of two, so their sum is their bitwise OR.
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)  # [..., W]


@jax.jit
def pack_bits(codes: jax.Array) -> jax.Array:
  """Packs sign bits of codes [n, K] into uint32 [n, ceil(K / 32)]; word w bit j is code 32w + j."""
  return pack_flags(codes >= 0)


def popcount_distance(words_a: jax.Array, words_b: jax.Array, axis: int = -1) -> jax.Array:
  """Hamming distances (int32) between packed codes, words along `axis`, the rest broadcast."""
  word = functools.partial(jax.lax.index_in_dim, axis=axis, keepdims=False)
  # One word at a time, so a fused loop never holds a [..., W] intermediate.
  return sum(
    jax.lax.population_count(word(words_a, w) ^ word(words_b, w)).astype(jnp.int32)
    for w in range(words_a.shape[axis])
  )



def tie_break_order(num_items: int, seed: int) -> np.ndarray:
  """Seeded random permutation of item ids; earlier items win ties (see module docstring)."""
  return np.random.default_rng(seed).permutation(num_items)


def positions_of(tie_order: np.ndarray) -> np.ndarray:
  """Inverse permutation: position of each item id within `tie_order`."""
  positions = np.empty_like(tie_order)
  positions[tie_order] = np.arange(tie_order.shape[0], dtype=tie_order.dtype)
  return positions


def check_exclude(exclude, *, num_users: int, num_items: int) -> np.ndarray:
  """Validates a padded [C, L] exclusion array of item ids and returns it as int64."""
  exclude = np.asarray(exclude)
  if exclude.ndim != 2 or exclude.shape[0] != num_users:
    raise ValueError(f"exclude must have shape [{num_users}, L], got {exclude.shape}.")
  if not np.issubdtype(exclude.dtype, np.integer):
    raise ValueError(f"exclude must hold integer item ids, got dtype {exclude.dtype}.")
  if exclude.size and (exclude.min() < -1 or exclude.max() >= num_items):
    raise ValueError(f"exclude ids must lie in [0, {num_items}) or be -1 padding.")
  return exclude.astype(np.int64)


def sorted_exclusions(exclude: np.ndarray, item_positions: np.ndarray, sentinel: int):
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
