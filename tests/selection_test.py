"""Tests for hashgnn_jax.selection against NumPy sorts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashgnn_jax.retrieval import selection


@pytest.mark.parametrize(
  "num_entries, k", [(1, 1), (5, 3), (17, 17), (128, 101), (300, 101), (1025, 7), (3000, 100)]
)
def test_smallest_matches_numpy_sort(num_entries, k):
  rng = np.random.default_rng(num_entries)
  # Few distinct values: many ties, and padding must not displace equal keys.
  ints = rng.integers(0, 40, (6, num_entries)).astype(np.int32)
  # Jitted: op by op, each of a network's hundreds of small stages would compile on its own.
  smallest = jax.jit(selection.smallest, static_argnums=1)
  np.testing.assert_array_equal(smallest(ints, k), np.sort(ints, axis=1)[:, :k])
  floats = rng.standard_normal((2, 3, num_entries)).astype(np.float32)
  floats[..., ::4] = -np.inf
  floats[..., 1::7] = np.inf
  np.testing.assert_array_equal(smallest(floats, k), np.sort(floats, axis=-1)[..., :k])


def test_smallest_rejects_bad_k():
  with pytest.raises(ValueError, match="k=4 must lie in"):
    selection.smallest(jnp.zeros((2, 3), jnp.int32), 4)
  with pytest.raises(ValueError, match="k=0 must lie in"):
    selection.smallest_set(jnp.zeros((2, 3), jnp.int32), 0, 5)


@pytest.mark.parametrize("num_entries", [1, 2, 100, 128, 129])
def test_argsort_is_stable(num_entries):
  rng = np.random.default_rng(num_entries)
  keys = rng.integers(-3, 4, (5, num_entries)).astype(np.float32) / 2
  keys[:, ::5] = -np.inf
  got = jax.jit(selection.argsort)(keys)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argsort(keys, axis=1, kind="stable"))


@pytest.mark.parametrize("num_entries", [3, 100, 1024, 1025])
def test_argsort_orders_keys_that_differ_in_their_lowest_bits(num_entries):
  # Neighbouring floats share all but their last bits, so the first of the two packed sorts sees
  # them as equal and the second must order them; 1,025 entries take the (key, index) network.
  rng = np.random.default_rng(num_entries)
  keys = rng.standard_normal((4, num_entries)).astype(np.float32)
  keys[:, 1::3] = np.nextafter(keys[:, 0::3][:, :len(range(1, num_entries, 3))], -np.inf)
  keys[:, 2::7] = keys[:, :1]
  keys[:, ::11] = np.inf
  keys[:, 5::11] = -np.inf
  got = jax.jit(selection.argsort)(keys)
  np.testing.assert_array_equal(got, np.argsort(keys, axis=1, kind="stable"))
  ints = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, keys.shape, np.int32)
  ints[:, 1::3] = ints[:, 0::3][:, :len(range(1, num_entries, 3))] ^ 1
  ints[:, ::5] = np.iinfo(np.int32).max
  ints[:, 2::5] = np.iinfo(np.int32).min
  got = jax.jit(selection.argsort)(ints)
  np.testing.assert_array_equal(got, np.argsort(ints, axis=1, kind="stable"))


def test_argsort_by_hand_treats_signed_zeros_as_equal():
  keys = jnp.array([[0.0, -0.0, -1.0, 0.0, -0.0]], jnp.float32)
  np.testing.assert_array_equal(jax.jit(selection.argsort)(keys), [[2, 0, 1, 3, 4]])


@pytest.mark.parametrize(
  # 129 entries with ties up to 1,000 need 3 * 8 + 10 bits: the (key, tie and index) network.
  "num_entries, max_tie", [(1, 3), (2, 1), (100, 33), (128, 1000), (129, 65), (129, 1000)]
)
def test_argsort_orders_equal_keys_by_tie_then_index(num_entries, max_tie):
  rng = np.random.default_rng(num_entries + max_tie)
  floats = rng.integers(-3, 4, (6, num_entries)).astype(np.float32) / 2
  floats[:, ::7] = -np.inf
  # The largest keys with the largest tie: padding, which holds both, must still sort last.
  floats[:, 2::9] = np.inf
  ints = rng.integers(-3, 4, floats.shape).astype(np.int32)
  ints[:, 2::9] = np.iinfo(np.int32).max
  ties = rng.integers(0, max_tie + 1, floats.shape).astype(np.int32)
  ties[:, 1::5] = max_tie
  ties[:, 2::9] = max_tie
  argsort = jax.jit(selection.argsort, static_argnames="max_tie")
  index = np.broadcast_to(np.arange(num_entries), floats.shape)
  for keys in (floats, ints):
    got = argsort(keys, ties, max_tie=max_tie)
    np.testing.assert_array_equal(got, np.lexsort((index, ties, keys), axis=1))


def test_argsort_rejects_ties_that_do_not_fit():
  with pytest.raises(ValueError, match="max_tie=1048576 and 2048 entries"):
    selection.argsort(jnp.zeros((1, 2048)), jnp.zeros((1, 2048), jnp.int32), max_tie=1 << 20)


@pytest.mark.parametrize("run_length", [2, 3, 40])
def test_argsort_orders_runs_of_keys_that_share_their_high_bits(run_length):
  # Keys of a run differ in their 7 low bits only and come in descending order, so the first
  # packed sort leaves each run reversed: odd-even passes mend runs of 2 and 3, a run of 40 needs
  # the second full sort.
  rng = np.random.default_rng(run_length)
  num_entries = 120
  bases = np.sort(rng.choice(1 << 20, num_entries // run_length + 1, replace=False)) << 7
  keys = np.concatenate([base + np.arange(run_length)[::-1] for base in bases])[:num_entries]
  keys = np.stack([keys, rng.permutation(keys), keys[::-1]]).astype(np.int32)
  got = jax.jit(selection.argsort)(keys)
  np.testing.assert_array_equal(got, np.argsort(keys, axis=1, kind="stable"))


def _reference_set(values, k):
  """Columns of the k smallest (value, column) pairs per row, ascending."""
  return np.sort(np.stack([np.lexsort((np.arange(row.size), row))[:k] for row in values]), axis=1)


@pytest.mark.parametrize(
  "num_entries, k, max_value",
  # Rows that end inside a word; M = 500 over 501 blocks of 16 (hierarchical search's item level)
  # with many and with few distinct values; a non-power-of-two list over values past uint8.
  [(1, 1, 0), (5, 5, 3), (37, 20, 1), (100, 7, 0), (988, 101, 33), (5000, 300, 65),
   (8016, 500, 33), (8016, 500, 1), (1001, 333, 300), (64, 64, 2)],
)
def test_smallest_set_matches_lexsort(num_entries, k, max_value):
  rng = np.random.default_rng(k)
  values = rng.integers(0, max_value + 1, (9, num_entries)).astype(np.int32)
  got = jax.jit(lambda v: selection.smallest_set(v, k, max_value))(values)
  np.testing.assert_array_equal(got, _reference_set(values, k))


def test_smallest_set_of_uint32_values_spans_all_32_bits():
  # Values past 2**31 would overflow a signed midpoint in the binary search.
  rng = np.random.default_rng(5)
  values = rng.integers(0, 1 << 32, (6, 700), dtype=np.uint64).astype(np.uint32)
  values[:, ::9] = 0xFFFFFFFF
  values[:, 3::9] = values[:, 4::9][:, :values[:, 3::9].shape[1]]  # Ties.
  values[0] = 0xFFFFFFFF  # All equal at the largest value.
  got = jax.jit(lambda v: selection.smallest_set(v, 250, 0xFFFFFFFF))(values)
  np.testing.assert_array_equal(got, _reference_set(values.astype(np.int64), 250))


def _float_keys(rng, rows, num_entries):
  """Inner-product-like keys with what top_k must rank exactly: ties, neighbouring floats,
  -inf (excluded items), +inf, and signed zeros, which top_k ranks 0.0 above -0.0."""
  keys = rng.standard_normal((rows, num_entries)).astype(np.float32)
  keys[:, ::5] = np.round(keys[:, ::5])  # Ties, -0.0 among them.
  keys[:, 1::7] = np.nextafter(keys[:, ::7][:, :keys[:, 1::7].shape[1]], np.inf)
  keys[:, 2::9] = -np.inf
  keys[0, :] = -np.inf
  keys[1, ::2] = 0.0
  keys[1, 1::2] = -0.0
  keys[2, ::3] = np.inf
  return keys


@pytest.mark.parametrize("num_entries, k", [(1, 1), (9, 9), (300, 100), (1616, 100), (2562, 101),
                                            (5000, 500), (1000, 333)])
def test_float_top_k_equals_lax_top_k(num_entries, k):
  keys = _float_keys(np.random.default_rng(num_entries), 5, num_entries)
  values, columns = jax.jit(selection.top_k, static_argnums=1)(keys, k)
  want_values, want_columns = jax.lax.top_k(keys, k)
  np.testing.assert_array_equal(columns, want_columns)
  np.testing.assert_array_equal(np.signbit(values), np.signbit(want_values))
  np.testing.assert_array_equal(values, want_values)
  # Against NumPy: descending by the keys' total order, ties to lower columns.
  # -0.0 as a float64 between every negative float32 and 0.0.
  total = -np.where((keys == 0) & np.signbit(keys), -1e-300, keys.astype(np.float64))
  want = [np.lexsort((np.arange(num_entries), row))[:k] for row in total]
  np.testing.assert_array_equal(columns, want)
  np.testing.assert_array_equal(jax.jit(selection.largest_set, static_argnums=1)(keys, k),
                                np.sort(want, axis=1))


def test_nth_set_bit_matches_bit_scan():
  rng = np.random.default_rng(3)
  words = rng.integers(0, 1 << 32, 400, dtype=np.uint64).astype(np.uint32)
  words[:3] = [1, 1 << 31, 0xFFFFFFFF]
  counts = np.array([bin(w).count("1") for w in words])
  n = (rng.random(400) * counts).astype(np.int32)
  want = [[j for j in range(32) if w >> j & 1][c] for w, c in zip(words, n)]
  np.testing.assert_array_equal(jax.jit(selection._nth_set_bit)(words, n), want)


def test_smallest_set_by_hand():
  # Threshold 2: both 1s, then the first two of the three 2s.
  values = np.array([[2, 5, 1, 2, 2, 1, 3]], np.int32)
  got = jax.jit(selection.smallest_set, static_argnums=(1, 2))(values, 4, 5)
  np.testing.assert_array_equal(got, [[0, 2, 3, 5]])


@pytest.mark.parametrize("num_entries, k", [(500, 100), (500, 500), (300, 63), (1000, 127), (9, 2)])
@pytest.mark.parametrize("distinct", [True, False])
def test_smallest_indices_matches_lexsort(num_entries, k, distinct):
  rng = np.random.default_rng(num_entries + k)
  if distinct:  # Inner products: mostly distinct, a run of equal keys, excluded entries at inf.
    keys = rng.standard_normal((7, num_entries)).astype(np.float32)
    keys[:, 5:40] = keys[:, 3:4]
    keys[:, ::11] = np.inf
  else:  # Few values: the k-th entry shares its high bits with the w-th, so whole rows sort.
    keys = rng.integers(-2, 3, (7, num_entries)).astype(np.float32)
  ties = rng.integers(0, 34, keys.shape).astype(np.int32)
  got = jax.jit(lambda a, b: selection.smallest_indices(a, b, k, max_tie=33))(keys, ties)
  want = [np.lexsort((np.arange(num_entries), t, key))[:k] for key, t in zip(keys, ties)]
  np.testing.assert_array_equal(got, want)
  got = jax.jit(lambda a: selection.smallest_indices(a, None, k))(keys)
  np.testing.assert_array_equal(got, np.argsort(keys, axis=1, kind="stable")[:, :k])
