"""Turns a real interaction log into a split `Dataset`, cached as .npz plus a JSON manifest.

Steps: read (readers.py), dropping rows rated below `min_rating` -> remap raw ids to 0..U-1 and
0..I-1 (the sorted raw ids are kept as maps) -> drop repeated (user, item) pairs -> drop users and
items under the minimum counts (to a fixed point with `k_core`) -> split into
train / validation / test.

Splits (`config.data.split`):
  random     per user: `test_fraction` of each user's pairs go to test (`data.split_per_user`).
  published  LightGCN train.txt / test.txt as published; a pair in both stays in train.
  temporal   the window ends at `end_time` (exclusive; ISO 8601 UTC or Unix seconds) or, when
             that is "", one second after the log's last timestamp; test is the last `test_days`
             days before that end and train the `train_days` days before test (Alibaba: 6 + 1).
             Rows outside the window are dropped first (counted as `rows_before_window` and
             `rows_after_window`), a repeated pair keeps its first time (so a pair seen in train
             is never a test item), and the minimum counts are then taken over the whole window,
             train and test together. A fixed end keeps stray timestamps far past the real log
             (Taobao's UserBehavior.csv has some, years out) from moving the window.
Every split then holds out `valid_fraction` of each user's training pairs for validation. A user
or item met only in test keeps its id (it has no training edge); the manifest counts them.

`min_rating` (any split) drops the rows rated below it as they are read, before every step above
and counted as `rows_below_min_rating` (4.0 keeps MovieLens's 4 and 5 stars as implicit
positives); a source without ratings refuses it. Integer timestamps of kind `csv` are in
`timestamp_unit` (s, ms, us or ns) and floored to seconds.

Kinds: `movielens` (ratings.dat, u.data or ratings.csv, or a folder holding one); `gowalla`,
`lightgcn` and `pinterest` in the LightGCN format (a folder with train.txt and test.txt, or one
adjacency file; for NCF's pinterest-20 .rating files use `csv` with a tab delimiter and no
header); `alibaba` (UserBehavior.csv); `csv` (CSV/TSV/Parquet through `config.data.columns`).

The cache (`config.data.cache_dir`, or `hashgnn_cache/` beside the source) is reused only when
its manifest's format version, settings and the SHA-256 of every source file match exactly; any
difference rebuilds it and logs why. The whole file is hashed (about 1.5 GB/s with SHA
extensions): a size and date check could miss an in-place edit, and a partial hash a change in
the middle. Both files are written under temporary names and renamed, the manifest last, so a
crash never leaves a cache that looks complete.

  python -m hashgnn_jax.data.prepare --dataset=movielens --out=/data/ml-1m \\
      --source=https://files.grouplens.org/datasets/movielens/ml-1m.zip
"""

import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import json
import math
import os
import secrets
import shutil
import sys
import time
import urllib.parse
import urllib.request
import zipfile

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from hashgnn_jax import config_lib
from hashgnn_jax.data import dataset as data
from hashgnn_jax.data import formats
from hashgnn_jax.data import readers
from hashgnn_jax import fileio

FORMAT_VERSION = 1
_LIGHTGCN_KINDS = ("gowalla", "lightgcn", "pinterest")
_SOURCE_NAMES = {  # Files searched for, in order, when a kind's source is a folder.
  "movielens": ("ratings.dat", "ratings.csv", "u.data"),
  "alibaba": ("UserBehavior.csv",),
}
_TABLE_EXTENSIONS = (".csv", ".tsv", ".txt", ".parquet")
_DAY_SECONDS = 86_400
# SHA-256 of the official MovieLens archives, as recorded in TensorFlow Datasets' checksum list.
KNOWN_ARCHIVES = {
  "https://files.grouplens.org/datasets/movielens/ml-100k.zip": (
    "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
  ),
  "https://files.grouplens.org/datasets/movielens/ml-1m.zip": (
    "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
  ),
  "https://files.grouplens.org/datasets/movielens/ml-20m.zip": (
    "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3"
  ),
  "https://files.grouplens.org/datasets/movielens/ml-25m.zip": (
    "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa"
  ),
}


# ---------------------------------------------------------------------------------------------
# Settings and sources.


def _settings(data_config: ml_collections.ConfigDict) -> dict:
  """The settings a prepared data set depends on, schema defaults filled in, JSON-ready."""
  data_config = config_lib.with_data_defaults(data_config)
  config_lib.validate_data(data_config)
  kind, split = data_config.kind, data_config.split
  if kind not in formats.FILE_KINDS:
    raise ValueError(f"config.data.kind={kind!r} is not one of {tuple(formats.FILE_KINDS)}.")
  settings = {
    "kind": kind,
    "split": split,
    "seed": int(data_config.seed),
    "valid_fraction": float(data_config.valid_fraction),
    "min_user_interactions": int(data_config.min_user_interactions),
    "min_item_interactions": int(data_config.min_item_interactions),
    "k_core": bool(data_config.k_core),
  }
  # Only what changes the result is recorded, so that e.g. test_fraction does not invalidate a
  # temporal cache.
  if split == "random":
    settings["test_fraction"] = float(data_config.test_fraction)
  if split == "temporal":
    settings["train_days"] = float(data_config.train_days)
    settings["test_days"] = float(data_config.test_days)
  if kind == "alibaba":
    settings["behaviors"] = [str(name) for name in data_config.behaviors]
  if kind == "csv":
    settings["columns"] = {
      role: str(data_config.columns[role]) for role in ("user", "item", "timestamp", "rating")
    }
    settings["delimiter"] = str(data_config.delimiter)
    settings["header"] = bool(data_config.header)
  # The three keys below are recorded only when set, so that caches written before they existed
  # (whose settings lack them) stay valid under the defaults.
  end_time = config_lib.end_time_seconds(data_config.end_time, split)
  if end_time is not None:
    settings["end_time"] = end_time
  if math.isfinite(data_config.min_rating):
    settings["min_rating"] = float(data_config.min_rating)
  # Only the temporal split uses the timestamps.
  unit = str(data_config.timestamp_unit)
  if unit != "s" and split == "temporal" and settings["columns"]["timestamp"]:
    settings["timestamp_unit"] = unit
  return settings


def locate_source(kind: str, path: str) -> str:
  """Returns the file (or LightGCN folder) of `kind` at `path`, searching `path` if a folder."""
  if not os.path.isdir(path):
    return path
  for root, folders, files in os.walk(path):
    folders.sort()
    if kind in _LIGHTGCN_KINDS and {"train.txt", "test.txt"} <= set(files):
      return root
    for name in _SOURCE_NAMES.get(kind, ()):
      if name in files:
        return os.path.join(root, name)
    if kind == "csv":
      tables = sorted(name for name in files if name.endswith(_TABLE_EXTENSIONS))
      if len(tables) == 1:
        return os.path.join(root, tables[0])
  if kind == "csv":
    wanted = "single .csv/.tsv/.txt/.parquet file"
  elif kind in _LIGHTGCN_KINDS:
    wanted = "train.txt and test.txt"
  else:
    wanted = " or ".join(_SOURCE_NAMES[kind])
  raise FileNotFoundError(f"{path}: found no {wanted} for data kind {kind!r}")


def _source_files(source: str) -> list[str]:
  if os.path.isdir(source):
    return [os.path.join(source, name) for name in ("train.txt", "test.txt")]
  return [source]


def _fingerprint(source: str) -> dict:
  """Size and SHA-256 of every file the source consists of."""
  return {
    os.path.basename(path): {"bytes": os.path.getsize(path), "sha256": fileio.file_sha256(path)}
    for path in _source_files(source)
  }


def cache_paths(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  """Returns the (arrays .npz, manifest .json) paths of the prepared cache of `data_config`."""
  source = locate_source(data_config.kind, data_config.path)
  directory = data_config.get("cache_dir", "") or os.path.join(
    os.path.dirname(os.path.abspath(os.path.normpath(source))), "hashgnn_cache"
  )
  stem = os.path.join(directory, f"{data_config.kind}-{os.path.basename(os.path.normpath(source))}")
  return stem + ".npz", stem + ".json"


# ---------------------------------------------------------------------------------------------
# The preparation pipeline.


@dataclasses.dataclass
class _Rows:
  """The pipeline's working set: one entry per interaction row.

  Mutable on purpose: each step replaces the arrays it changes, so the old ones are freed at once
  instead of living on in a caller's variables (Alibaba's columns alone are about 0.7 GB).
  """

  users: np.ndarray | None  # [N] raw ids, then int32 codes into `user_ids`
  items: np.ndarray | None  # [N] raw ids, then int32 codes into `item_ids`
  # [N] the order among a pair's repeats (the first is kept), which later decides its side:
  # seconds for the temporal split, 0 (train.txt) / 1 (test.txt) for the published one.
  phases: np.ndarray | None
  user_ids: np.ndarray | None = None  # [U] sorted raw ids
  item_ids: np.ndarray | None = None  # [I] sorted raw ids

  def select(self, keep: np.ndarray) -> None:
    """Keeps the rows where `keep` [N] is True."""
    self.users = self.users[keep]
    self.items = self.items[keep]
    if self.phases is not None:
      self.phases = self.phases[keep]

  def compact(self) -> None:
    """Drops the ids that no row uses any more and renumbers the codes in order."""
    self.user_ids, self.users = _compact(self.user_ids, self.users)
    self.item_ids, self.items = _compact(self.item_ids, self.items)


def _read(settings: dict, source: str, statistics: dict) -> _Rows:
  """Reads the source into rows of raw ids, with phases for the published and temporal splits."""
  kind, split = settings["kind"], settings["split"]
  if kind in _LIGHTGCN_KINDS:
    if split == "temporal":
      raise ValueError(
        f"config.data.split='temporal' needs timestamps; LightGCN files ({source}) have none"
      )
    if os.path.isdir(source):
      train, test = readers.read_lightgcn_split(source)
      statistics["rows_read"] = {"train.txt": len(train), "test.txt": len(test)}
      phases = None
      if split == "published":
        phases = np.repeat(np.array([0, 1], dtype=np.int8), [len(train), len(test)])
      return _Rows(
        users=np.concatenate([train.users, test.users]),
        items=np.concatenate([train.items, test.items]),
        phases=phases,
      )
    table = readers.read_lightgcn(source)
  elif kind == "movielens":
    table = readers.read_movielens(source)
  elif kind == "alibaba":
    table = readers.read_user_behavior(source, behaviors=settings["behaviors"])
  else:
    table = readers.read_table(
      source,
      **settings["columns"],
      delimiter=settings["delimiter"],
      header=settings["header"],
      timestamp_unit=settings.get("timestamp_unit", "s"),
    )
  if split == "published":
    raise ValueError(
      f"config.data.split='published' needs a LightGCN folder with train.txt and test.txt; "
      f"{source} is a single {kind} file"
    )
  if split == "temporal" and table.timestamps is None:
    raise ValueError(
      f"config.data.split='temporal' needs timestamps, and {source} ({kind}) has none"
      + (" (set config.data.columns.timestamp)" if kind == "csv" else "")
    )
  statistics["rows_read"] = len(table)
  rows = _Rows(
    users=table.users,
    items=table.items,
    phases=table.timestamps if split == "temporal" else None,
  )
  if "min_rating" in settings:
    # Compared in the ratings' float32, so a minimum of 0.1 keeps a rating written as 0.1.
    keep = table.ratings >= settings["min_rating"]  # [N]
    statistics["rows_below_min_rating"] = int(keep.size - np.count_nonzero(keep))
    if not keep.any():
      raise ValueError(
        f"config.data.min_rating={settings['min_rating']} drops every row of {source}: its "
        f"highest rating is {float(np.nanmax(table.ratings, initial=-np.inf))}"
      )
    rows.select(keep)
  return rows


def _remap(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns the sorted distinct raw ids [K] and each row's code [N] int32 (raw == ids[codes])."""
  if raw.dtype.kind in "iu" and raw.size and raw.min() >= 0 and raw.max() < 4 * raw.size + 2**20:
    # Ids dense enough for a lookup table: linear time, no sort.
    seen = np.zeros(int(raw.max()) + 1, dtype=bool)
    seen[raw] = True
    codes = (np.cumsum(seen, dtype=np.int32) - 1)[raw]
    return np.flatnonzero(seen).astype(raw.dtype), codes
  # Sort and compare: np.unique is many times slower on large int64 arrays.
  ids = np.sort(raw)
  if ids.size:
    ids = ids[np.concatenate([[True], ids[1:] != ids[:-1]])]
  return ids, np.searchsorted(ids, raw).astype(np.int32)


def _dedupe(rows: _Rows, *, span: int) -> int:
  """Keeps each (user, item) pair once, at its smallest phase, sorted; returns the number dropped.

  `span` bounds the phases: 0 <= phase < span.
  """
  num_items = rows.item_ids.size
  pairs = rows.users.astype(np.int64)  # [E]
  rows.users = None
  pairs *= num_items
  pairs += rows.items
  rows.items = None
  if rows.phases is None:
    pairs.sort()
  elif rows.user_ids.size * num_items * span <= np.iinfo(np.int64).max:
    # One int64 key (pair, phase) sorts several times faster than a two-key lexsort.
    pairs *= span
    pairs += rows.phases
    rows.phases = None
    pairs.sort()
    rows.phases = pairs % span
    pairs //= span
  else:
    order = np.lexsort((rows.phases, pairs))  # [E]
    pairs = pairs[order]
    rows.phases = rows.phases[order]
  opens = np.ones(pairs.size, dtype=bool)  # [E]; the first row of each pair
  np.not_equal(pairs[1:], pairs[:-1], out=opens[1:])
  pairs = pairs[opens]  # [P]
  if rows.phases is not None:
    rows.phases = rows.phases[opens]
  rows.users = (pairs // num_items).astype(np.int32)
  pairs %= num_items
  rows.items = pairs.astype(np.int32)
  return int(opens.size - pairs.size)


def _count_filter(users, items, *, num_users, num_items, min_user, min_item, k_core):
  """Returns a keep mask [E] for the minimum counts and the number of passes that dropped rows.

  One pass drops by the counts taken before it; with `k_core` passes repeat until none drops.
  """
  keep = np.ones(users.size, dtype=bool)  # [E]
  rounds = 0
  while min_user > 1 or min_item > 1:
    per_user = np.bincount(users[keep], minlength=num_users)  # [U]
    per_item = np.bincount(items[keep], minlength=num_items)  # [I]
    drop = keep & ((per_user[users] < min_user) | (per_item[items] < min_item))  # [E]
    if not drop.any():
      break
    keep &= ~drop
    rounds += 1
    if not k_core:
      break
  return keep, rounds


def _compact(ids: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Drops ids no code refers to and renumbers the codes, keeping their order."""
  used = np.bincount(codes, minlength=ids.size) > 0  # [K]
  if used.all():
    return ids, codes
  renumber = np.cumsum(used, dtype=np.int32) - 1  # [K]
  return ids[used], renumber[codes]


def _utc(seconds: int) -> str:
  return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).isoformat()


def _no_test_cause(settings: dict, statistics: dict, test_before_filter: int) -> str:
  """Explains, for the error, which step left the data set without test interactions."""
  filters = (
    f"min_user_interactions={settings['min_user_interactions']}, "
    f"min_item_interactions={settings['min_item_interactions']}, k_core={settings['k_core']}"
  )
  if statistics["interactions"] == 0 and statistics["filter"]["interactions_dropped"]:
    return f"the filters ({filters}) removed every interaction"
  if settings["split"] == "random":
    if settings["test_fraction"] == 0:
      return "config.data.test_fraction is 0"
    return f"no user has two interactions left after the filters ({filters})"
  if test_before_filter:
    return f"the filters ({filters}) removed all {test_before_filter} test interactions"
  if settings["split"] == "temporal":
    window = statistics["window"]
    cause = (
      f"the temporal split's test window (the last {settings['test_days']} day(s): "
      f"{window['test_start']} to {window['end']}) holds no interactions"
    )
    if "end_time" in settings:
      cause += (
        f" ({statistics['rows_before_window']} row(s) lie before the train window and "
        f"{statistics['rows_after_window']} at or after config.data.end_time)"
      )
    return cause
  return "test.txt holds no pair that is not also in train.txt"


def _build(settings: dict, source: str) -> tuple[data.Dataset, dict]:
  """Runs the pipeline on `source`; returns the data set and its statistics."""
  statistics = {}
  rows = _read(settings, source, statistics)
  rows.user_ids, rows.users = _remap(rows.users)
  rows.item_ids, rows.items = _remap(rows.items)
  split, span, test_phase = settings["split"], 2, 1
  if split == "temporal":
    end = settings.get("end_time")
    if end is None:
      end = int(rows.phases.max()) + 1
    test_start = end - round(settings["test_days"] * _DAY_SECONDS)
    train_start = test_start - round(settings["train_days"] * _DAY_SECONDS)
    inside = rows.phases >= train_start  # [N]
    statistics["rows_before_window"] = int(inside.size - np.count_nonzero(inside))
    after = rows.phases >= end  # [N]
    statistics["rows_after_window"] = int(np.count_nonzero(after))
    inside &= ~after
    del after
    statistics["window"] = {
      "train_start": _utc(train_start),
      "test_start": _utc(test_start),
      "end": _utc(end),
      "seconds": [train_start, test_start, end],
    }
    rows.select(inside)
    del inside
    rows.phases -= train_start
    # Ids seen only before the window go now, so that the filter's counts below are its own.
    rows.compact()
    span, test_phase = end - train_start, test_start - train_start
  statistics["duplicates_dropped"] = _dedupe(rows, span=span)
  is_test = None if rows.phases is None else rows.phases >= test_phase  # [P]
  rows.phases = None
  test_before_filter = 0 if is_test is None else int(np.count_nonzero(is_test))

  num_users, num_items = rows.user_ids.size, rows.item_ids.size
  keep, rounds = _count_filter(
    rows.users,
    rows.items,
    num_users=num_users,
    num_items=num_items,
    min_user=settings["min_user_interactions"],
    min_item=settings["min_item_interactions"],
    k_core=settings["k_core"],
  )
  rows.select(keep)
  if is_test is not None:
    is_test = is_test[keep]
  rows.compact()
  statistics["filter"] = {
    "users_dropped": int(num_users - rows.user_ids.size),
    "items_dropped": int(num_items - rows.item_ids.size),
    "interactions_dropped": int(keep.size - np.count_nonzero(keep)),
    "rounds": rounds,
  }
  del keep
  users, items = rows.users, rows.items
  statistics["interactions"] = int(users.size)

  _, test_seed, valid_seed = data.split_seeds(settings["seed"])
  if split == "random":
    is_test = data.split_per_user(
      users, items, test_fraction=settings["test_fraction"], seed=test_seed
    )
  if not is_test.any():
    raise ValueError(
      f"{settings['kind']} data at {source} has zero test users after the {split} split: "
      + _no_test_cause(settings, statistics, test_before_filter)
    )
  dataset = data.with_validation(
    settings["kind"], int(rows.user_ids.size), int(rows.item_ids.size), users, items, is_test,
    valid_fraction=settings["valid_fraction"], valid_seed=valid_seed,
    user_ids=rows.user_ids, item_ids=rows.item_ids,
  )
  summary = dataset.summary()
  del summary["name"]
  statistics.update(summary)
  return dataset, statistics


def prepare_dataset(
  data_config: ml_collections.ConfigDict, *, source: str | None = None
) -> data.Dataset:
  """Reads and splits the data of `data_config` (from `source` if given), without the cache."""
  settings = _settings(data_config)
  return _build(settings, locate_source(settings["kind"], source or data_config.path))[0]


# ---------------------------------------------------------------------------------------------
# The cache.

_ARRAYS = (
  "train_users",
  "train_items",
  "valid_users",
  "valid_items",
  "test_users",
  "test_items",
  "user_ids",
  "item_ids",
)


def _stale_reason(
  *, arrays_path: str, manifest_path: str, settings: dict, fingerprint: dict
) -> str | None:
  """Why the cache at these paths cannot be reused for these settings and source, or None."""
  if not os.path.exists(manifest_path):
    return f"no prepared cache at {manifest_path}"
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
    version, cached, files = manifest["format_version"], manifest["settings"], manifest["source"]
  except (OSError, ValueError, KeyError, TypeError) as error:
    return f"the manifest {manifest_path} is unreadable ({error!r})"
  if version != FORMAT_VERSION:
    return f"the cache has format version {version}, this code writes {FORMAT_VERSION}"
  changed = [
    f"{key}: {cached.get(key)!r} -> {settings.get(key)!r}"
    for key in sorted(set(cached) | set(settings))
    if cached.get(key) != settings.get(key)
  ]
  if changed:
    return "settings changed (" + "; ".join(changed) + ")"
  if files != fingerprint:
    changed = sorted(
      name for name in set(files) | set(fingerprint) if files.get(name) != fingerprint.get(name)
    )
    return f"the source changed: {', '.join(changed)} differ(s) from the cached size / SHA-256"
  expected = manifest.get("arrays", {})
  if not os.path.exists(arrays_path) or expected.get("sha256") != fileio.file_sha256(arrays_path):
    return f"the arrays file {arrays_path} is missing or does not match its manifest"
  return None


def _temporary_name(path: str) -> str:
  """A hidden name beside `path`, unique per process and call."""
  folder, name = os.path.split(path)
  return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _write_cache(
  dataset: data.Dataset, manifest: dict, *, arrays_path: str, manifest_path: str
) -> None:
  """Writes the arrays and then the manifest, each to a temporary name renamed into place."""
  os.makedirs(os.path.dirname(arrays_path), exist_ok=True)
  arrays_temp, manifest_temp = _temporary_name(arrays_path), _temporary_name(manifest_path)
  try:
    with open(arrays_temp, "xb") as f:
      np.savez(f, **{name: getattr(dataset, name) for name in _ARRAYS})
    manifest["arrays"] = {
      "file": os.path.basename(arrays_path),
      "bytes": os.path.getsize(arrays_temp),
      "sha256": fileio.file_sha256(arrays_temp),
    }
    with open(manifest_temp, "x", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, ensure_ascii=False)
    # The manifest is the commit mark: the old one goes first, so a crash between the two renames
    # leaves no manifest (a rebuild), never an old manifest beside new arrays.
    with contextlib.suppress(FileNotFoundError):
      os.remove(manifest_path)
    os.replace(arrays_temp, arrays_path)
    os.replace(manifest_temp, manifest_path)
  finally:
    for path in (arrays_temp, manifest_temp):
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _load_cache(arrays_path: str, name: str) -> data.Dataset:
  with np.load(arrays_path, allow_pickle=False) as arrays:
    columns = {key: arrays[key] for key in _ARRAYS}
  return data.Dataset(
    name=name,
    num_users=int(columns["user_ids"].size),
    num_items=int(columns["item_ids"].size),
    **columns,
  )


def _load_or_prepare(data_config: ml_collections.ConfigDict) -> tuple[data.Dataset, dict]:
  """Returns the data set of `data_config` and its manifest, rebuilding a stale cache."""
  settings = _settings(data_config)
  source = locate_source(settings["kind"], data_config.path)
  arrays_path, manifest_path = cache_paths(data_config)
  fingerprint = _fingerprint(source)
  reason = _stale_reason(
    arrays_path=arrays_path, manifest_path=manifest_path, settings=settings, fingerprint=fingerprint
  )
  if reason is None:
    logging.info("Reusing the prepared cache %s.", arrays_path)
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
    return _load_cache(arrays_path, settings["kind"]), manifest
  logging.info("Preparing %s data from %s: %s.", settings["kind"], source, reason)
  start = time.perf_counter()
  dataset, statistics = _build(settings, source)
  statistics["seconds"] = round(time.perf_counter() - start, 2)
  manifest = {
    "format_version": FORMAT_VERSION,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "settings": settings,
    "source": fingerprint,
    "source_path": os.path.abspath(source),
    "statistics": statistics,
  }
  try:
    _write_cache(dataset, manifest, arrays_path=arrays_path, manifest_path=manifest_path)
  except OSError as error:
    logging.warning("Could not write the prepared cache %s (%s); using the data uncached.",
                    arrays_path, error)
  logging.info("Prepared %s: %s", settings["kind"], statistics)
  return dataset, manifest


def load_or_prepare(data_config: ml_collections.ConfigDict) -> data.Dataset:
  """Returns the data set of `data_config`, from its cache when that matches source and settings."""
  return _load_or_prepare(data_config)[0]


# ---------------------------------------------------------------------------------------------
# Download and the command line.


def download(url: str, *, out_dir: str, sha256: str = "") -> str:
  """Downloads `url` into `out_dir`, verifies its SHA-256 and returns the file's path."""
  known = KNOWN_ARCHIVES.get(url.replace("http://", "https://", 1), "")
  expected = (sha256 or known).lower()
  if not expected:
    raise ValueError(f"no known SHA-256 for {url}; pass --sha256=<hex digest> to verify it")
  name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
  target = os.path.join(out_dir, name)
  if os.path.isfile(target) and fileio.file_sha256(target) == expected:
    logging.info("Reusing %s (SHA-256 verified).", target)
    return target
  os.makedirs(out_dir, exist_ok=True)
  partial = _temporary_name(target)
  try:
    digest, received = hashlib.sha256(), 0
    with open(partial, "xb") as f, urllib.request.urlopen(url, timeout=60) as response:
      declared = response.headers.get("Content-Length")
      try:
        while chunk := response.read(1 << 20):
          f.write(chunk)
          digest.update(chunk)
          received += len(chunk)
      except http.client.IncompleteRead as error:
        raise ValueError(f"the download of {url} broke off after {received} bytes") from error
    if declared is not None and received != int(declared):
      raise ValueError(f"the download of {url} is truncated: {received} of {declared} bytes")
    if digest.hexdigest() != expected:
      raise ValueError(
        f"the download of {url} has SHA-256 {digest.hexdigest()}, expected {expected}; "
        "it was deleted"
      )
    os.replace(partial, target)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(partial)
  return target


def unpack(archive: str, *, out_dir: str) -> str:
  """Extracts a zip archive into `out_dir` (once) and returns the folder; other files as is."""
  if not zipfile.is_zipfile(archive):
    return archive
  target = os.path.join(out_dir, os.path.splitext(os.path.basename(archive))[0])
  if os.path.isdir(target):
    return target
  scratch = _temporary_name(target)
  os.mkdir(scratch)
  try:
    with zipfile.ZipFile(archive) as zipped:
      root = os.path.realpath(scratch)
      for member in zipped.namelist():
        if not os.path.realpath(os.path.join(root, member)).startswith(root + os.sep):
          raise ValueError(f"{archive}: the member {member!r} would land outside {out_dir}")
      zipped.extractall(scratch)
    os.replace(scratch, target)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return target


# config.data keys without a flag of their own: --dataset, --source and --out give the kind, the
# path and the cache folder, and nothing is prepared for the generated graph.
_UNFLAGGED = ("kind", "path", "cache_dir", "synthetic", "columns")
_FLAG_CHOICES = {"split": formats.SPLITS, "timestamp_unit": config_lib.TIMESTAMP_UNITS}


def _data_flags() -> list[tuple[str, str, object]]:
  """(flag name, config.data key, schema default) for each key the command line can set."""
  defaults = config_lib.default_config().data
  names = [(key, key, value) for key, value in defaults.items() if key not in _UNFLAGGED]
  names += [(f"{role}_column", f"columns.{role}", value)
            for role, value in defaults.columns.items()]
  return names


def _define_flags():
  """The command line: the source, then one flag per key of the schema's `config.data`."""
  flags.DEFINE_enum("dataset", None, tuple(formats.FILE_KINDS),
                    "The data kind (config.data.kind).")
  flags.DEFINE_string("source", None, "A file or folder, or an http(s) URL to download.")
  flags.DEFINE_string("out", None, "Folder for the download and the prepared cache.")
  flags.DEFINE_string("sha256", "", "Expected SHA-256 of a downloaded file (else a known one).")
  for name, key, default in _data_flags():
    text = f"config.data.{key} (schema default {default!r})."
    if name in _FLAG_CHOICES:
      flags.DEFINE_enum(name, None, _FLAG_CHOICES[name], text)
    elif isinstance(default, bool):
      flags.DEFINE_bool(name, None, text)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, None, text)
    elif isinstance(default, float):
      flags.DEFINE_float(name, None, text)
    elif isinstance(default, str):
      flags.DEFINE_string(name, None, text)
    elif isinstance(default, tuple):
      flags.DEFINE_list(name, None, text)
    else:
      raise TypeError(f"config.data.{key}: no flag type for {type(default).__name__}")
  flags.mark_flags_as_required(["dataset", "source", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    _prepare_from_flags(flags.FLAGS)
  except (ValueError, OSError) as error:
    # Bad input and failed downloads are the user's to fix: the message, not a traceback.
    sys.exit(f"prepare: {error}")


def _prepare_from_flags(values: flags.FlagValues) -> None:
  """Downloads and unpacks the source if it is a URL, prepares it and prints the statistics."""
  data_config = config_lib.default_config().data
  data_config.kind = values.dataset
  data_config.cache_dir = values.out
  source = values.source
  if urllib.parse.urlparse(source).scheme in ("http", "https"):
    archive = download(source, out_dir=values.out, sha256=values.sha256)
    source = unpack(archive, out_dir=values.out)
  data_config.path = locate_source(values.dataset, source)
  for name, key, default in _data_flags():
    value = values[name].value
    if value is not None:
      *parents, leaf = key.split(".")
      section = data_config
      for parent in parents:
        section = section[parent]
      section[leaf] = tuple(value) if isinstance(default, tuple) else value
  _, manifest = _load_or_prepare(data_config)
  arrays_path, _ = cache_paths(data_config)
  report = {
    "config.data.path": data_config.path,
    "config.data.cache_dir": data_config.cache_dir,
    "cache": arrays_path,
    "statistics": manifest["statistics"],
  }
  print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
