"""Tests for the planted-community synthetic interaction generator."""

import itertools
import pathlib
import sys

import numpy as np
import pytest

from hashgnn_jax import config_lib
from hashgnn_jax.data import synthetic

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import alibaba  # pylint: disable=g-import-not-at-top

_SMALL = {
  "num_users": 300,
  "num_items": 200,
  "num_communities": 8,
  "mean_items_per_user": 15,
  "min_items_per_user": 3,
  "popularity_exponent": 1.0,
  "in_community_prob": 0.8,
}
_MEDIUM = dict(_SMALL, num_users=3000, num_items=2000, num_communities=20, mean_items_per_user=30)


def _keys(users, items, num_items):
  return users.astype(np.int64) * num_items + items


def test_same_seed_same_graph():
  first = synthetic.generate_interactions(seed=3, **_SMALL)
  second = synthetic.generate_interactions(seed=3, **_SMALL)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])


def test_different_seed_different_graph():
  first = synthetic.generate_interactions(seed=3, **_SMALL)
  second = synthetic.generate_interactions(seed=4, **_SMALL)
  assert first[0].shape != second[0].shape or np.any(first[1] != second[1])


def test_pairs_are_unique_sorted_and_in_range():
  users, items = synthetic.generate_interactions(seed=0, **_SMALL)
  assert users.dtype == np.int32 and items.dtype == np.int32
  assert users.shape == items.shape
  # Strictly increasing keys mean sorted by (user, item) and no duplicates.
  assert np.all(np.diff(_keys(users, items, _SMALL["num_items"])) > 0)
  assert users.min() >= 0 and users.max() < _SMALL["num_users"]
  assert items.min() >= 0 and items.max() < _SMALL["num_items"]
  # With min_items_per_user >= 1 every user id shows up.
  assert np.unique(users).size == _SMALL["num_users"]


def test_activity_mean_floor_and_structure_agree():
  users, items, structure = synthetic.generate_interactions(
    seed=0, return_structure=True, **_MEDIUM
  )
  degree = np.bincount(users, minlength=_MEDIUM["num_users"])
  np.testing.assert_array_equal(degree, structure.user_activity)
  assert degree.min() >= _MEDIUM["min_items_per_user"]
  assert abs(degree.mean() / _MEDIUM["mean_items_per_user"] - 1) < 0.15
  # Heavy tail: the busiest users are far above the mean.
  assert degree.max() > 5 * _MEDIUM["mean_items_per_user"]
  assert items.shape == users.shape


def test_popularity_is_heavy_tailed():
  _, items = synthetic.generate_interactions(seed=0, **_MEDIUM)
  counts = np.sort(np.bincount(items, minlength=_MEDIUM["num_items"]))[::-1]
  top_decile = counts[: _MEDIUM["num_items"] // 10].sum() / counts.sum()
  assert top_decile > 0.3


def test_flat_popularity_is_not_heavy_tailed():
  config = dict(_MEDIUM, popularity_exponent=0.0, in_community_prob=0.0)
  _, items = synthetic.generate_interactions(seed=0, **config)
  counts = np.sort(np.bincount(items, minlength=config["num_items"]))[::-1]
  assert counts[: config["num_items"] // 10].sum() / counts.sum() < 0.15


def _majority_share(users, items, item_community, num_communities):
  """Mean over users of the share of their items in their most common item community."""
  per_user = np.zeros((users.max() + 1, num_communities))
  np.add.at(per_user, (users, item_community[items]), 1)
  return np.mean(per_user.max(axis=1) / per_user.sum(axis=1))


def test_planted_communities_dominate_users():
  users, items, structure = synthetic.generate_interactions(
    seed=0, return_structure=True, **_MEDIUM
  )
  num_communities = _MEDIUM["num_communities"]
  assert _majority_share(users, items, structure.item_community, num_communities) > 0.6
  # Each user's majority community is its own planted one.
  same = structure.item_community[items] == structure.user_community[users]
  assert same.mean() > 0.6
  # Control: shuffling the item communities destroys the signal.
  shuffled = np.random.default_rng(0).permutation(structure.item_community)
  assert _majority_share(users, items, shuffled, num_communities) < 0.3


def test_communities_are_visible_in_co_occurrence():
  # Recovered from the data alone: items co-occur far more with items of their own community.
  users, items, structure = synthetic.generate_interactions(seed=0, return_structure=True, **_SMALL)
  incidence = np.zeros((_SMALL["num_users"], _SMALL["num_items"]))
  incidence[users, items] = 1.0
  co_occurrence = incidence.T @ incidence
  np.fill_diagonal(co_occurrence, 0.0)
  same = structure.item_community[:, None] == structure.item_community[None, :]
  np.fill_diagonal(same, False)
  within = co_occurrence[same].mean()
  across = co_occurrence[~same].mean()
  assert within > 2 * across


def test_in_community_one_stays_inside():
  config = dict(_SMALL, in_community_prob=1.0, mean_items_per_user=20)
  users, items, structure = synthetic.generate_interactions(seed=1, return_structure=True, **config)
  np.testing.assert_array_equal(structure.item_community[items], structure.user_community[users])
  # Activity is capped at the community size (200 items / 8 communities).
  assert np.bincount(users).max() <= 25


def test_user_can_take_every_item():
  # min == num_items forces full rows, exercising the Gumbel-top-k completion path.
  config = dict(
    _SMALL,
    num_users=20,
    num_items=30,
    num_communities=3,
    min_items_per_user=30,
    mean_items_per_user=30,
  )
  users, items = synthetic.generate_interactions(seed=0, **config)
  assert users.size == 20 * 30
  np.testing.assert_array_equal(items, np.tile(np.arange(30), 20))


def test_sampling_matches_sequential_without_replacement():
  # One community holding every item: each user's set is a plain popularity-weighted sample
  # without replacement, whose inclusion probabilities are computed here by enumeration.
  config = {
    "num_users": 20000,
    "num_items": 5,
    "num_communities": 1,
    "mean_items_per_user": 2,
    "min_items_per_user": 2,
    "popularity_exponent": 1.5,
    "in_community_prob": 1.0,
  }
  _, items, structure = synthetic.generate_interactions(seed=0, return_structure=True, **config)
  weights = structure.item_popularity
  expected = np.zeros(5)
  for first, second in itertools.permutations(range(5), 2):
    prob = weights[first] / weights.sum() * weights[second] / (weights.sum() - weights[first])
    expected[[first, second]] += prob
  observed = np.bincount(items, minlength=5) / config["num_users"]
  np.testing.assert_allclose(observed, expected, atol=0.015)


def test_search_cdf_matches_searchsorted():
  rng = np.random.default_rng(0)
  # Zero weights repeat CDF values, and targets equal to CDF values probe side="right".
  cdf = np.cumsum(rng.integers(0, 3, size=50).astype(np.float64))
  targets = np.concatenate([rng.uniform(0, cdf[-1], size=1000), cdf[:20], [0.0, cdf[-1]]])
  np.testing.assert_array_equal(
    synthetic._search_cdf(cdf, targets), np.searchsorted(cdf, targets, side="right")
  )


def _alibaba_shaped(scale):
  """Returns the generator arguments of configs/alibaba.py:synthetic, shrunk by `scale`."""
  # Communities shrink in number, not size, so users collide inside them as often as at full size.
  kwargs = alibaba.get_config("synthetic").data.synthetic.to_dict()
  for key in ("num_users", "num_items", "num_communities"):
    kwargs[key] //= scale
  return kwargs


def test_alibaba_shaped_graph_at_small_scale():
  kwargs = _alibaba_shaped(100)  # 6,019 users, 41,677 items, 5 communities.
  users, items, structure = synthetic.generate_interactions(seed=0, return_structure=True, **kwargs)
  again = synthetic.generate_interactions(seed=0, **kwargs)
  np.testing.assert_array_equal(users, again[0])
  np.testing.assert_array_equal(items, again[1])
  assert np.all(np.diff(_keys(users, items, kwargs["num_items"])) > 0)
  assert items.min() >= 0 and items.max() < kwargs["num_items"]
  # Heavy-tailed activity makes the count noisy at this size; the full graph lands within 0.4%.
  expected_pairs = kwargs["num_users"] * kwargs["mean_items_per_user"]
  assert abs(users.size / expected_pairs - 1) < 0.05
  assert np.bincount(users, minlength=kwargs["num_users"]).min() >= 10
  counts = np.sort(np.bincount(items, minlength=kwargs["num_items"]))[::-1]
  assert counts[: kwargs["num_items"] // 100].sum() / counts.sum() > 0.2
  # Global draws skip the items a user already holds, its popular in-community ones among them,
  # so they land in its community a little less often than 1 / num_communities.
  same = np.mean(structure.item_community[items] == structure.user_community[users])
  prob = kwargs["in_community_prob"]
  assert abs(same - (prob + (1 - prob) / kwargs["num_communities"])) < 0.02


def test_alibaba_synthetic_config_has_the_paper_sizes():
  config = alibaba.get_config("synthetic")
  config_lib.validate(config)
  assert config.data.kind == "synthetic" and config.data.split == "random"
  cfg = config.data.synthetic
  assert (cfg.num_users, cfg.num_items) == (601_946, 4_167_708)
  assert cfg.num_users * cfg.mean_items_per_user == pytest.approx(28_489_957)
  assert cfg.min_items_per_user == 10
  assert alibaba.get_config().data.kind == "alibaba"


def test_alibaba_synthetic_combines_with_a_model_variant():
  config = alibaba.get_config("synthetic,authors_code")
  config_lib.validate(config)
  assert config.data.to_dict() == alibaba.get_config("synthetic").data.to_dict()
  assert config.model.to_dict() == alibaba.get_config("authors_code").model.to_dict()
  assert config.model.to_dict() != alibaba.get_config("synthetic").model.to_dict()
  with pytest.raises(ValueError, match="bogus"):
    alibaba.get_config("synthetic,bogus")


@pytest.mark.parametrize(
  "override, name",
  [
    ({"num_users": 0}, "num_users"),
    ({"num_items": 0}, "num_items"),
    ({"num_communities": 0}, "num_communities"),
    ({"num_communities": 201}, "num_communities"),
    ({"min_items_per_user": 0}, "min_items_per_user"),
    ({"min_items_per_user": 201}, "min_items_per_user"),
    ({"mean_items_per_user": 2}, "mean_items_per_user"),
    ({"mean_items_per_user": 500}, "mean_items_per_user"),
    ({"popularity_exponent": -0.5}, "popularity_exponent"),
    ({"in_community_prob": 1.5}, "in_community_prob"),
    ({"in_community_prob": -0.1}, "in_community_prob"),
  ],
)
def test_invalid_arguments_are_named(override, name):
  with pytest.raises(ValueError, match=name):
    synthetic.generate_interactions(seed=0, **dict(_SMALL, **override))
