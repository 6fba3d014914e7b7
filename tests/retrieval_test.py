"""Tests for hashgnn_jax.retrieval (codes, layout, ItemIndex) against brute-force NumPy
references."""

import jax
import numpy as np
import pytest

from hashgnn_jax.retrieval import codes as codes_lib
from hashgnn_jax.retrieval import continuous
from hashgnn_jax.retrieval import hamming
from hashgnn_jax.retrieval import index as retrieval
from hashgnn_jax.retrieval import layout


def _grid_codes(rng, shape):
  """Codes on a 1/4 grid (zeros included): inner products are exact, so ties are real ties."""
  return (rng.integers(-4, 5, size=shape) / 4).astype(np.float32)


def _reference_pack(codes):
  """Bit-by-bit Python packing, LSB first within each 32-bit word."""
  n, k = codes.shape
  words = np.zeros((n, -(-k // 32)), dtype=np.uint64)
  for row in range(n):
    for bit in range(k):
      if codes[row, bit] >= 0:
        words[row, bit // 32] += 1 << (bit % 32)
  return words.astype(np.uint32)


def _reference_distances(user_z, item_z):
  """Number of differing signs, with sign(0) = +1."""
  user_sign = np.where(user_z >= 0, 1, -1)
  item_sign = np.where(item_z >= 0, 1, -1)
  return (user_sign[:, None, :] != item_sign[None, :, :]).sum(axis=-1)  # [C, I]


def _reference_rank(scores, tie_order):
  """Item ids [C, I] sorted by score descending, ties by position in tie_order."""
  positions = np.argsort(tie_order)
  return np.stack([np.lexsort((positions, -row)) for row in scores])


def _exclusion_mask(exclude, num_items):
  mask = np.zeros((exclude.shape[0], num_items), dtype=bool)
  for row, ids in enumerate(exclude):
    mask[row, ids[ids >= 0]] = True
  return mask


def _reference_search(user_z, item_z, tie_order, *, mode, num_results, num_candidates, exclude):
  """Brute-force NumPy version of ItemIndex.search (float64 scores, -1 for excluded fill)."""
  inner = user_z.astype(np.float64) @ item_z.astype(np.float64).T  # [C, I]
  hamming = -_reference_distances(user_z, item_z).astype(np.float64)  # [C, I]
  if exclude is not None:
    mask = _exclusion_mask(exclude, item_z.shape[0])
    inner[mask] = -np.inf
    hamming[mask] = -np.inf
  if mode == "continuous":
    ranked = _reference_rank(inner, tie_order)[:, :num_results]
    scores = np.take_along_axis(inner, ranked, axis=1)
  elif mode == "hamming":
    ranked = _reference_rank(hamming, tie_order)[:, :num_results]
    scores = np.take_along_axis(hamming, ranked, axis=1)
  else:
    candidates = _reference_rank(hamming, tie_order)[:, :num_candidates]  # [C, M]
    cand_inner = np.take_along_axis(inner, candidates, axis=1)
    cand_inner[np.isneginf(np.take_along_axis(hamming, candidates, axis=1))] = -np.inf
    # Stable re-rank: equal inner products keep their Hamming order.
    order = np.stack([np.lexsort((np.arange(row.size), -row)) for row in cand_inner])
    ranked = np.take_along_axis(candidates, order, axis=1)[:, :num_results]
    scores = np.take_along_axis(cand_inner, order, axis=1)[:, :num_results]
  return np.where(np.isneginf(scores), -1, ranked), scores


def test_pack_bits_hand_example():
  codes = np.full((2, 34), -0.5, dtype=np.float32)
  codes[0, [0, 3, 31]] = [0.0, 0.7, 1.0]  # z == 0 counts as a set bit
  codes[1, 33] = 0.0
  expected = np.array([[1 + 8 + 2**31, 0], [0, 2]], dtype=np.uint32)
  np.testing.assert_array_equal(np.asarray(codes_lib.pack_bits(codes)), expected)


@pytest.mark.parametrize("num_bits", [32, 40, 64, 96])
def test_pack_bits_matches_reference(num_bits):
  codes = _grid_codes(np.random.default_rng(num_bits), (7, num_bits))
  words = np.asarray(codes_lib.pack_bits(codes))
  assert words.dtype == np.uint32
  assert words.shape == (7, -(-num_bits // 32))
  np.testing.assert_array_equal(words, _reference_pack(codes))


def test_pack_bits_padding_bits_are_zero():
  words = np.asarray(codes_lib.pack_bits(np.ones((3, 40), dtype=np.float32)))
  np.testing.assert_array_equal(words, np.array([[2**32 - 1, 2**8 - 1]] * 3, dtype=np.uint32))


def test_pack_flags_over_leading_axes():
  flags = np.random.default_rng(5).random((2, 3, 70)) < 0.5
  words = np.asarray(codes_lib.pack_flags(flags))
  assert words.shape == (2, 3, 3) and words.dtype == np.uint32
  np.testing.assert_array_equal(words.reshape(6, 3),
                                _reference_pack(np.where(flags, 1.0, -1.0).reshape(6, 70)))


@pytest.mark.parametrize("num_bits", [32, 40, 64, 96])
def test_popcount_distance_matches_reference(num_bits):
  rng = np.random.default_rng(num_bits + 1)
  user_z = rng.uniform(-1, 1, (9, num_bits)).astype(np.float32)
  item_z = rng.uniform(-1, 1, (23, num_bits)).astype(np.float32)
  user_words, item_words = codes_lib.pack_bits(user_z), codes_lib.pack_bits(item_z)
  distances = codes_lib.popcount_distance(user_words[:, None, :], item_words[None, :, :])
  assert distances.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(distances), _reference_distances(user_z, item_z))


def test_tie_break_order_is_seeded_permutation():
  order = codes_lib.tie_break_order(50, seed=3)
  np.testing.assert_array_equal(np.sort(order), np.arange(50))
  np.testing.assert_array_equal(order, codes_lib.tie_break_order(50, seed=3))
  assert not np.array_equal(order, codes_lib.tie_break_order(50, seed=4))


def test_hamming_ties_follow_tie_order_by_hand():
  # Every item flips exactly one (different) bit of the user code: all four are at distance 1.
  item_z = np.ones((4, 32), dtype=np.float32)
  item_z[np.arange(4), [0, 5, 17, 31]] = -1.0
  np.testing.assert_array_equal(codes_lib.tie_break_order(4, seed=0), [2, 0, 1, 3])
  index = retrieval.ItemIndex(item_z, tie_seed=0)
  ids, scores = index.search(np.ones((1, 32), np.float32), mode="hamming", num_results=4)
  np.testing.assert_array_equal(ids, [[2, 0, 1, 3]])
  np.testing.assert_array_equal(scores, [[-1.0, -1.0, -1.0, -1.0]])
  # Moving item 1 to distance 0 puts it first; the rest keep their tie order.
  item_z[1] = 1.0
  index = retrieval.ItemIndex(item_z, tie_seed=0)
  ids, scores = index.search(np.ones((1, 32), np.float32), mode="hamming", num_results=4)
  np.testing.assert_array_equal(ids, [[1, 2, 0, 3]])
  np.testing.assert_array_equal(scores, [[0.0, -1.0, -1.0, -1.0]])


@pytest.mark.parametrize("selection", ["counting", "top_k"])
@pytest.mark.parametrize("num_bits, use_exclude", [(32, False), (64, True)])
def test_search_matches_numpy_reference(num_bits, use_exclude, selection):
  rng = np.random.default_rng(num_bits)
  num_items, num_users = 301, 17
  item_z = _grid_codes(rng, (num_items, num_bits))
  user_z = _grid_codes(rng, (num_users, num_bits))
  exclude = None
  if use_exclude:
    exclude = np.full((num_users, 40), -1, dtype=np.int64)
    for row in range(num_users):
      count = rng.integers(0, 41)
      exclude[row, :count] = rng.choice(num_items, size=count, replace=False)
  index = retrieval.ItemIndex(item_z, tie_seed=7, selection=selection)
  tie_order = codes_lib.tie_break_order(num_items, seed=7)
  for mode, num_candidates in [("hamming", None), ("continuous", None), ("hierarchical", 60)]:
    kwargs = {"mode": mode, "num_results": 25, "num_candidates": num_candidates, "exclude": exclude}
    ids, scores = index.search(user_z, **kwargs)
    want_ids, want_scores = _reference_search(user_z, item_z, tie_order, **kwargs)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids, err_msg=mode)
    np.testing.assert_array_equal(scores, want_scores.astype(np.float32), err_msg=mode)
    assert np.all(ids >= 0), mode  # 40 exclusions never exhaust 301 items
    if exclude is not None:
      for row in range(num_users):
        assert not set(ids[row]) & set(exclude[row]), mode


def _tied_search_inputs(seed, num_items, num_users, num_bits):
  """Items drawn from five distinct codes (every score ties ~num_items / 5 ways), exclusions."""
  rng = np.random.default_rng(seed)
  pool = _grid_codes(rng, (5, num_bits))
  item_z = pool[rng.integers(0, 5, num_items)]
  user_z = np.concatenate([pool[:2], _grid_codes(rng, (num_users - 2, num_bits))])
  exclude = np.full((num_users, num_items), -1, dtype=np.int64)
  for row in range(num_users):
    # Unsorted, with repeats and padding in between; row 0 excludes all but three items.
    count = num_items - 3 if row == 0 else rng.integers(0, num_items // 2)
    exclude[row, :count] = rng.choice(num_items, size=count, replace=row == 1)
    rng.shuffle(exclude[row])
  return item_z, user_z, exclude


@pytest.mark.parametrize(
  "num_devices, item_shards, block_size, tile_items",
  [
    (1, 1, 1, 1 << 17),
    (1, 1, 8, 16),
    (4, 4, 3, 6),
    (4, 2, 8, 1 << 17),  # Two user shards × two item shards.
    (4, 1, 4, 16),  # Nine users over four user shards need padding.
  ],
)
@pytest.mark.parametrize("users_major", [True, False])
def test_two_level_sharded_search_matches_flat_reference(monkeypatch, num_devices, item_shards,
                                                         block_size, tile_items, users_major):
  # Several tiles per shard exercise the continuous scan's running merge.
  monkeypatch.setattr(continuous, "TILE_ITEMS", tile_items)
  # Block distances users-major (small shards on CPU) or blocks-major and transposed.
  monkeypatch.setattr(hamming, "USERS_MAJOR_MAX_BYTES", (1 << 30) if users_major else -1)
  # 403 items leave a partial block and padding; 6 results keep picks below the block counts.
  num_items, num_users = 403, 9
  item_z, user_z, exclude = _tied_search_inputs(block_size, num_items, num_users, 64)
  index = retrieval.ItemIndex(
    item_z,
    tie_seed=3,
    devices=jax.devices()[:num_devices],
    item_shards=item_shards,
    block_size=block_size,
  )
  tie_order = codes_lib.tie_break_order(num_items, seed=3)
  for use_exclude in (False, True):
    for mode, num_candidates in [("hamming", None), ("continuous", None), ("hierarchical", 20)]:
      kwargs = {
        "mode": mode,
        "num_results": 6,
        "num_candidates": num_candidates,
        "exclude": exclude if use_exclude else None,
      }
      ids, scores = index.search(user_z, **kwargs)
      want_ids, want_scores = _reference_search(user_z, item_z, tie_order, **kwargs)
      np.testing.assert_array_equal(ids, want_ids, err_msg=f"{mode} {use_exclude}")
      np.testing.assert_array_equal(scores, want_scores.astype(np.float32), err_msg=mode)
      if use_exclude:
        assert np.all(ids[0, 3:] == -1), mode  # Only three items are left to user 0.


@pytest.mark.parametrize("ordered_per_slot, unordered_per_slot", [(1, 1), (4, 1), (1, 3), (4, 4)])
def test_counting_falls_back_to_top_k_with_equal_results(monkeypatch, ordered_per_slot,
                                                         unordered_per_slot):
  # Rows longer than entries-per-slot x the picks rounded up to a power of two go to top_k; the
  # choice of blocks and hierarchical candidates are unordered lists, Hamming results ordered.
  # Blocks of 4 give 101 block keys; Hamming picks 7 blocks (8 slots, 28 candidates), hierarchical
  # 21 (32 slots, 84 candidates). At (1, 1) every selection falls back; at (4, 1) Hamming counts
  # its candidates only; at (1, 3) hierarchical counts its candidates only; at (4, 4) Hamming
  # counts its candidates and hierarchical both.
  monkeypatch.setattr(hamming, "_COUNTING_ENTRIES_PER_SLOT", ordered_per_slot)
  monkeypatch.setattr(hamming, "_UNORDERED_ENTRIES_PER_SLOT", unordered_per_slot)
  item_z, user_z, exclude = _tied_search_inputs(ordered_per_slot, 403, 9, 64)
  indexes = [
    retrieval.ItemIndex(item_z, tie_seed=3, block_size=4, selection=selection)
    for selection in ("counting", "top_k")
  ]
  for use_exclude in (False, True):
    for mode, num_candidates in [("hamming", None), ("hierarchical", 20)]:
      kwargs = {
        "mode": mode,
        "num_results": 6,
        "num_candidates": num_candidates,
        "exclude": exclude if use_exclude else None,
      }
      (ids, scores), (want_ids, want_scores) = (index.search(user_z, **kwargs) for index in indexes)
      np.testing.assert_array_equal(ids, want_ids, err_msg=f"{mode} {use_exclude}")
      np.testing.assert_array_equal(scores, want_scores, err_msg=f"{mode} {use_exclude}")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
  "item_shards, block_size, num_users", [(1, 16, 40), (1, 5, 7), (2, 1, 40), (2, 8, 13)]
)
def test_search_at_500_candidates_matches_reference(tied, item_shards, block_size, num_users):
  # The evaluation's M = 500 and a non-power-of-two M = 333 over 3,001 items (a partial block):
  # tied codes make every score tie hundreds of ways (the re-rank sorts whole rows); grid codes
  # leave inner products mostly distinct (it sorts the 128 best only).
  num_items = 3001
  if tied:
    item_z, user_z, exclude = _tied_search_inputs(block_size, num_items, num_users, 32)
  else:
    rng = np.random.default_rng(block_size)
    item_z, user_z = _grid_codes(rng, (num_items, 32)), _grid_codes(rng, (num_users, 32))
    exclude = rng.integers(-1, num_items, (num_users, 200))
  tie_order = codes_lib.tie_break_order(num_items, seed=5)
  for selection in ("counting", "top_k"):
    index = retrieval.ItemIndex(item_z, tie_seed=5, devices=jax.devices()[:2],
                                item_shards=item_shards, block_size=block_size,
                                selection=selection)
    for mode, num_results, num_candidates in [
      ("hamming", 100, None), ("hamming", 500, None), ("hierarchical", 100, 500),
      ("hierarchical", 50, 333), ("continuous", 100, None),
    ]:
      kwargs = {"mode": mode, "num_results": num_results, "num_candidates": num_candidates,
                "exclude": exclude}
      ids, scores = index.search(user_z, **kwargs)
      want_ids, want_scores = _reference_search(user_z, item_z, tie_order, **kwargs)
      message = f"{selection} {mode} {num_results} {num_candidates}"
      np.testing.assert_array_equal(ids, want_ids, err_msg=message)
      np.testing.assert_array_equal(scores, want_scores.astype(np.float32), err_msg=message)


def test_auto_block_size_is_about_sqrt_items_over_128_capped_per_platform():
  # Alibaba's 4,167,708 items: sqrt(32,560) ~ 180, above both caps.
  assert layout.auto_block_size(4_167_708, "cpu") == 64
  assert layout.auto_block_size(4_167_708, "gpu") == 128
  # Gowalla's 40,981 items: sqrt(320) ~ 17.9, rounded down to a power of two, below both caps.
  assert layout.auto_block_size(40_981, "cpu") == 16
  assert layout.auto_block_size(40_981, "gpu") == 16
  assert layout.auto_block_size(10, "cpu") == 1


def test_long_lists_search_halved_blocks():
  # Gowalla's 40,981 items: blocks of 16 for top-100 lists; M = 500 (501 picks) halves them
  # while b * b * picks exceeds the shard's (padded) items: 16 -> 8, as sqrt(40,992 / 501) ~ 9.
  gowalla = retrieval.ItemIndex(np.ones((40_981, 8), np.float32), tie_seed=0,
                                devices=jax.devices()[:1])
  assert gowalla.block_size == 16
  assert gowalla._hamming_block_size(101) == 16
  assert gowalla._hamming_block_size(501) == 8
  assert gowalla._hamming_block_size(40_981) == 1
  # An odd block size cannot be halved and stays.
  odd = retrieval.ItemIndex(np.ones((3_000, 8), np.float32), tie_seed=0,
                            devices=jax.devices()[:1], block_size=5)
  assert odd._hamming_block_size(501) == 5


def test_index_layout_is_the_layout_an_index_takes():
  devices = jax.devices()[:2]
  item_z = np.random.default_rng(0).normal(size=(5_000, 32)).astype(np.float32)
  # 5,000 items: sqrt(39) ~ 6.2 -> blocks of 4, one item shard below the sharding threshold.
  assert layout.index_layout(5_000, devices) == (1, 4)
  assert retrieval.ItemIndex(item_z, tie_seed=0, devices=devices).block_size == 4
  # Each shard holds half the items: sqrt(19) ~ 4.4 -> blocks of 4 still; 2 shards asked for.
  assert layout.index_layout(5_000, devices, item_shards=2) == (2, 4)
  assert layout.index_layout(5_000, devices, block_size=8) == (1, 8)
  # From the sharding threshold on, the items spread over every device.
  assert layout.index_layout(layout.ITEM_SHARDING_FROM, devices)[0] == 2
  with pytest.raises(ValueError, match="block_size=0 must be >= 1"):
    layout.index_layout(5_000, devices, block_size=0)


def test_padding_never_displaces_items():
  # Padding codes are z = 0: distance 0 and inner product 0 to an all-ones user, better than any
  # item here, so the block mixing items and padding wins a pick it must not use up.
  rng = np.random.default_rng(5)
  item_z = -rng.uniform(0.1, 1.0, (403, 32)).astype(np.float32)  # 403 = 4 * 100 + 3
  flips = rng.random(item_z.shape) < 0.2
  item_z[flips] = 0.01  # A few set bits spread the Hamming distances; inner products stay < 0.
  user_z = np.ones((1, 32), np.float32)
  index = retrieval.ItemIndex(item_z, tie_seed=0, devices=jax.devices()[:1], block_size=4)
  tie_order = codes_lib.tie_break_order(403, seed=0)
  for mode, num_candidates in [("hamming", None), ("continuous", None), ("hierarchical", 8)]:
    kwargs = {"mode": mode, "num_results": 8, "num_candidates": num_candidates, "exclude": None}
    ids, scores = index.search(user_z, **kwargs)
    want_ids, want_scores = _reference_search(user_z, item_z, tie_order, **kwargs)
    np.testing.assert_array_equal(ids, want_ids, err_msg=mode)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, err_msg=mode)


def test_hamming_distance_multiset_is_tie_independent():
  rng = np.random.default_rng(0)
  # Same shapes as the search test above, so the compiled search is reused.
  item_z = rng.uniform(-1, 1, (301, 32)).astype(np.float32)
  user_z = rng.uniform(-1, 1, (17, 32)).astype(np.float32)
  want = np.sort(_reference_distances(user_z, item_z), axis=1)[:, :25]
  for seed in (0, 1):
    index = retrieval.ItemIndex(item_z, tie_seed=seed)
    ids, scores = index.search(user_z, mode="hamming", num_results=25)
    np.testing.assert_array_equal(-scores, want)
    got = np.take_along_axis(_reference_distances(user_z, item_z), ids, axis=1)
    np.testing.assert_array_equal(got, want)


def test_exclusion_padding_is_ignored_and_fill_is_minus_one():
  rng = np.random.default_rng(1)
  item_z = _grid_codes(rng, (6, 32))
  user_z = _grid_codes(rng, (2, 32))
  tie_order = codes_lib.tie_break_order(6, seed=0)
  index = retrieval.ItemIndex(item_z, tie_seed=0)
  # Row 0 keeps only item 4; row 1 is all padding, so it must rank exactly as with no exclusion.
  exclude = np.array([[0, 1, 2, 3, 5, -1], [-1, -1, -1, -1, -1, -1]])
  for mode in retrieval.SEARCH_MODES:
    num_candidates = 6 if mode == "hierarchical" else None
    kwargs = {"mode": mode, "num_results": 3, "num_candidates": num_candidates}
    ids, scores = index.search(user_z, exclude=exclude, **kwargs)
    np.testing.assert_array_equal(ids[0], [4, -1, -1])
    assert np.isfinite(scores[0, 0]) and np.all(np.isneginf(scores[0, 1:]))
    want_ids, want_scores = _reference_search(user_z, item_z, tie_order, exclude=None, **kwargs)
    np.testing.assert_array_equal(ids[1], want_ids[1])
    np.testing.assert_array_equal(scores[1], want_scores[1].astype(np.float32))


def test_hierarchical_rerank_keeps_excluded_candidates_last():
  # All four items are Hamming candidates; item 0 has the best inner product but is excluded, so
  # the re-rank must keep it below item 3 (distance 2, inner product -2).
  item_z = np.array([[1.0, 1.0], [0.5, 0.5], [0.25, 0.25], [-1.0, -1.0]], dtype=np.float32)
  index = retrieval.ItemIndex(item_z, tie_seed=0)
  ids, scores = index.search(
    np.ones((1, 2), np.float32),
    mode="hierarchical",
    num_results=4,
    num_candidates=4,
    exclude=np.array([[0]]),
  )
  np.testing.assert_array_equal(ids, [[1, 2, 3, -1]])
  np.testing.assert_array_equal(scores, [[1.0, 0.5, -2.0, -np.inf]])


def test_search_validation_errors():
  index = retrieval.ItemIndex(np.ones((10, 32), np.float32), tie_seed=0)
  user_z = np.ones((2, 32), np.float32)
  with pytest.raises(ValueError, match="hamming, hierarchical, continuous"):
    index.search(user_z, mode="cosine", num_results=3)
  with pytest.raises(ValueError, match="num_results=5, num_candidates=4"):
    index.search(user_z, mode="hierarchical", num_results=5, num_candidates=4)
  with pytest.raises(ValueError, match="num_candidates=11"):
    index.search(user_z, mode="hierarchical", num_results=5, num_candidates=11)
  with pytest.raises(ValueError, match="num_candidates=None"):
    index.search(user_z, mode="hierarchical", num_results=5)
  with pytest.raises(ValueError, match="num_results=11"):
    index.search(user_z, mode="hamming", num_results=11)
  with pytest.raises(ValueError, match="shape"):
    index.search(np.ones((2, 16), np.float32), mode="hamming", num_results=3)
  with pytest.raises(ValueError, match="exclude ids"):
    index.search(user_z, mode="hamming", num_results=3, exclude=np.array([[10], [0]]))


def test_item_index_validation_errors():
  item_z = np.ones((10, 32), np.float32)
  with pytest.raises(ValueError, match="item_shards=3 must divide the 4 devices"):
    retrieval.ItemIndex(item_z, tie_seed=0, devices=jax.devices()[:4], item_shards=3)
  with pytest.raises(ValueError, match="block_size=-1"):
    retrieval.ItemIndex(item_z, tie_seed=0, block_size=-1)
  with pytest.raises(ValueError, match="Unknown selection 'heap'; valid: auto, top_k, counting"):
    retrieval.ItemIndex(item_z, tie_seed=0, selection="heap")


def test_exclusion_widths_are_powers_of_two():
  # One compiled shape serves every chunk whose longest exclusion row rounds up alike.
  positions = np.arange(10)[::-1]  # Item i sits at position 9 - i.
  exclude = np.array([[4, 1, 7, -1, -1, -1, -1], [2, -1, 5, 0, 8, -1, -1]])
  np.testing.assert_array_equal(
    codes_lib.sorted_exclusions(exclude, positions, sentinel=99), [[2, 5, 8, 99], [1, 4, 7, 9]]
  )
  np.testing.assert_array_equal(  # Three columns widen to four.
    codes_lib.sorted_exclusions(exclude[:1, :3], positions, sentinel=99), [[2, 5, 8, 99]]
  )
  assert codes_lib.sorted_exclusions(np.full((2, 3), -1), positions, sentinel=99) is None
