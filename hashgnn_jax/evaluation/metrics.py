"""Top-n ranking metrics (NumPy), computed per user from a chunk of ranked item lists.

`recall_at` is what the HashGNN paper reports as HR@n: the fraction of a user's test items found in
the top n. `ndcg_at` is standard binary-relevance NDCG@n with the ideal ranking truncated at n.
`retrieved_ndcg_at` is the authors' code's NDCG (the "paper" protocol), whose ideal ranking holds
only the hits the retrieved list contains, which is why the paper's NDCG exceeds its HR.
"""

from collections.abc import Mapping, Sequence

import numpy as np


def hit_matrix(
  ranked_items: np.ndarray,
  user_ids: np.ndarray,
  test_users: np.ndarray,
  test_items: np.ndarray,
  num_items: int,
) -> np.ndarray:
  """Bool [C, n]: True where ranked_items[c, r] is a test item of user_ids[c]; -1 never hits."""
  ranked_items = np.asarray(ranked_items, dtype=np.int64)  # [C, n]
  user_ids = np.asarray(user_ids, dtype=np.int64)  # [C]
  if ranked_items.ndim != 2 or user_ids.shape != (ranked_items.shape[0],):
    raise ValueError(
      f"Expected ranked_items [C, n] and user_ids [C], got {ranked_items.shape} and "
      f"{user_ids.shape}."
    )
  # One int64 key per (user, item) pair turns set membership into a sorted search.
  test_keys = np.sort(
    np.asarray(test_users, dtype=np.int64) * num_items + np.asarray(test_items, dtype=np.int64)
  )  # [T]
  valid = (ranked_items >= 0) & (ranked_items < num_items)  # [C, n]
  if test_keys.size == 0:
    return np.zeros(ranked_items.shape, dtype=bool)
  query_keys = user_ids[:, None] * num_items + ranked_items  # [C, n]
  slots = np.minimum(np.searchsorted(test_keys, query_keys), test_keys.size - 1)  # [C, n]
  return valid & (test_keys[slots] == query_keys)


def _check_cutoff(hits: np.ndarray, num_test: np.ndarray, n: int) -> None:
  """Raises ValueError unless 1 <= n <= hits.shape[1] and num_test is positive, one per row."""
  if not 1 <= n <= hits.shape[1]:
    raise ValueError(f"Cutoff n={n} must lie in [1, {hits.shape[1]}] (the ranking width).")
  if num_test.shape != (hits.shape[0],) or np.any(num_test <= 0):
    raise ValueError("num_test must hold one positive count per row of hits.")


def recall_at(hits: np.ndarray, num_test: np.ndarray, n: int) -> np.ndarray:
  """Per-user recall@n (the paper's HR@n): test items in the top n / number of test items."""
  hits = np.asarray(hits, dtype=bool)  # [C, w]
  num_test = np.asarray(num_test)  # [C]
  _check_cutoff(hits, num_test, n)
  return hits[:, :n].sum(axis=1) / num_test


def _dcg_and_ideal(hits: np.ndarray, num_test: np.ndarray, n: int,
                   ideal_hits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """DCG@n [C] and the DCG of `ideal_hits` (default min(n, num_test)) hits at the top [C]."""
  hits = np.asarray(hits, dtype=bool)  # [C, w]
  num_test = np.asarray(num_test)  # [C]
  _check_cutoff(hits, num_test, n)
  discounts = 1.0 / np.log2(np.arange(n) + 2.0)  # [n]
  ideal_hits = np.minimum(num_test if ideal_hits is None else ideal_hits, n)  # [C]
  return hits[:, :n] @ discounts, np.concatenate([[0.0], np.cumsum(discounts)])[ideal_hits]


def ndcg_at(hits: np.ndarray, num_test: np.ndarray, n: int) -> np.ndarray:
  """Per-user NDCG@n with binary relevance; the ideal ranking has min(n, num_test) hits."""
  dcg, idcg = _dcg_and_ideal(hits, num_test, n)
  return dcg / idcg


def retrieved_ndcg_at(hits: np.ndarray, num_test: np.ndarray, n: int) -> np.ndarray:
  """The authors' NDCG@n: the ideal DCG has min(n, hits in the whole retrieved list) hits."""
  dcg, idcg = _dcg_and_ideal(hits, num_test, n, np.asarray(hits, dtype=bool).sum(axis=1))
  # A user with no retrieved hit has DCG 0; report 0 rather than 0/0.
  return np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 0.0)


def ranking_metrics(
  hits: np.ndarray, num_test: np.ndarray, cutoffs: Sequence[int] = (50, 100), *,
  protocol: str = "standard",
) -> dict[str, np.ndarray]:
  """Per-user "hr@n" and "ndcg@n" arrays for every cutoff n, NDCG as the protocol defines it."""
  if protocol not in ("standard", "paper"):
    raise ValueError(f"Unknown protocol {protocol!r}; expected 'standard' or 'paper'.")
  ndcg = ndcg_at if protocol == "standard" else retrieved_ndcg_at
  metrics = {f"hr@{n}": recall_at(hits, num_test, n) for n in cutoffs}
  metrics.update({f"ndcg@{n}": ndcg(hits, num_test, n) for n in cutoffs})
  return metrics


def summarize(per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Mean of each per-user metric, as plain floats."""
  return {name: float(np.mean(values)) for name, values in per_user.items()}
