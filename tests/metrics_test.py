"""Tests for hashgnn_jax.metrics on hand-worked rankings and a naive set-based reference."""

import json

import numpy as np
import pytest

from hashgnn_jax.evaluation import metrics

_NUM_ITEMS = 10
# User 0 has test items {5, 7}; user 1 has {0, 3, 4, 6, 8} (more than the ranking width of 4).
# The pair (0, 9) has key 0 * 10 + 9 = 9, exactly what user 1 with padding item -1 would map to.
_TEST_USERS = np.array([1, 0, 1, 1, 0, 1, 1, 0])
_TEST_ITEMS = np.array([3, 5, 4, 8, 7, 6, 0, 9])
_NUM_TEST = np.array([3, 5])  # user 0 counts (0, 9) too
_RANKED = np.array([[5, 1, 7, 2], [-1, 3, 9, 4]])
_USER_IDS = np.array([0, 1])


def _hand_hits():
  return metrics.hit_matrix(_RANKED, _USER_IDS, _TEST_USERS, _TEST_ITEMS, _NUM_ITEMS)


def test_hit_matrix_by_hand():
  # The -1 in row 1 must not match the (0, 9) pair despite the colliding key.
  np.testing.assert_array_equal(
    _hand_hits(), [[True, False, True, False], [False, True, False, True]]
  )


def test_recall_by_hand():
  hits = _hand_hits()
  # User 0: hits at ranks 1 and 3 of 3 test items -> @2: 1/3, @4: 2/3.
  # User 1: hits at ranks 2 and 4 of 5 test items -> @2: 1/5, @4: 2/5.
  np.testing.assert_allclose(metrics.recall_at(hits, _NUM_TEST, 2), [1 / 3, 0.2])
  np.testing.assert_allclose(metrics.recall_at(hits, _NUM_TEST, 4), [2 / 3, 0.4])


def test_ndcg_by_hand():
  hits = _hand_hits()
  # User 0 @2: DCG = 1; IDCG = 1 + 1/log2(3) = 1.6309297536 -> 0.6131471928.
  # User 0 @4: DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3) + 1/log2(4) = 2.1309297536
  #   -> 0.7039180890.
  # User 1 @2: DCG = 1/log2(3) = 0.6309297536; IDCG = 1.6309297536 -> 0.3868528072.
  # User 1 @4 (5 test items, IDCG truncated at 4 ranks): DCG = 1/log2(3) + 1/log2(5) = 1.0616063116;
  #   IDCG = 1 + 1/log2(3) + 1/log2(4) + 1/log2(5) = 2.5616063116 -> 0.4144299250.
  np.testing.assert_allclose(
    metrics.ndcg_at(hits, _NUM_TEST, 2), [0.6131471928, 0.3868528072], rtol=1e-9
  )
  np.testing.assert_allclose(
    metrics.ndcg_at(hits, _NUM_TEST, 4), [0.7039180890, 0.4144299250], rtol=1e-9
  )


def test_ndcg_two_test_items_hits_at_one_and_three():
  # Hits at ranks 1 and 3 of 2 test items: DCG = 1 + 1/2 = 1.5, IDCG = 1 + 1/log2(3)
  #   -> 0.9197207891; recall@3 = 2/2 = 1.
  hits = np.array([[True, False, True]])
  np.testing.assert_allclose(metrics.ndcg_at(hits, np.array([2]), 3), [0.9197207891], rtol=1e-9)
  np.testing.assert_allclose(metrics.recall_at(hits, np.array([2]), 3), [1.0])


def test_cutoff_wider_than_ranking_raises():
  hits = _hand_hits()
  with pytest.raises(ValueError, match="n=5"):
    metrics.recall_at(hits, _NUM_TEST, 5)
  with pytest.raises(ValueError, match="n=5"):
    metrics.ndcg_at(hits, _NUM_TEST, 5)


def test_non_positive_num_test_raises():
  with pytest.raises(ValueError, match="num_test"):
    metrics.recall_at(_hand_hits(), np.array([3, 0]), 2)


def test_ranking_metrics_and_summarize():
  per_user = metrics.ranking_metrics(_hand_hits(), _NUM_TEST, cutoffs=(2, 4))
  assert list(per_user) == ["hr@2", "hr@4", "ndcg@2", "ndcg@4"]
  np.testing.assert_allclose(per_user["hr@4"], [2 / 3, 0.4])
  summary = metrics.summarize(per_user)
  assert all(type(value) is float for value in summary.values())
  np.testing.assert_allclose(summary["hr@4"], (2 / 3 + 0.4) / 2)
  json.dumps(summary)


def test_hit_matrix_matches_set_reference():
  rng = np.random.default_rng(0)
  num_users, num_items = 40, 60
  pairs = np.unique(rng.integers(0, [num_users, num_items], size=(500, 2)), axis=0)
  pairs = pairs[rng.permutation(len(pairs))]
  user_ids = rng.choice(num_users, size=25, replace=False)
  ranked = rng.integers(-1, num_items, size=(25, 30))
  hits = metrics.hit_matrix(ranked, user_ids, pairs[:, 0], pairs[:, 1], num_items)
  test_sets = {}
  for user, item in pairs:
    test_sets.setdefault(user, set()).add(item)
  want = [
    [item in test_sets.get(user, set()) for item in row] for user, row in zip(user_ids, ranked)
  ]
  assert hits.dtype == bool
  np.testing.assert_array_equal(hits, want)
  assert hits.any() and not hits.all()


def test_hit_matrix_without_test_pairs():
  hits = metrics.hit_matrix(_RANKED, _USER_IDS, np.array([], int), np.array([], int), _NUM_ITEMS)
  np.testing.assert_array_equal(hits, np.zeros((2, 4), dtype=bool))


def test_retrieved_ndcg_hand_worked():
  # Hits at ranks 2 and 4 of a 4-long list; 5 test items. Ideal: 2 retrieved hits at ranks 1, 2.
  hits = np.array([[False, True, False, True], [False, False, False, False]])
  num_test = np.array([5, 3])
  dcg = 1 / np.log2(3) + 1 / np.log2(5)
  idcg = 1 / np.log2(2) + 1 / np.log2(3)
  np.testing.assert_allclose(metrics.retrieved_ndcg_at(hits, num_test, 4), [dcg / idcg, 0.0])
  # At n = 2 only one ideal hit counts: min(2, 2) = 2 hits, DCG has one.
  np.testing.assert_allclose(metrics.retrieved_ndcg_at(hits, num_test, 2),
                             [(1 / np.log2(3)) / idcg, 0.0])
  # The standard NDCG's ideal uses min(n, 5) = 4 hits, so it is lower.
  assert metrics.ndcg_at(hits, num_test, 4)[0] < metrics.retrieved_ndcg_at(hits, num_test, 4)[0]
  paper = metrics.ranking_metrics(hits, num_test, (2, 4), protocol="paper")
  np.testing.assert_allclose(paper["ndcg@4"], [dcg / idcg, 0.0])
  np.testing.assert_allclose(paper["hr@4"], [2 / 5, 0.0])
  with pytest.raises(ValueError, match="protocol"):
    metrics.ranking_metrics(hits, num_test, (2,), protocol="other")
