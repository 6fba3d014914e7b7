"""Evaluation: encode everyone, retrieve per user chunk, score HR@n / NDCG@n against a split.

Protocol ("standard"): users with at least one held-out item are evaluated; their training items
are excluded from the ranking unless `eval.exclude_train` is off; the whole catalogue is ranked;
ties break by a seeded item order (`retrieval.tie_break_order`).
"""

import time

import numpy as np

from hashgnn_jax import encode
from hashgnn_jax import graph as graph_lib
from hashgnn_jax import metrics as metrics_lib
from hashgnn_jax import retrieval


def _user_chunks(users: np.ndarray, chunk: int):
  """Fixed-size chunks of `users`, the last padded by repetition so one shape compiles once."""
  for start in range(0, len(users), chunk):
    block = users[start:start + chunk]
    real = len(block)
    if real < chunk:
      block = np.concatenate([block, np.full(chunk - real, block[0], block.dtype)])
    yield block, real


def evaluate_codes(codes: np.ndarray, graph: graph_lib.BipartiteGraph, test_users: np.ndarray,
                   test_items: np.ndarray, eval_config) -> tuple[dict, dict]:
  """Metrics and wall seconds per retrieval mode (and the popularity baseline) for codes [N, K].

  codes holds users first, then items, as `encode.encode_nodes` returns them.
  """
  num_users, num_items = graph.num_users, graph.num_items
  cutoffs = tuple(eval_config.cutoffs)
  num_results = max(cutoffs)
  if num_results > num_items:
    raise ValueError(f"config.eval.cutoffs={cutoffs} exceed the catalogue of {num_items} items.")
  if "hierarchical" in eval_config.modes and eval_config.num_candidates > num_items:
    raise ValueError(f"config.eval.num_candidates={eval_config.num_candidates} exceeds the "
                     f"catalogue of {num_items} items.")
  eval_users = np.unique(test_users)
  if len(eval_users) == 0:
    raise ValueError("The evaluation split has no users with held-out items.")
  num_test = np.bincount(test_users, minlength=num_users)[eval_users]
  user_codes, item_codes = codes[:num_users], codes[num_users:]

  index = retrieval.ItemIndex(item_codes, tie_seed=eval_config.tie_seed)
  popularity = graph.item_degrees().astype(np.float32)
  tie_order = retrieval.tie_break_order(num_items, eval_config.tie_seed)

  def rank(mode, chunk_users, exclude):
    if mode == "popularity":
      return retrieval.rank_by_item_score(
          popularity, num_results=num_results, tie_order=tie_order, exclude=exclude,
          num_users=None if exclude is not None else len(chunk_users))
    ids, _ = index.search(user_codes[chunk_users], mode=mode, num_results=num_results,
                          num_candidates=eval_config.num_candidates, exclude=exclude)
    return ids

  results, seconds = {}, {}
  for mode in tuple(eval_config.modes) + ("popularity",):
    start = time.perf_counter()
    ranked = []
    for chunk_users, real in _user_chunks(eval_users, eval_config.user_chunk):
      exclude = graph.padded_user_items(chunk_users) if eval_config.exclude_train else None
      ranked.append(rank(mode, chunk_users, exclude)[:real])
    seconds[mode] = time.perf_counter() - start
    hits = metrics_lib.hit_matrix(np.concatenate(ranked), eval_users, test_users, test_items,
                                  num_items)
    results[mode] = metrics_lib.summarize(metrics_lib.ranking_metrics(hits, num_test, cutoffs))
  return results, seconds


def evaluate(model, params, graph: graph_lib.BipartiteGraph, test_users: np.ndarray,
             test_items: np.ndarray, eval_config, *, step: int, split: str) -> dict:
  """Encodes all nodes with `params` and returns the evaluation record of one split."""
  start = time.perf_counter()
  codes = encode.encode_nodes(model, params, graph, edge_chunk=eval_config.edge_chunk)
  encode_seconds = time.perf_counter() - start
  results, seconds = evaluate_codes(codes, graph, test_users, test_items, eval_config)
  seconds["encode"] = encode_seconds
  return {
      "step": int(step),
      "split": split,
      "protocol": "standard",
      "metrics": results,
      "seconds": seconds,
      "num_users": graph.num_users,
      "num_items": graph.num_items,
      "num_eval_users": int(len(np.unique(test_users))),
      "bits": int(codes.shape[1]),
  }
