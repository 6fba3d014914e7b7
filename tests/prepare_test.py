"""Tests for data preparation: remapping, cleaning, splits, the cache and the download."""

import functools
import hashlib
import http.server
import io
import json
import logging
import os
import subprocess
import sys
import threading
import zipfile

import ml_collections
import numpy as np
import pytest

from hashgnn_jax import config_lib
from hashgnn_jax.data import loader
from hashgnn_jax.data import prepare

_DAY = 86_400
_START = 1_511_539_200


def _config(kind, path, **overrides):
  config = config_lib.default_config().data
  config.kind = kind
  config.path = str(path)
  for key, value in overrides.items():
    config[key] = value
  return config


def _pairs(dataset, side):
  return set(
    zip(
      dataset.user_ids[getattr(dataset, f"{side}_users")].tolist(),
      dataset.item_ids[getattr(dataset, f"{side}_items")].tolist(),
    )
  )


def _write_user_behavior(path, rows):
  path.write_text("".join(f"{u},{i},1,{b},{t}\n" for u, i, b, t in rows))
  return path


def _random_log(rng, *, num_rows, num_users, num_items):
  users = rng.integers(0, num_users, size=num_rows) * 7 + 1_000  # Sparse raw ids.
  items = rng.integers(0, num_items, size=num_rows) ** 2  # Skewed and sparse.
  return users, items


# The pipeline.


@pytest.mark.parametrize("text_ids", [False, True])
def test_remap_round_trip_and_duplicates(tmp_path, text_ids):
  rng = np.random.default_rng(0)
  users, items = _random_log(rng, num_rows=3_000, num_users=150, num_items=60)
  names = np.array([f"ü{u}" if text_ids else str(u) for u in users])
  path = tmp_path / "log.csv"
  path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in zip(names, items)))
  config = _config("csv", path, test_fraction=0.3, valid_fraction=0.1, cache_dir=str(tmp_path))
  dataset, manifest = prepare._load_or_prepare(config)

  raw = {(u if text_ids else int(u), int(i)) for u, i in zip(names, items)}
  train, valid, test = (_pairs(dataset, side) for side in ("train", "valid", "test"))
  assert train | valid | test == raw
  assert dataset.user_ids.dtype.kind == ("U" if text_ids else "i")
  assert dataset.num_users == len({u for u, _ in raw})
  assert dataset.num_items == len({i for _, i in raw})
  statistics = manifest["statistics"]
  assert statistics["rows_read"] == 3_000
  assert statistics["duplicates_dropped"] == 3_000 - len(raw)


def test_random_split_proportions_and_disjointness(tmp_path):
  rng = np.random.default_rng(1)
  users, items = _random_log(rng, num_rows=6_000, num_users=200, num_items=300)
  path = tmp_path / "train.txt"
  lines = {}
  for u, i in zip(users, items):
    lines.setdefault(u, []).append(i)
  path.write_text("".join(f"{u} {' '.join(map(str, row))}\n" for u, row in lines.items()))
  dataset = prepare.prepare_dataset(
    _config("gowalla", path, test_fraction=0.3, valid_fraction=0.1, seed=3)
  )
  train, valid, test = (_pairs(dataset, side) for side in ("train", "valid", "test"))
  assert not (train & valid) and not (train & test) and not (valid & test)

  per_user = np.bincount(
    np.concatenate([dataset.train_users, dataset.valid_users, dataset.test_users])
  )
  test_per_user = np.bincount(dataset.test_users, minlength=dataset.num_users)
  valid_per_user = np.bincount(dataset.valid_users, minlength=dataset.num_users)

  def rule(n, fraction):
    return 0 if n < 2 else min(max(round(fraction * n), 1), n - 1)

  np.testing.assert_array_equal(test_per_user, [rule(n, 0.3) for n in per_user])
  np.testing.assert_array_equal(
    valid_per_user, [rule(n, 0.1) for n in per_user - test_per_user]
  )
  for side in ("train", "valid", "test"):
    keys = getattr(dataset, f"{side}_users").astype(np.int64) * dataset.num_items
    assert np.all(np.diff(keys + getattr(dataset, f"{side}_items")) > 0)


def _brute_force_core(pairs, min_user, min_item):
  pairs = set(pairs)
  while True:
    users, items = {}, {}
    for u, i in pairs:
      users[u] = users.get(u, 0) + 1
      items[i] = items.get(i, 0) + 1
    kept = {(u, i) for u, i in pairs if users[u] >= min_user and items[i] >= min_item}
    if kept == pairs:
      return pairs
    pairs = kept


@pytest.mark.parametrize("span", [1_000, 2**62])  # The second takes the lexsort path.
def test_dedupe_keeps_the_first_phase(span):
  rng = np.random.default_rng(5)
  users = rng.integers(0, 20, size=2_000).astype(np.int32)
  items = rng.integers(0, 30, size=2_000).astype(np.int32)
  phases = rng.integers(0, 1_000, size=2_000)
  rows = prepare._Rows(users, items, phases, np.arange(20), np.arange(30))
  dropped = prepare._dedupe(rows, span=span)
  first = {}
  for u, i, p in zip(users.tolist(), items.tolist(), phases.tolist()):
    first[u, i] = min(p, first.get((u, i), p))
  expected = sorted(first.items())
  assert list(zip(zip(rows.users.tolist(), rows.items.tolist()), rows.phases.tolist())) == expected
  assert dropped == 2_000 - len(first)


def test_k_core_reaches_the_fixed_point(tmp_path):
  rng = np.random.default_rng(2)
  users, items = _random_log(rng, num_rows=4_000, num_users=200, num_items=300)
  path = tmp_path / "log.csv"
  path.write_text("u,i\n" + "".join(f"{u},{i}\n" for u, i in zip(users, items)))
  settings = dict(
    columns={"user": "u", "item": "i"}, min_user_interactions=15, min_item_interactions=8
  )
  config = _config("csv", path, k_core=True, cache_dir=str(tmp_path), **settings)
  dataset, manifest = prepare._load_or_prepare(config)
  kept = _pairs(dataset, "train") | _pairs(dataset, "test")
  assert kept and kept == _brute_force_core(zip(users.tolist(), items.tolist()), 15, 8)
  assert manifest["statistics"]["filter"]["rounds"] > 1

  one_pass = prepare.prepare_dataset(_config("csv", path, k_core=False, **settings))
  assert len(_pairs(one_pass, "train") | _pairs(one_pass, "test")) > len(kept)


def test_published_split_keeps_the_files(tmp_path):
  (tmp_path / "train.txt").write_text("0 1 2 3\n1 2 4\n2 5\n")
  (tmp_path / "test.txt").write_text("0 4 1\n1 6\n2\n3 9\n")  # (0, 1) is also in train.
  dataset, manifest = prepare._load_or_prepare(
    _config("lightgcn", tmp_path, split="published", cache_dir=str(tmp_path / "cache"))
  )
  assert _pairs(dataset, "train") == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 4), (2, 5)}
  assert _pairs(dataset, "test") == {(0, 4), (1, 6), (3, 9)}
  statistics = manifest["statistics"]
  assert statistics["duplicates_dropped"] == 1
  assert statistics["users_only_in_test"] == 1  # User 3.
  assert statistics["items_only_in_test"] == 2  # Items 6 and 9.
  assert manifest["settings"]["split"] == "published"


def test_temporal_split_boundaries(tmp_path):
  end = _START + 9 * _DAY  # The log ends one second after its last row.
  test_start, train_start = end - _DAY, end - 7 * _DAY
  rows = [
    (1, 10, "pv", end - 1),  # Last row: test.
    (1, 11, "pv", test_start),  # First second of the test day: test.
    (1, 12, "pv", test_start - 1),  # Last second of train.
    (1, 13, "pv", train_start),  # First second of train.
    (1, 14, "pv", train_start - 1),  # Before the window: dropped.
    (2, 12, "buy", train_start + 5),  # Seen in train ...
    (2, 12, "pv", test_start + 5),  # ... and again in test: stays a train pair.
    (2, 13, "cart", test_start + 9),
    (3, 14, "pv", _START),  # A user only seen before the window.
  ]
  path = _write_user_behavior(tmp_path / "UserBehavior.csv", rows)
  dataset, manifest = prepare._load_or_prepare(
    _config("alibaba", path, split="temporal", train_days=6.0, test_days=1.0)
  )
  assert _pairs(dataset, "train") == {(1, 12), (1, 13), (2, 12)}
  assert _pairs(dataset, "test") == {(1, 10), (1, 11), (2, 13)}
  assert dataset.user_ids.tolist() == [1, 2]
  statistics = manifest["statistics"]
  assert statistics["rows_before_window"] == 2
  assert statistics["duplicates_dropped"] == 1
  assert statistics["window"]["seconds"] == [train_start, test_start, end]
  assert manifest["settings"]["train_days"] == 6.0
  # The cache went beside the source by default.
  assert os.path.exists(tmp_path / "hashgnn_cache" / "alibaba-UserBehavior.csv.json")


def test_temporal_filter_counts_the_window(tmp_path):
  # User 1 has 3 rows in the window and 2 before it; with a minimum of 3 it stays.
  end = _START + 9 * _DAY
  rows = [(1, i, "pv", end - 1 - i * _DAY) for i in range(5)] + [(2, 9, "pv", end - 1)]
  path = _write_user_behavior(tmp_path / "UserBehavior.csv", rows)
  config = _config(
    "alibaba", path, split="temporal", train_days=2.0, test_days=1.0, min_user_interactions=3
  )
  dataset = prepare.prepare_dataset(config)
  assert dataset.user_ids.tolist() == [1]
  assert dataset.num_train == 2 and dataset.num_test == 1


def test_zero_test_users_names_the_cause(tmp_path):
  end = _START + 9 * _DAY
  rows = [(1, i, "pv", _START + i) for i in range(20)] + [(2, 1, "pv", end - 1)]
  path = _write_user_behavior(tmp_path / "UserBehavior.csv", rows)
  with pytest.raises(ValueError, match=r"zero test users .* removed all 1 test interactions"):
    prepare.prepare_dataset(
      _config("alibaba", path, split="temporal", train_days=9.0, min_user_interactions=2)
    )
  rows = [(1, i, "pv", _START + i) for i in range(20)] + [(1, 0, "pv", end + 3 * _DAY)]
  path = _write_user_behavior(tmp_path / "UserBehavior.csv", rows)
  with pytest.raises(ValueError, match=r"zero test users .*test window .* holds no interactions"):
    prepare.prepare_dataset(_config("alibaba", path, split="temporal", train_days=20.0))
  with pytest.raises(ValueError, match="test_fraction is 0"):
    prepare.prepare_dataset(_config("alibaba", path, test_fraction=0.0))
  with pytest.raises(ValueError, match="removed every interaction"):
    prepare.prepare_dataset(_config("alibaba", path, min_item_interactions=5))


def _stray_log(tmp_path):
  """A UserBehavior log of the nominal nine days plus stray rows years after them."""
  end = _START + 9 * _DAY  # 2017-12-03T16:00:00Z, midnight after the last day in UTC+8.
  test_start, train_start = end - _DAY, end - 7 * _DAY
  rows = [
    (1, 10, "pv", end - 1),  # Last second of the window: test.
    (1, 11, "pv", test_start),  # test.
    (1, 12, "pv", test_start - 1),  # train.
    (1, 13, "pv", train_start),  # train.
    (1, 14, "pv", train_start - 1),  # Before the window.
    (2, 12, "buy", train_start + 5),  # train.
    (2, 13, "cart", test_start + 9),  # test.
    (2, 15, "pv", end),  # The end itself is outside.
    (1, 17, "pv", end + 2 * 365 * _DAY),  # Stray rows, years out.
    (3, 16, "pv", end + 3 * 365 * _DAY),
  ]
  return _write_user_behavior(tmp_path / "UserBehavior.csv", rows), (train_start, test_start, end)


def test_temporal_end_time_ignores_stray_rows(tmp_path):
  path, seconds = _stray_log(tmp_path)
  # Without an end, the last stray row ends the log: its day is the whole test window.
  dataset = prepare.prepare_dataset(_config("alibaba", path, split="temporal"))
  assert _pairs(dataset, "test") == {(3, 16)} and not _pairs(dataset, "train")

  arrays = []
  for end_time in ("2017-12-03T16:00:00", "1512316800", "2017-12-04T00:00:00+08:00"):
    config = _config(
      "alibaba", path, split="temporal", end_time=end_time, cache_dir=str(tmp_path / end_time)
    )
    dataset, manifest = prepare._load_or_prepare(config)
    assert _pairs(dataset, "train") == {(1, 12), (1, 13), (2, 12)}
    assert _pairs(dataset, "test") == {(1, 10), (1, 11), (2, 13)}
    statistics = manifest["statistics"]
    assert statistics["window"]["seconds"] == list(seconds)
    assert statistics["window"]["end"] == "2017-12-03T16:00:00+00:00"
    assert statistics["rows_before_window"] == 1
    assert statistics["rows_after_window"] == 3
    assert manifest["settings"]["end_time"] == 1_512_316_800
    arrays.append([getattr(dataset, name) for name in prepare._ARRAYS])
  for other in arrays[1:]:
    for first, second in zip(arrays[0], other):
      np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
  "value, seconds",
  [
    ("", None),
    ("2017-12-04", 1_512_345_600),
    (" 2017-12-04 00:00:00 ", 1_512_345_600),
    ("2017-12-04T00:00:00Z", 1_512_345_600),
    ("2017-12-04T08:00:00+08:00", 1_512_345_600),
    ("2017-12-03T23:59:59.25", 1_512_345_600),  # Rounds up: t < end keeps the same rows.
    ("1512345600", 1_512_345_600),
    ("-86400", -86_400),
  ],
)
def test_end_time_forms(value, seconds):
  assert config_lib.end_time_seconds(value, "temporal") == seconds


def test_end_time_errors(tmp_path):
  path, _ = _stray_log(tmp_path)
  for value in ("next tuesday", "2017-13-01", "99999999999999"):
    with pytest.raises(ValueError, match=r"config\.data\.end_time=.* is not a time .*ISO 8601"):
      prepare.prepare_dataset(_config("alibaba", path, split="temporal", end_time=value))
  message = r"config\.data\.end_time='2017-12-04' ends the temporal .*config\.data\.split='random'"
  with pytest.raises(ValueError, match=message):
    prepare.prepare_dataset(_config("alibaba", path, split="random", end_time="2017-12-04"))
  config = config_lib.default_config()
  config.data.end_time = "2017-12-04"
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)
  # An end before the whole log leaves the window empty; the error counts where the rows went.
  with pytest.raises(ValueError, match=r"test window .* no interactions \(0 row\(s\) lie before "
                     r"the train window and 10 at or after config\.data\.end_time\)"):
    prepare.prepare_dataset(_config("alibaba", path, split="temporal", end_time="2017-01-01"))


def _write_ratings(path):
  ratings = [(1, 10, 5), (1, 11, 3), (1, 12, 4), (2, 10, 4.5), (2, 13, 2), (2, 14, 4), (3, 11, 1)]
  path.write_text("".join(f"{u}::{i}::{r}::97830{k:04d}\n" for k, (u, i, r) in enumerate(ratings)))
  return path


def test_min_rating_keeps_implicit_positives(tmp_path):
  path = _write_ratings(tmp_path / "ratings.dat")
  dataset, manifest = prepare._load_or_prepare(
    _config("movielens", path, min_rating=4.0, test_fraction=0.5)
  )
  kept = {(1, 10), (1, 12), (2, 10), (2, 14)}  # 4 is kept: the minimum is inclusive.
  assert _pairs(dataset, "train") | _pairs(dataset, "test") == kept
  assert dataset.user_ids.tolist() == [1, 2] and dataset.item_ids.tolist() == [10, 12, 14]
  assert manifest["statistics"]["rows_read"] == 7
  assert manifest["statistics"]["rows_below_min_rating"] == 3
  assert manifest["settings"]["min_rating"] == 4.0


def test_min_rating_needs_ratings(tmp_path):
  behavior = _write_user_behavior(tmp_path / "UserBehavior.csv", [(1, 2, "pv", _START)])
  with pytest.raises(ValueError, match=r"config\.data\.min_rating=4\.0 .* alibaba data has none"):
    prepare.prepare_dataset(_config("alibaba", behavior, min_rating=4.0))
  table = tmp_path / "log.csv"
  table.write_text("user,item,stars\n1,2,5\n1,3,1\n2,2,4\n2,4,4\n")
  with pytest.raises(ValueError, match=r"csv data has none: set config\.data\.columns\.rating"):
    prepare.prepare_dataset(_config("csv", table, min_rating=4.0))
  columns = {"user": "user", "item": "item", "rating": "stars"}
  dataset = prepare.prepare_dataset(_config("csv", table, min_rating=4.0, columns=columns))
  assert _pairs(dataset, "train") | _pairs(dataset, "test") == {(1, 2), (2, 2), (2, 4)}
  ratings = _write_ratings(tmp_path / "ratings.dat")
  with pytest.raises(ValueError, match=r"min_rating=6\.0 drops every row .* highest rating is 5"):
    prepare.prepare_dataset(_config("movielens", ratings, min_rating=6.0))
  for value in (float("nan"), float("inf")):
    with pytest.raises(ValueError, match=r"config\.data\.min_rating=.* must be a finite number"):
      prepare.prepare_dataset(_config("movielens", ratings, min_rating=value))
  config = config_lib.default_config()
  config.data.min_rating = 4.0
  with pytest.raises(ValueError, match=r"config\.data\.kind='synthetic' has no ratings"):
    config_lib.validate(config)


def test_timestamp_unit_milliseconds_split_like_seconds(tmp_path):
  end = _START + 9 * _DAY
  test_start, train_start = end - _DAY, end - 7 * _DAY
  # (user, item, milliseconds); the seconds file holds them floored.
  rows = [
    (1, 10, (end - 1) * 1000 + 999),  # Last row: test.
    (1, 11, test_start * 1000),  # test.
    (1, 12, test_start * 1000 - 1),  # The millisecond before test: train.
    (1, 13, train_start * 1000),  # train.
    (1, 14, train_start * 1000 - 1),  # Before the window.
    (2, 12, (test_start + 5) * 1000 + 500),  # test.
    (2, 13, (train_start + 9) * 1000),  # train.
  ]
  millis = tmp_path / "ms" / "log.csv"
  seconds = tmp_path / "s" / "log.csv"
  for path, scale in ((millis, 1), (seconds, 1000)):
    path.parent.mkdir()
    path.write_text("u,i,t\n" + "".join(f"{u},{i},{t // scale}\n" for u, i, t in rows))
  columns = {"user": "u", "item": "i", "timestamp": "t"}
  results = []
  for path, unit in ((millis, "ms"), (seconds, "s")):
    config = _config("csv", path, split="temporal", columns=columns, timestamp_unit=unit)
    dataset, manifest = prepare._load_or_prepare(config)
    assert _pairs(dataset, "train") == {(1, 12), (1, 13), (2, 13)}
    assert _pairs(dataset, "test") == {(1, 10), (1, 11), (2, 12)}
    assert manifest["statistics"]["window"]["seconds"] == [train_start, test_start, end]
    results.append(manifest)
  assert results[0]["settings"]["timestamp_unit"] == "ms"
  assert "timestamp_unit" not in results[1]["settings"]


def test_timestamp_unit_errors(tmp_path):
  config = config_lib.default_config()
  config.data.timestamp_unit = "min"
  with pytest.raises(ValueError, match=r"config\.data\.timestamp_unit='min' is not one of"):
    config_lib.validate(config)
  path = _write_user_behavior(tmp_path / "UserBehavior.csv", [(1, 2, "pv", _START)])
  with pytest.raises(ValueError, match=r"config\.data\.timestamp_unit='min' is not one of"):
    prepare.prepare_dataset(_config("csv", path, timestamp_unit="min"))
  with pytest.raises(ValueError, match=r"timestamp_unit='ms' is for .* kind 'csv'; alibaba"):
    prepare.prepare_dataset(_config("alibaba", path, timestamp_unit="ms"))


@pytest.mark.parametrize(
  "kind, overrides, match",
  [
    ("alibaba", {"split": "published"}, "needs a LightGCN folder"),
    ("lightgcn", {"split": "temporal"}, "needs timestamps"),
    ("alibaba", {"split": "weekly"}, "config.data.split='weekly'"),
    ("alibaba", {"valid_fraction": 1.0}, "config.data.valid_fraction=1.0"),
  ],
)
def test_bad_settings(tmp_path, kind, overrides, match):
  path = _write_user_behavior(tmp_path / "UserBehavior.csv", [(1, 2, "pv", _START)])
  with pytest.raises(ValueError, match=match):
    prepare.prepare_dataset(_config(kind, path, **overrides))


def test_load_dataset_for_every_kind(tmp_path):
  ml = tmp_path / "ml-1m"
  ml.mkdir()
  (ml / "ratings.dat").write_text("".join(f"{u}::{i}::4::97830076{i}\n" for u in (1, 2)
                                          for i in range(5)))
  dataset = loader.load_dataset(_config("movielens", ml))  # A folder is searched.
  assert (dataset.num_users, dataset.num_items, dataset.num_test) == (2, 5, 4)
  assert dataset.name == "movielens"
  assert os.path.exists(ml / "hashgnn_cache" / "movielens-ratings.dat.npz")  # Beside the file.

  (tmp_path / "gowalla").mkdir()
  (tmp_path / "gowalla" / "train.txt").write_text("0 1 2 3\n1 1 2\n")
  (tmp_path / "gowalla" / "test.txt").write_text("0 4\n1 3\n")
  for kind in ("gowalla", "pinterest", "lightgcn"):
    dataset = loader.load_dataset(_config(kind, tmp_path / "gowalla", split="published"))
    assert (dataset.num_train, dataset.num_test) == (5, 2)


# The cache.


def test_cache_reuse_and_rebuild(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  rng = np.random.default_rng(4)
  users, items = _random_log(rng, num_rows=500, num_users=40, num_items=30)
  path = tmp_path / "log.tsv"
  path.write_text("".join(f"{u}\t{i}\n" for u, i in zip(users, items)))
  config = _config(
    "csv", path, delimiter="\t", header=False, columns={"user": "0", "item": "1"},
    cache_dir=str(tmp_path / "cache"),
  )
  first = loader.load_dataset(config)
  assert "no prepared cache" in caplog.text

  builds = []
  build = prepare._build
  monkeypatch.setattr(prepare, "_build", lambda *args: builds.append(1) or build(*args))
  caplog.clear()
  second = loader.load_dataset(config)
  assert not builds and "Reusing the prepared cache" in caplog.text
  for field in ("train_users", "train_items", "test_users", "test_items", "item_ids"):
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field))

  caplog.clear()
  config.seed = 1
  loader.load_dataset(config)
  assert len(builds) == 1 and "settings changed (seed: 0 -> 1)" in caplog.text

  caplog.clear()
  with open(path, "a") as f:
    f.write("1000\t5\n")
  loader.load_dataset(config)
  assert len(builds) == 2 and "the source changed: log.tsv" in caplog.text

  caplog.clear()
  arrays_path, _ = prepare.cache_paths(config)
  with open(arrays_path, "r+b") as f:
    f.seek(100)
    f.write(b"garbage")
  loader.load_dataset(config)
  assert len(builds) == 3 and "does not match its manifest" in caplog.text
  loader.load_dataset(config)
  assert len(builds) == 3


def test_new_settings_rebuild_and_old_caches_stay_valid(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  builds = []
  build = prepare._build
  monkeypatch.setattr(prepare, "_build", lambda *args: builds.append(1) or build(*args))
  ratings = _config("movielens", _write_ratings(tmp_path / "ratings.dat"))
  _, manifest = prepare._load_or_prepare(ratings)
  # What the code before these settings wrote: an old cache holds exactly these keys.
  assert manifest["settings"] == {
    "kind": "movielens", "split": "random", "seed": 0, "valid_fraction": 0.0,
    "min_user_interactions": 0, "min_item_interactions": 0, "k_core": False,
    "test_fraction": 0.3,
  }
  _, manifest_path = prepare.cache_paths(ratings)
  with open(manifest_path, encoding="utf-8") as f:
    assert "Infinity" not in f.read()  # -inf is not JSON.
  caplog.clear()
  prepare.load_or_prepare(ratings)
  assert len(builds) == 1 and "Reusing the prepared cache" in caplog.text
  ratings.min_rating = 4.0
  prepare.load_or_prepare(ratings)
  assert len(builds) == 2 and "settings changed (min_rating: None -> 4.0)" in caplog.text

  path, _ = _stray_log(tmp_path)
  log = _config("alibaba", path, split="temporal")
  _, manifest = prepare._load_or_prepare(log)
  assert "end_time" not in manifest["settings"] and "min_rating" not in manifest["settings"]
  caplog.clear()
  prepare.load_or_prepare(log)
  assert len(builds) == 3 and "Reusing the prepared cache" in caplog.text
  log.end_time = "2017-12-03T16:00:00"
  prepare.load_or_prepare(log)
  assert len(builds) == 4 and "settings changed (end_time: None -> 1512316800)" in caplog.text
  log.end_time = "1512316801"
  prepare.load_or_prepare(log)
  assert len(builds) == 5 and "(end_time: 1512316800 -> 1512316801)" in caplog.text


def test_a_crash_while_writing_leaves_no_cache(tmp_path, monkeypatch):
  rows = [(u, i, "pv", _START + i) for u in range(3) for i in range(4)]
  path = _write_user_behavior(tmp_path / "UserBehavior.csv", rows)
  config = _config("alibaba", path, cache_dir=str(tmp_path / "cache"))

  def crash(*args, **kwargs):
    raise OSError("disk full")

  with monkeypatch.context() as patch:
    patch.setattr(np, "savez", crash)
    prepare.load_or_prepare(config)  # Warns and returns the data uncached.
  assert os.listdir(tmp_path / "cache") == []

  # A crash while replacing a cache leaves the old one whole and usable.
  prepare.load_or_prepare(config)
  before = sorted(os.listdir(tmp_path / "cache"))
  config.seed = 7
  with monkeypatch.context() as patch:
    patch.setattr(np, "savez", crash)
    prepare.load_or_prepare(config)
  assert sorted(os.listdir(tmp_path / "cache")) == before
  config.seed = 0
  arrays_path, manifest_path = prepare.cache_paths(config)
  settings, fingerprint = prepare._settings(config), prepare._fingerprint(str(path))
  reason = prepare._stale_reason(
    arrays_path=arrays_path, manifest_path=manifest_path, settings=settings, fingerprint=fingerprint
  )
  assert reason is None


# Download.


def _zip_bytes():
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("ml-tiny/README", "tiny")
    archive.writestr(
      "ml-tiny/ratings.dat",
      "".join(f"{u}::{i}::5::97830076{i}\n" for u in (1, 2, 3) for i in range(4)),
    )
  return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves the archive whole at /ml-tiny.zip and cut short (full length announced) elsewhere."""

  def __init__(self, *args, payload, **kwargs):
    self.payload = payload
    super().__init__(*args, **kwargs)

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header("Content-Length", str(len(self.payload)))
    self.end_headers()
    body = self.payload if self.path == "/ml-tiny.zip" else self.payload[: len(self.payload) // 2]
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture(name="server")
def _server():
  payload = _zip_bytes()
  httpd = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(_Handler, payload=payload)
  )
  thread = threading.Thread(
    target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
  )
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.sha256(payload).hexdigest()
  httpd.shutdown()
  httpd.server_close()
  thread.join()


def test_download_prepare_command(tmp_path, server):
  url, sha256 = server
  out = tmp_path / "out"
  result = subprocess.run(
    [sys.executable, "-m", "hashgnn_jax.data.prepare", "--dataset=movielens",
     f"--source={url}/ml-tiny.zip", f"--out={out}", f"--sha256={sha256}", "--test_fraction=0.25"],
    capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  report = json.loads(result.stdout)
  assert report["config.data.path"] == str(out / "ml-tiny" / "ml-tiny" / "ratings.dat")
  assert report["statistics"]["users"] == 3 and report["statistics"]["test_interactions"] == 3
  assert sorted(os.listdir(out)) == ["ml-tiny", "ml-tiny.zip", "movielens-ratings.dat.json",
                                     "movielens-ratings.dat.npz"]
  # A second download of the verified archive is skipped.
  assert prepare.download(f"{url}/ml-tiny.zip", out_dir=str(out), sha256=sha256) == str(
    out / "ml-tiny.zip"
  )


def test_download_rejects_a_bad_checksum(tmp_path, server):
  url, _ = server
  with pytest.raises(ValueError, match="has SHA-256 .*, expected 0000"):
    prepare.download(f"{url}/ml-tiny.zip", out_dir=str(tmp_path), sha256="0000" * 16)
  assert os.listdir(tmp_path) == []


def test_download_rejects_a_truncated_file(tmp_path, server):
  url, sha256 = server
  with pytest.raises(ValueError, match=r"is truncated: \d+ of \d+ bytes"):
    prepare.download(f"{url}/cut/ml-tiny.zip", out_dir=str(tmp_path), sha256=sha256)
  assert os.listdir(tmp_path) == []


def test_download_needs_a_checksum(tmp_path):
  with pytest.raises(ValueError, match="no known SHA-256 .* --sha256"):
    prepare.download("http://127.0.0.1:9/data.zip", out_dir=str(tmp_path))
  assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in prepare.KNOWN_ARCHIVES


def test_unpack_refuses_paths_outside(tmp_path):
  archive = tmp_path / "evil.zip"
  with zipfile.ZipFile(archive, "w") as zipped:
    zipped.writestr("../escape.txt", "x")
  (tmp_path / "out").mkdir()
  with pytest.raises(ValueError, match="outside"):
    prepare.unpack(str(archive), out_dir=str(tmp_path / "out"))
  assert os.listdir(tmp_path / "out") == []


def test_command_line_has_a_flag_for_every_schema_key():
  result = subprocess.run([sys.executable, "-m", "hashgnn_jax.data.prepare", "--help"],
                          capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  defaults = config_lib.default_config().data
  expected = {key for key in defaults if key not in ("kind", "path", "cache_dir", "synthetic",
                                                     "columns")}
  expected |= {f"{role}_column" for role in defaults.columns}
  listed = {line.split(":")[0].strip().lstrip("-").replace("[no]", "")
            for line in result.stdout.splitlines() if line.startswith("  --")}
  assert expected <= listed, expected - listed
  assert "--split: <random|published|temporal>" in result.stdout


def test_data_section_is_checked_once_for_every_entry_point(tmp_path):
  path = _write_user_behavior(tmp_path / "UserBehavior.csv", [(1, 2, "pv", _START)])
  config = config_lib.default_config()
  config.data.min_user_interactions = -1
  for entry in (lambda: config_lib.validate(config),
                lambda: prepare.prepare_dataset(_config("alibaba", path,
                                                        min_user_interactions=-1)),
                lambda: loader.load_dataset(_config("alibaba", path, min_user_interactions=-1))):
    with pytest.raises(ValueError, match=r"config\.data\.min_user_interactions=-1 must be >= 0"):
      entry()
  with pytest.raises(KeyError, match="test_fractoin"):
    loader.load_dataset(ml_collections.ConfigDict({"kind": "synthetic", "test_fractoin": 0.2}))
