"""The popularity baseline: items ranked by one user-independent score, exclusions per user."""

import numpy as np

from hashgnn_jax.retrieval import codes as codes_lib


class ScoreRanking:
  """Items ranked by one user-independent score (e.g. popularity), with per-user exclusions.

  Scores are compared in float32 (integer counts are exact below 2**24); ties follow `tie_order`;
  items scored -inf are never ranked. The ranking is sorted once; `top` only drops exclusions.
  """

  def __init__(self, item_scores, *, tie_order):
    item_scores = np.asarray(item_scores, dtype=np.float32)
    if item_scores.ndim != 1:
      raise ValueError(f"item_scores must have shape [I], got {item_scores.shape}.")
    self.num_items = item_scores.shape[0]
    tie_order = np.asarray(tie_order)
    is_permutation = np.array_equal(np.sort(tie_order), np.arange(self.num_items))
    if tie_order.shape != (self.num_items,) or not is_permutation:
      raise ValueError(f"tie_order must be a permutation of range({self.num_items}).")
    permuted = item_scores[tie_order]
    # A stable sort of the permuted scores is the tie-breaking rule itself.
    order = tie_order[np.argsort(-permuted, kind="stable")]
    self._ranked = order[: np.count_nonzero(~np.isneginf(permuted))]  # [R] item ids, best first

  def top(self, *, num_results: int, exclude=None, num_users: int | None = None) -> np.ndarray:
    """Best `num_results` item ids int64 [C, n] per user, -1 filled.

    Exactly one of `exclude` ([C, L] item ids, -1 padded) or `num_users` (C) sets the chunk size.
    """
    if (exclude is None) == (num_users is None):
      raise ValueError("Pass exactly one of exclude (per-user exclusions) or num_users.")
    if not 1 <= num_results <= self.num_items:
      raise ValueError(f"num_results={num_results} must lie in [1, num_items={self.num_items}].")
    width = 0
    if exclude is not None:
      exclude = codes_lib.check_exclude(exclude, num_users=np.shape(exclude)[0],
                                        num_items=self.num_items)
      num_users, width = exclude.shape
    # A user's top n lies within the global top n + L: at most L of those are excluded.
    candidates = self._ranked[:num_results + width]  # [k]
    kept = np.ones((num_users, len(candidates)), bool)  # [C, k]
    if width:
      # One int64 key per (row, item) pair turns set membership into a sorted search.
      row_keys = np.arange(num_users)[:, None] * (self.num_items + 1)  # [C, 1]
      excluded = np.sort((row_keys + np.where(exclude >= 0, exclude, self.num_items)).ravel())
      keys = row_keys + candidates  # [C, k]
      kept = excluded[np.minimum(np.searchsorted(excluded, keys), excluded.size - 1)] != keys
    rank = np.cumsum(kept, axis=1) - 1  # [C, k]
    rows, cols = np.nonzero(kept & (rank < num_results))
    item_ids = np.full((num_users, num_results), -1, np.int64)
    item_ids[rows, rank[rows, cols]] = candidates[cols]
    return item_ids


def rank_by_item_score(
  item_scores,
  *,
  num_results: int,
  tie_order,
  exclude=None,
  num_users: int | None = None,
) -> np.ndarray:
  """One-off `ScoreRanking(item_scores, tie_order=tie_order).top(...)`; item ids int64 [C, n]."""
  return ScoreRanking(item_scores, tie_order=tie_order).top(
    num_results=num_results, exclude=exclude, num_users=num_users
  )
