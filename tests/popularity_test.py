"""Tests for the popularity baseline (evaluation.popularity) against hand-worked rankings."""

import numpy as np
import pytest

from hashgnn_jax.evaluation import popularity as popularity_lib
from hashgnn_jax.retrieval import codes as codes_lib


def test_rank_by_item_score_by_hand():
  # Score 7: items 1 and 4, and 4 comes first in tie_order. Score 3: items 2, 0, 3 in that order.
  scores = np.array([3, 7, 3, 3, 7])
  tie_order = np.array([4, 2, 0, 1, 3])
  ids = popularity_lib.rank_by_item_score(scores, num_results=5, tie_order=tie_order, num_users=2)
  np.testing.assert_array_equal(ids, [[4, 1, 2, 0, 3]] * 2)
  exclude = np.array([[4, 2, -1], [-1, -1, -1], [0, 1, 2]])
  ids = popularity_lib.rank_by_item_score(scores, num_results=3, tie_order=tie_order,
                                          exclude=exclude)
  np.testing.assert_array_equal(ids, [[1, 0, 3], [4, 1, 2], [4, 3, -1]])


def test_rank_by_item_score_validation():
  with pytest.raises(ValueError, match="exactly one"):
    popularity_lib.rank_by_item_score(np.ones(3), num_results=2, tie_order=np.arange(3))
  with pytest.raises(ValueError, match="exactly one"):
    popularity_lib.rank_by_item_score(
      np.ones(3), num_results=2, tie_order=np.arange(3), num_users=1, exclude=np.zeros((1, 1))
    )
  with pytest.raises(ValueError, match="permutation"):
    popularity_lib.rank_by_item_score(np.ones(3), num_results=2, tie_order=np.zeros(3), num_users=1)


def test_score_ranking_matches_reference_with_ties_and_exclusions():
  rng = np.random.default_rng(2)
  scores = rng.integers(0, 4, 50).astype(np.float32)  # Heavy ties.
  scores[[3, 17]] = -np.inf  # Never ranked.
  tie_order = codes_lib.tie_break_order(50, seed=9)
  exclude = np.full((6, 45), -1)
  for row in range(6):
    count = 45 if row == 0 else rng.integers(0, 20)
    exclude[row, :count] = rng.choice(50, size=count, replace=False)
  ranking = popularity_lib.ScoreRanking(scores, tie_order=tie_order)
  ids = ranking.top(num_results=8, exclude=exclude)
  # Best first: by score descending, then by position in tie_order.
  ranked = np.lexsort((np.argsort(tie_order), -scores))  # [I]
  for row in range(6):
    kept = [i for i in ranked if i not in set(exclude[row]) and np.isfinite(scores[i])][:8]
    np.testing.assert_array_equal(ids[row], kept + [-1] * (8 - len(kept)), err_msg=str(row))
  # The ranking is reusable: no exclusions means the global order for every user.
  np.testing.assert_array_equal(ranking.top(num_results=8, num_users=2), [ranked[:8]] * 2)
