"""Exact sorting and k-smallest selection along the last axis with bitonic sorting networks.

Why: XLA's CPU top_k is a single-threaded partial sort whose final ordering of k ~ 100 entries
costs several microseconds per row however short the row, and its sort calls a comparator per
comparison. A bitonic network is a fixed schedule of compare-exchange passes over whole arrays,
which XLA vectorises. Measured on 6,144 rows of int32 keys in calls of 256 rows (2-core CPU): the
128 smallest of N = 512 in 39 ms against top_k's 103, of N = 1,024 in 56 against 142, of N = 4,096
in 213 against 233; a full sort of 128 in 12 ms against top_k's 43.

Selection is the bitonic top-k of Shanbhag et al. (2018): a row is cut into chunks of
w = 2**ceil(log2 k), sorted ascending and descending in turn; the elementwise minimum of an
ascending and a descending chunk is a bitonic sequence holding the w smallest of the pair, which a
bitonic merge sorts; pairs halve until one chunk is left. Work is ~log2(w)**2 / 4 compare-exchanges
per entry, so for long rows (N >> w) a heap-based top_k is cheaper.

Where only the set of the k smallest is wanted, in column order, and values are small integers,
`smallest_set` counts instead of sorting: a binary search over values finds the k-th smallest, a
prefix count of the chosen entries, packed 32 to a word, gives each slot its column by two more
binary searches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hashgnn_jax.retrieval import codes as codes_lib


def _min_max(firsts, seconds):
  """Compare-exchange of single key arrays: (smaller,), (larger,)."""
  (a,), (b,) = firsts, seconds
  return (jnp.minimum(a, b),), (jnp.maximum(a, b),)


def _lexicographic(firsts, seconds):
  """Compare-exchange of (key, index) pairs ordered by key, then index; keys are never NaN."""
  (key_a, index_a), (key_b, index_b) = firsts, seconds
  swap = (key_b < key_a) | ((key_b == key_a) & (index_b < index_a))
  smaller = (jnp.where(swap, key_b, key_a), jnp.where(swap, index_b, index_a))
  larger = (jnp.where(swap, key_a, key_b), jnp.where(swap, index_a, index_b))
  return smaller, larger


def _stage(arrays, distance, descending, exchange):
  """One pass: entry i against i + distance in each group of 2 * distance entries.

  descending: NumPy bool [groups], True where a group is ordered largest first.
  """
  *rows, n = arrays[0].shape
  groups = n // (2 * distance)
  halves = [x.reshape(*rows, groups, 2, distance) for x in arrays]
  smaller, larger = exchange([h[..., 0, :] for h in halves], [h[..., 1, :] for h in halves])
  if descending.any():
    flip = descending[:, None]  # [groups, 1]
    smaller, larger = (
      [jnp.where(flip, b, a) for a, b in zip(smaller, larger)],
      [jnp.where(flip, a, b) for a, b in zip(smaller, larger)],
    )
  return [jnp.stack([a, b], axis=-2).reshape(*rows, n) for a, b in zip(smaller, larger)]


def _merge_runs(arrays, size, exchange, *, alternate):
  """Sorts each bitonic run of `size` (a power of two) entries, odd runs descending if asked."""
  n = arrays[0].shape[-1]
  distance = size // 2
  while distance:
    starts = np.arange(0, n, 2 * distance)  # Of each group; a group lies within one run.
    descending = (starts & size) != 0 if alternate else np.zeros(starts.shape, bool)
    arrays = _stage(arrays, distance, descending, exchange)
    distance //= 2
  return arrays


def _sort_chunks(arrays, width, exchange, *, alternate):
  """Sorts every chunk of `width` (a power of two) entries; odd chunks descending if `alternate`."""
  size = 2
  while size <= width:
    # Sorted runs of alternating direction pair into bitonic runs of twice the size.
    arrays = _merge_runs(arrays, size, exchange, alternate=size < width or alternate)
    size *= 2
  return arrays


def _pad(x, multiple, fill):
  """Pads the last axis of x with `fill` up to a multiple of `multiple`."""
  extra = -x.shape[-1] % multiple
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=fill)


def _largest_value(dtype):
  return jnp.inf if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).max


def smallest(keys, k: int):
  """The k smallest entries of keys [..., N] along the last axis, ascending: [..., k].

  Equal keys are interchangeable, so no tie rule is needed; callers pack a tie-breaker into the
  key. Float keys must not be NaN.
  """
  n = keys.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, {n}].")
  width = 1 << (k - 1).bit_length()
  fill = _largest_value(keys.dtype)
  # Fill entries sort last, so they never displace a key.
  keys = _pad(keys, width, fill)
  num_chunks = keys.shape[-1] // width
  (keys,) = _sort_chunks([keys], width, _min_max, alternate=num_chunks > 1)
  while num_chunks > 1:
    # A constant chunk is sorted both ways, so it pairs with whatever chunk is left over.
    keys = _pad(keys, 2 * width, fill)
    pairs = keys.reshape(*keys.shape[:-1], -1, 2, width)
    keys = jnp.minimum(pairs[..., 0, :], pairs[..., 1, :]).reshape(*keys.shape[:-1], -1)
    num_chunks = keys.shape[-1] // width
    # Alternating again while chunks remain to pair; the last one ascending.
    (keys,) = _merge_runs([keys], width, _min_max, alternate=num_chunks > 1)
  return keys[..., :k]


def _ordered_int32(keys):
  """int32 keys, or float32 keys mapped to int32 in the same order (-0.0 and 0.0 equal): [..., N].

  A float's bits read as an int order non-negative floats correctly and negative ones in reverse,
  so the negative ones get their 31 low bits flipped.
  """
  if keys.dtype == jnp.int32:
    return keys
  return _total_order_int32(jnp.where(keys == 0, 0.0, keys).astype(jnp.float32))


def argsort(keys, ties=None, *, max_tie: int = 0):
  """Stable ascending argsort by (key, tie) of keys [..., N]: int32 [..., N].

  Equal (key, tie) pairs keep their index order. ties: None (all equal), or ints [..., N] in
  [0, max_tie]. Keys must not be NaN; -0.0 and 0.0 compare equal. float32 and int32 keys in rows
  of up to 1,024 entries take two sorts of single int32 keys (`_packed_argsort`) where the packed
  fields fit 31 bits; others a network over (key, tie and index) pairs, whose compare-exchange
  costs several times a min/max.
  """
  n = keys.shape[-1]
  width = 1 << max(n - 1, 0).bit_length()
  index_bits = max(width - 1, 1).bit_length()
  tie_bits = max_tie.bit_length()
  if index_bits + tie_bits > 31:
    raise ValueError(f"max_tie={max_tie} and {n} entries do not fit an int32 with the index.")
  ties = jnp.zeros(keys.shape, jnp.int32) if ties is None else ties.astype(jnp.int32)
  if keys.dtype in (jnp.float32, jnp.int32) and 3 * index_bits + tie_bits <= 31:
    return _packed_argsort(_ordered_int32(keys), ties, width, index_bits, tie_bits)[..., :n]
  # Padding carries the largest key and tie and indices beyond every real one, so it sorts last.
  keys = _pad(keys, width, _largest_value(keys.dtype))
  index = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), keys.shape)
  ties_index = (_pad(ties, width, (1 << tie_bits) - 1) << index_bits) | index
  _, ties_index = _sort_chunks([keys, ties_index], width, _lexicographic, alternate=False)
  return ties_index[..., :n] & ((1 << index_bits) - 1)


# Odd-even transposition passes between `_packed_argsort`'s two sorts: they order every run of up
# to this many entries, so the second sort runs only where a longer run is out of order.
_RUN_PASSES = 3


def _odd_even_passes(keys, passes: int):
  """`passes` odd-even transposition passes over keys [..., N] (N even), starting with pairs 0-1."""
  for p in range(passes):
    # Pass p compares entries (2i + p % 2, 2i + 1 + p % 2); an odd pass leaves both ends alone.
    inner = keys if p % 2 == 0 else keys[..., 1:-1]
    pairs = inner.reshape(*inner.shape[:-1], -1, 2)
    lower, upper = jnp.min(pairs, axis=-1), jnp.max(pairs, axis=-1)
    inner = jnp.stack([lower, upper], axis=-1).reshape(inner.shape)
    keys = inner if p % 2 == 0 else jnp.concatenate([keys[..., :1], inner, keys[..., -1:]], -1)
  return keys


def _packed_argsort(keys, ties, width: int, index_bits: int, tie_bits: int):
  """Stable argsort by (key, tie) of int32 keys [..., N] via two packed min/max sorts: [..., width].

  First by (the key's high 32 - index_bits bits, index) packed in one int32; entries whose high
  bits agree then lie in runs, and an order by (run number, the key's low bits, tie, index),
  3 * index_bits + tie_bits bits, orders each run by the whole key and the tie. Both orders agree
  across runs, so the result is the order of (key, tie, index). Runs of float keys are short: for
  the hierarchical re-rank of random codes at three Table 4 shapes, 4% of users had two of their
  100 inner products share the high 25 bits and none of 4,096 had three. So odd-even passes sort
  the runs, and the second full sort runs only when a longer run is still out of order somewhere
  in the call (equal keys with equal ties, e.g. duplicate items, are in order already).
  """
  mask = (1 << index_bits) - 1
  # Padding gets the largest key and tie and indices beyond every real one, so it sorts last.
  keys = _pad(keys, width, _largest_value(jnp.int32))
  ties = _pad(ties, width, (1 << tie_bits) - 1)
  positions = jnp.arange(width, dtype=jnp.int32)
  (first,) = _sort_chunks([(keys & ~mask) | positions], width, _min_max, alternate=False)
  high = first & ~mask
  starts = jnp.concatenate(
    [jnp.zeros_like(high[..., :1], bool), high[..., 1:] != high[..., :-1]], axis=-1)
  # Runs numbered by a prefix count of their starts: XLA's cummax (a reduce-window) cost more.
  run = _prefix_counts(starts.reshape(-1, width)).reshape(starts.shape)
  index = first & mask
  low = jnp.take_along_axis(keys, index, axis=-1) & mask
  tie = jnp.take_along_axis(ties, index, axis=-1)
  second = (((((run << index_bits) | low) << tie_bits) | tie) << index_bits) | index
  if width >= 2:
    second = _odd_even_passes(second, _RUN_PASSES)
  # Packed keys are distinct (the index), so a sorted row increases strictly.
  in_order = jnp.all(second[..., 1:] > second[..., :-1])
  second = jax.lax.cond(
    in_order,
    lambda x: x,
    lambda x: _sort_chunks([x], width, _min_max, alternate=False)[0],
    second,
  )
  return second & mask


def _prefix_counts(x, block=32):
  """Inclusive cumulative sums along the last axis of small non-negative integers x [C, N], int32.

  Two float32 matmuls with triangular ones (within blocks of `block`, then over block totals):
  XLA's CPU cumsum (an associative scan) measured 2x slower. Sums must stay below 2**24, where
  float32 is exact.
  """
  rows, n = x.shape
  x = _pad(x.astype(jnp.float32), block, 0)
  num_blocks = x.shape[1] // block
  # HIGHEST: by default JAX lets a GPU round float32 matmul inputs to TF32 (11 significant bits)
  # and a TPU to bfloat16 (8); the packed counts and block totals need all 24. CPUs compute
  # float32 either way.
  matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  upper = jnp.triu(jnp.ones((block, block), jnp.float32))
  within = matmul(x.reshape(rows, num_blocks, block), upper)  # [C, num_blocks, block]
  # Each block's offset is the sum of the blocks before it.
  before = jnp.triu(jnp.ones((num_blocks, num_blocks), jnp.float32), 1)
  offsets = matmul(within[:, :, -1], before)  # [C, num_blocks]
  return (within + offsets[:, :, None]).reshape(rows, -1)[:, :n].astype(jnp.int32)


def _popcount(words):
  return jax.lax.population_count(words).astype(jnp.int32)


def _nth_set_bit(words, n):
  """Bit position of the n-th (from 0) set bit of each uint32 word; n < popcount(words), int32.

  A binary search over halves, quarters, ... of the word: five popcounts, no loop over bits. A
  loop rather than unrolled steps: XLA:CPU fused the unrolled result, a column list, into every
  consumer, and recomputing it per entry of the gathers that follow made a hierarchical M = 500
  search 1.7x slower; a loop's result is computed once.
  """
  def halve(step, state):
    position, n = state
    width = jnp.right_shift(16, step)  # 16, 8, 4, 2, 1
    low_mask = (jnp.uint32(1) << width.astype(jnp.uint32)) - 1
    low = _popcount((words >> position.astype(jnp.uint32)) & low_mask)
    higher = n >= low
    return jnp.where(higher, position + width, position), jnp.where(higher, n - low, n)

  return jax.lax.fori_loop(0, 5, halve, (jnp.zeros_like(n), n))[0]


def smallest_set(values, k: int, max_value: int):
  """Columns of the k smallest (value, column) pairs of values [C, N], ascending: int32 [C, k].

  values: integers in [0, max_value], or uint32 values of any size (max_value up to 2**32 - 1).
  Ties take the lower columns, as `jax.lax.top_k` of -values would; the result is the same set as
  top_k's, in column order rather than value order.

  The k-th smallest value t comes from a binary search over values; the entries below t and the
  first ties at t are then packed as bits into words of 32 columns, and slot s finds its word by a
  binary search over the words' prefix counts and its column by a binary search within the word.
  Counting words rather than columns cuts the prefix count and the search 32-fold: at N = 8,016,
  k = 500 (hierarchical M = 500 at the Gowalla shape) 28 ms per 512 rows against 76 for prefix
  counts over columns, and top_k's 86 (2-core CPU).
  """
  n = values.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, {n}].")
  # Narrow values make each pass of the search read a quarter of the bytes.
  if values.dtype != jnp.uint32:
    values = values.astype(jnp.uint8 if max_value < 256 else jnp.int32)
  count_dtype = jnp.uint32 if values.dtype == jnp.uint32 else jnp.int32

  # The k-th smallest value: the least t with at least k values <= t. A loop rather than unrolled
  # passes: XLA:CPU fuses the producer of `values` into every pass (in retrieval it once fused a
  # transpose of the block distances into all of them, a third of a Hamming search at the
  # Pinterest shape), while a loop's operand is computed once.
  def halve(_, bounds):
    low, high = bounds
    middle = low + (high - low) // 2  # low + high may overflow 32 bits.
    enough = jnp.sum(values <= middle.astype(values.dtype), axis=1, keepdims=True,
                     dtype=jnp.int32) >= k
    return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

  # Shaped after `values`, so that under shard_map the bounds vary over the same mesh axes.
  low = jnp.zeros_like(values[:, :1], count_dtype)  # [C, 1]
  high = low + jnp.asarray(max_value, count_dtype)
  _, high = jax.lax.fori_loop(0, max(max_value, 1).bit_length(), halve, (low, high))
  high = high.astype(values.dtype)
  below = codes_lib.pack_flags(values < high)  # [C, W]
  at = codes_lib.pack_flags(values == high)
  # Slots left for ties go to the lowest columns at t: each word keeps its first `keep` ties.
  room = k - jnp.sum(_popcount(below), axis=1, keepdims=True)  # [C, 1]
  at_counts = _popcount(at)
  keep = jnp.clip(room - (_prefix_counts(at_counts) - at_counts), 0, at_counts)  # [C, W]
  # Where a word keeps some but not all of its ties, the bits below its keep-th tie.
  kept_ties = (jnp.uint32(1) << _nth_set_bit(at, jnp.clip(keep, 0, 31)).astype(jnp.uint32)) - 1
  chosen = below | jnp.where(keep == at_counts, at, at & kept_ties)  # [C, W], k bits a row
  counts = _popcount(chosen)
  ends = _prefix_counts(counts)  # [C, W]: chosen columns up to each word's end
  slots = jnp.arange(k, dtype=jnp.int32)
  # Slot s lies in the first word whose end count exceeds s.
  word = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)  # [C, k]
  rank = slots - (jnp.take_along_axis(ends, word, axis=1)
                  - jnp.take_along_axis(counts, word, axis=1))
  bit = _nth_set_bit(jnp.take_along_axis(chosen, word, axis=1), rank)
  return word * codes_lib.WORD_BITS + bit


def _total_order_int32(keys):
  """float32 keys [..., N] (not NaN) as int32 in XLA's total order (-0.0 just below 0.0).

  `jax.lax.top_k` ranks 0.0 above -0.0, so `top_k` below keeps them apart too.
  """
  bits = jax.lax.bitcast_convert_type(keys, jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def largest_set(keys, k: int):
  """Columns of the k largest float32 keys [C, N] (not NaN), ties to lower columns, ascending.

  `smallest_set` over the keys' bits as uint32 values in reverse order: a binary search of 32
  passes for the k-th largest key, then the same counting. The set `jax.lax.top_k` picks, in
  column order.
  """
  ordered = jax.lax.bitcast_convert_type(_total_order_int32(keys), jnp.uint32)
  # Flipping the sign bit would order them unsigned; flipping the other 31 too reverses that.
  return smallest_set(ordered ^ jnp.uint32(0x7FFFFFFF), k, 0xFFFFFFFF)


def top_k(keys, k: int):
  """`jax.lax.top_k` of float32 keys [C, N] (not NaN): the same values and columns [C, k].

  The k largest by counting (`largest_set`), then ordered by a stable `argsort`, so that equal
  keys keep their lower columns first as top_k's do.
  """
  columns = largest_set(keys, k)  # [C, k]
  values = jnp.take_along_axis(keys, columns, axis=1)
  # Negated, the total order's int32 cannot overflow: its magnitude is at most 2**31 - 2**23 + 1.
  order = argsort(-_total_order_int32(values))
  return jnp.take_along_axis(values, order, axis=1), jnp.take_along_axis(columns, order, axis=1)


def smallest_indices(keys, ties, k: int, *, max_tie: int = 0):
  """`argsort(keys, ties, max_tie=max_tie)[..., :k]` of float32 or int32 keys [C, N]: [C, k].

  A sorting network over all N entries costs ~log2(N)**2 / 4 compare-exchanges each; this takes
  the w = 2**bit_length(k) smallest of (key's high bits, index) packed into one int32 key
  (`smallest`), then argsorts those w exactly. Where the k-th entry's high bits are below the
  w-th's, every entry that could be among the k smallest is among the w; a call with any row
  where they are not (many keys equal in their high bits) sorts whole rows instead. Hierarchical
  re-rank at M = 500, n = 100: 6.7 ms per 512 rows against top_k's 11.5 (2-core CPU).
  """
  n = keys.shape[-1]
  width = 1 << k.bit_length()
  if width >= n:
    return argsort(keys, ties, max_tie=max_tie)[..., :k]
  index_bits = (n - 1).bit_length()
  mask = (1 << index_bits) - 1
  ordered = _ordered_int32(keys)
  first = smallest((ordered & ~mask) | jnp.arange(n, dtype=jnp.int32), width)  # [C, w]
  high = first & ~mask
  exact = jnp.all(high[:, k - 1] < high[:, -1])
  index = first & mask

  def few(_):
    picked_ties = None if ties is None else jnp.take_along_axis(ties, index, axis=1)
    pick = argsort(jnp.take_along_axis(keys, index, axis=1), picked_ties, max_tie=max_tie)[:, :k]
    return jnp.take_along_axis(index, pick, axis=1)

  def whole(_):
    return argsort(keys, ties, max_tie=max_tie)[:, :k]

  return jax.lax.cond(exact, few, whole, None)
