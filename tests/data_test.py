"""Tests for the per-user split, the Dataset container and the data set loader."""

import ml_collections
import numpy as np
import pytest

from hashgnn_jax.data import dataset as data
from hashgnn_jax.data import loader
from hashgnn_jax.data import synthetic


def _random_pairs(*, num_users, num_items, max_per_user, seed):
  """Unique (user, item) pairs with 1..max_per_user items per user, sorted by (user, item)."""
  rng = np.random.default_rng(seed)
  per_user = rng.integers(1, max_per_user + 1, size=num_users)
  users = np.repeat(np.arange(num_users), per_user).astype(np.int32)
  items = np.concatenate([rng.choice(num_items, size=n, replace=False) for n in per_user])
  order = np.lexsort((items, users))
  return users[order], items[order].astype(np.int32)


def _expected_test_count(n, test_fraction):
  """The split rule, spelled out one user at a time."""
  if n < 2:
    return 0
  count = round(test_fraction * n)
  if test_fraction > 0:
    count = max(count, 1)
  return min(count, n - 1)


@pytest.mark.parametrize("test_fraction", [0.0, 0.2, 0.3, 0.5, 0.9])
def test_split_follows_the_per_user_rule(test_fraction):
  users, items = _random_pairs(num_users=400, num_items=100, max_per_user=30, seed=0)
  is_test = data.split_per_user(users, items, test_fraction=test_fraction, seed=1)
  assert is_test.dtype == bool and is_test.shape == users.shape
  per_user = np.bincount(users)
  test_per_user = np.bincount(users[is_test], minlength=per_user.size)
  expected = [_expected_test_count(n, test_fraction) for n in per_user]
  np.testing.assert_array_equal(test_per_user, expected)


def test_overall_fraction_is_close_to_target():
  users, items = _random_pairs(num_users=2000, num_items=500, max_per_user=60, seed=0)
  is_test = data.split_per_user(users, items, test_fraction=0.2, seed=0)
  assert abs(is_test.mean() - 0.2) < 0.02


def test_split_is_seeded():
  users, items = _random_pairs(num_users=200, num_items=100, max_per_user=20, seed=0)
  first = data.split_per_user(users, items, test_fraction=0.3, seed=5)
  second = data.split_per_user(users, items, test_fraction=0.3, seed=5)
  other = data.split_per_user(users, items, test_fraction=0.3, seed=6)
  np.testing.assert_array_equal(first, second)
  assert np.any(first != other)


def test_split_picks_uniformly_within_a_user():
  # One user with four items and one test slot: each item should be picked about equally often.
  users = np.zeros(4, dtype=np.int32)
  items = np.arange(4, dtype=np.int32)
  picks = np.stack(
    [data.split_per_user(users, items, test_fraction=0.25, seed=s) for s in range(2000)]
  )
  np.testing.assert_array_equal(picks.sum(axis=1), 1)
  np.testing.assert_allclose(picks.mean(axis=0), 0.25, atol=0.04)


def test_small_users():
  # User 0 has one pair, user 1 two, user 2 three; input order is deliberately not sorted.
  users = np.array([2, 1, 0, 2, 1, 2], dtype=np.int32)
  items = np.array([5, 3, 1, 6, 4, 7], dtype=np.int32)
  for seed in range(20):
    is_test = data.split_per_user(users, items, test_fraction=0.1, seed=seed)
    assert not is_test[users == 0].any()
    assert is_test[users == 1].sum() == 1
    assert is_test[users == 2].sum() == 1
  is_test = data.split_per_user(users, items, test_fraction=0.0, seed=0)
  assert not is_test.any()


def test_split_handles_empty_input():
  empty = np.zeros(0, dtype=np.int32)
  assert data.split_per_user(empty, empty, test_fraction=0.2, seed=0).shape == (0,)


@pytest.mark.parametrize("test_fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(test_fraction):
  users = np.zeros(3, dtype=np.int32)
  with pytest.raises(ValueError, match="test_fraction"):
    data.split_per_user(users, users, test_fraction=test_fraction, seed=0)


def _synthetic_config(**overrides):
  config = {
    "kind": "synthetic",
    "path": "",
    "seed": 0,
    "test_fraction": 0.2,
    "synthetic": {
      "num_users": 120,
      "num_items": 80,
      "num_communities": 4,
      "mean_items_per_user": 10,
      "min_items_per_user": 2,
      "popularity_exponent": 1.0,
      "in_community_prob": 0.8,
    },
  }
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def _pair_keys(users, items, num_items):
  return users.astype(np.int64) * num_items + items


def test_load_synthetic_end_to_end():
  dataset = loader.load_dataset(_synthetic_config())
  assert dataset.name == "synthetic"
  assert (dataset.num_users, dataset.num_items) == (120, 80)
  for users, items in (
    (dataset.train_users, dataset.train_items),
    (dataset.test_users, dataset.test_items),
  ):
    assert users.dtype == np.int32 and items.dtype == np.int32
    keys = _pair_keys(users, items, dataset.num_items)
    assert np.all(np.diff(keys) > 0)
  train = _pair_keys(dataset.train_users, dataset.train_items, dataset.num_items)
  test = _pair_keys(dataset.test_users, dataset.test_items, dataset.num_items)
  assert np.intersect1d(train, test).size == 0
  # Every user keeps training pairs and, with at least two pairs each, gets a test pair.
  assert np.unique(dataset.train_users).size == 120
  assert np.unique(dataset.test_users).size == 120
  assert dataset.num_train + dataset.num_test == train.size + test.size
  assert 0.15 < dataset.num_test / (dataset.num_train + dataset.num_test) < 0.3

  assert dataset.num_valid == 0 and dataset.valid_users.dtype == np.int32
  assert dataset.user_ids is None and dataset.item_ids is None

  summary = dataset.summary()
  assert summary["users"] == 120 and summary["items"] == 80
  assert summary["train_interactions"] == dataset.num_train
  assert summary["test_interactions"] == dataset.num_test
  assert summary["valid_interactions"] == summary["valid_users"] == 0
  assert summary["test_users"] == 120
  assert summary["users_only_in_test"] == 0
  expected_test_only = np.setdiff1d(dataset.test_items, dataset.train_items).size
  assert summary["items_only_in_test"] == expected_test_only


def test_synthetic_validation_comes_from_train_only():
  plain = loader.load_dataset(_synthetic_config())
  dataset = loader.load_dataset(_synthetic_config(valid_fraction=0.25))
  # The validation split has its own seed, so the test split is the same with or without it.
  np.testing.assert_array_equal(dataset.test_users, plain.test_users)
  np.testing.assert_array_equal(dataset.test_items, plain.test_items)
  train = _pair_keys(dataset.train_users, dataset.train_items, 80)
  valid = _pair_keys(dataset.valid_users, dataset.valid_items, 80)
  np.testing.assert_array_equal(
    np.sort(np.concatenate([train, valid])), _pair_keys(plain.train_users, plain.train_items, 80)
  )
  assert np.all(np.diff(valid) > 0)
  per_user = np.bincount(plain.train_users, minlength=120)
  expected = [_expected_test_count(n, 0.25) for n in per_user]
  np.testing.assert_array_equal(np.bincount(dataset.valid_users, minlength=120), expected)
  assert dataset.summary()["valid_users"] == np.count_nonzero(expected)


def test_split_seeds_keep_the_earlier_streams():
  # The graph and test seeds match the two-seed scheme that earlier results were produced with.
  np.testing.assert_array_equal(
    data.split_seeds(0)[:2], np.random.SeedSequence(0).generate_state(2)
  )
  assert len(set(data.split_seeds(0))) == 3


def test_summary_counts_nodes_only_in_test():
  ids = np.array([0, 1], dtype=np.int32)
  dataset = data.Dataset(
    name="tiny",
    num_users=3,
    num_items=3,
    train_users=ids[:1],
    train_items=ids[:1],
    test_users=np.array([0, 2], dtype=np.int32),
    test_items=np.array([1, 2], dtype=np.int32),
  )
  summary = dataset.summary()
  assert summary["users_only_in_test"] == 1 and summary["items_only_in_test"] == 2


def test_load_synthetic_splits_exactly_the_generated_graph(monkeypatch):
  generated = []
  generate = synthetic.generate_interactions

  def recording_generator(**kwargs):
    pairs = generate(**kwargs)
    generated.append(pairs)
    return pairs

  monkeypatch.setattr(synthetic, "generate_interactions", recording_generator)
  dataset = loader.load_dataset(_synthetic_config())
  ((users, items),) = generated
  union = np.concatenate(
    [
      _pair_keys(dataset.train_users, dataset.train_items, 80),
      _pair_keys(dataset.test_users, dataset.test_items, 80),
    ]
  )
  np.testing.assert_array_equal(np.sort(union), _pair_keys(users, items, 80))


def test_load_synthetic_is_seeded():
  first = loader.load_dataset(_synthetic_config())
  second = loader.load_dataset(_synthetic_config())
  other = loader.load_dataset(_synthetic_config(seed=1))
  for field in ("train_users", "train_items", "test_users", "test_items"):
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
  assert first.num_test != other.num_test or np.any(first.test_items != other.test_items)


def test_dataset_rejects_out_of_range_ids():
  ids = np.array([0, 1], dtype=np.int32)
  with pytest.raises(ValueError, match="train_items"):
    data.Dataset(
      name="bad",
      num_users=2,
      num_items=1,
      train_users=ids,
      train_items=ids,
      test_users=ids[:0],
      test_items=ids[:0],
    )
  with pytest.raises(ValueError, match="valid_users"):
    data.Dataset(
      name="bad",
      num_users=1,
      num_items=2,
      train_users=ids[:1],
      train_items=ids[:1],
      test_users=ids[:0],
      test_items=ids[:0],
      valid_users=ids,
      valid_items=ids,
    )
  with pytest.raises(ValueError, match=r"item_ids must have shape \(2,\)"):
    data.Dataset(
      name="bad",
      num_users=2,
      num_items=2,
      train_users=ids,
      train_items=ids,
      test_users=ids[:0],
      test_items=ids[:0],
      item_ids=np.arange(3),
    )


@pytest.mark.parametrize(
  "kind", ["movielens", "gowalla", "pinterest", "alibaba", "lightgcn", "csv"]
)
def test_file_kinds_without_path_explain_the_key(kind):
  with pytest.raises(FileNotFoundError) as info:
    loader.load_dataset(ml_collections.ConfigDict({"kind": kind, "path": ""}))
  assert "config.data.path" in str(info.value)
  assert kind in str(info.value)


def test_missing_file_names_the_path(tmp_path):
  missing = str(tmp_path / "UserBehavior.csv")
  with pytest.raises(FileNotFoundError) as info:
    loader.load_dataset(ml_collections.ConfigDict({"kind": "alibaba", "path": missing}))
  message = str(info.value)
  assert "config.data.path" in message and "alibaba" in message and missing in message


def test_file_kind_loads_with_partial_config(tmp_path):
  # Settings missing from a hand-made config take the schema defaults.
  path = tmp_path / "ratings.dat"
  path.write_text("".join(f"{u}::{i}::5::0\n" for u in range(3) for i in range(10)))
  dataset = loader.load_dataset(ml_collections.ConfigDict({"kind": "movielens", "path": str(path)}))
  assert (dataset.num_users, dataset.num_items, dataset.num_test) == (3, 10, 9)
  np.testing.assert_array_equal(dataset.user_ids, [0, 1, 2])


def test_unknown_kind_lists_valid_kinds():
  with pytest.raises(ValueError, match="synthetic") as info:
    loader.load_dataset(ml_collections.ConfigDict({"kind": "netflix", "path": ""}))
  assert "netflix" in str(info.value) and "alibaba" in str(info.value)
