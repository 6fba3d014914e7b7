"""Implicit-feedback interaction data sets and their per-user train/validation/test split.

A data set is a set of unique (user, item) pairs split into train, validation and test pairs. The
random split is made per user, as usual for top-k recommendation benchmarks: every user with at
least two interactions contributes to both sides, so recall can be measured for (almost) every
user. `loader.load_dataset` builds one from `config.data`; real logs are read, cleaned, split
and cached by `prepare`.
"""

import dataclasses

import numpy as np

_SIDES = ("train", "valid", "test")


def _no_pairs() -> np.ndarray:
  return np.zeros(0, dtype=np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Train, validation and test interactions, each a set of unique pairs sorted by (user, item)."""

  name: str
  num_users: int
  num_items: int
  train_users: np.ndarray  # [E_train] int32
  train_items: np.ndarray  # [E_train] int32
  test_users: np.ndarray  # [E_test] int32
  test_items: np.ndarray  # [E_test] int32
  valid_users: np.ndarray = dataclasses.field(default_factory=_no_pairs)  # [E_valid] int32
  valid_items: np.ndarray = dataclasses.field(default_factory=_no_pairs)  # [E_valid] int32
  # Raw source ids of users [U] and items [I] (numbers or strings); None for generated data.
  user_ids: np.ndarray | None = None
  item_ids: np.ndarray | None = None

  def __post_init__(self):
    # Catch loader bugs here rather than as out-of-range gathers deep inside a jitted model.
    for side in _SIDES:
      if getattr(self, f"{side}_users").shape != getattr(self, f"{side}_items").shape:
        raise ValueError(f"{side}_users and {side}_items must have the same shape")
      for field, bound in ((f"{side}_users", self.num_users), (f"{side}_items", self.num_items)):
        ids = getattr(self, field)
        if ids.dtype != np.int32 or ids.ndim != 1:
          raise ValueError(f"{field} must be a 1-D int32 array, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= bound):
          raise ValueError(f"{field} must lie in [0, {bound}), got [{ids.min()}, {ids.max()}]")
    for field, size in (("user_ids", self.num_users), ("item_ids", self.num_items)):
      ids = getattr(self, field)
      if ids is not None and ids.shape != (size,):
        raise ValueError(f"{field} must have shape ({size},), got {ids.shape}")

  @property
  def num_train(self) -> int:
    """Number of training interactions."""
    return int(self.train_users.shape[0])

  @property
  def num_valid(self) -> int:
    """Number of validation interactions."""
    return int(self.valid_users.shape[0])

  @property
  def num_test(self) -> int:
    """Number of test interactions."""
    return int(self.test_users.shape[0])

  def summary(self) -> dict:
    """Returns the headline counts of the data set as plain Python values."""
    train_per_user = np.bincount(self.train_users, minlength=self.num_users)  # [U]
    train_per_item = np.bincount(self.train_items, minlength=self.num_items)  # [I]
    test_per_user = np.bincount(self.test_users, minlength=self.num_users)  # [U]
    test_per_item = np.bincount(self.test_items, minlength=self.num_items)  # [I]
    return {
      "name": self.name,
      "users": self.num_users,
      "items": self.num_items,
      "train_interactions": self.num_train,
      "valid_interactions": self.num_valid,
      "test_interactions": self.num_test,
      "valid_users": int(np.count_nonzero(np.bincount(self.valid_users))),
      "test_users": int(np.count_nonzero(test_per_user)),
      # Nodes without a training edge get no learned signal, which caps the reachable recall.
      "users_only_in_test": int(np.count_nonzero((test_per_user > 0) & (train_per_user == 0))),
      "items_only_in_test": int(np.count_nonzero((test_per_item > 0) & (train_per_item == 0))),
    }


def split_seeds(seed: int) -> tuple[int, int, int]:
  """Returns independent (graph, test split, validation split) seeds derived from one seed."""
  # SeedSequence states are prefix-stable, so the first two match the earlier two-seed scheme.
  graph_seed, test_seed, valid_seed = np.random.SeedSequence(seed).generate_state(3)
  return int(graph_seed), int(test_seed), int(valid_seed)


def split_per_user(
  users: np.ndarray, items: np.ndarray, *, test_fraction: float, seed: int
) -> np.ndarray:
  """Returns a bool mask [E] that is True for the pairs drawn, per user, into the test set."""
  users = np.asarray(users)
  items = np.asarray(items)
  if users.ndim != 1 or users.shape != items.shape:
    raise ValueError(
      f"users and items must be 1-D of equal length, got {users.shape}, {items.shape}"
    )
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  if users.size and users.min() < 0:
    raise ValueError("users must be non-negative ids")
  if users.size == 0 or test_fraction == 0:
    return np.zeros(users.shape, dtype=bool)

  # A random permutation gives every pair a distinct random tiebreak, so sorting by (user,
  # tiebreak) shuffles each user's pairs uniformly; a pair's rank within its user decides its side.
  # One int64 key sorts several times faster than np.lexsort on two keys.
  num_pairs = users.shape[0]
  tiebreak = np.random.default_rng(seed).permutation(num_pairs)  # [E]
  order = np.argsort(users.astype(np.int64) * num_pairs + tiebreak)  # [E]
  sorted_users = users[order]  # [E]
  per_user = np.bincount(users)  # [U]
  rank = np.arange(num_pairs) - (np.cumsum(per_user) - per_user)[sorted_users]  # [E]

  # Rounded like Python's round(): half to even.
  num_test = np.rint(test_fraction * per_user)  # [U]
  if test_fraction > 0:
    num_test = np.maximum(num_test, 1)
  # Everyone keeps a training pair, so single-interaction users never land in test.
  num_test = np.clip(num_test, 0, per_user - 1)  # [U]

  is_test = np.empty(num_pairs, dtype=bool)  # [E]
  is_test[order] = rank < num_test[sorted_users]
  return is_test


def with_validation(name: str, num_users: int, num_items: int, users: np.ndarray,
                    items: np.ndarray, is_test: np.ndarray, *, valid_fraction: float,
                    valid_seed: int, **id_maps) -> Dataset:
  """The Dataset of a test split, with `valid_fraction` of each user's training pairs held out.

  Boolean selection keeps the pairs' (user, item) order on every side. `id_maps` passes
  `user_ids` / `item_ids` through.
  """
  train_users, train_items = users[~is_test], items[~is_test]
  is_valid = split_per_user(train_users, train_items, test_fraction=valid_fraction,
                            seed=valid_seed)
  return Dataset(
    name=name,
    num_users=num_users,
    num_items=num_items,
    train_users=train_users[~is_valid],
    train_items=train_items[~is_valid],
    valid_users=train_users[is_valid],
    valid_items=train_items[is_valid],
    test_users=users[is_test],
    test_items=items[is_test],
    **id_maps,
  )
