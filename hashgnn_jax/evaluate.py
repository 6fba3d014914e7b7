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


def evaluate_codes(codes: np.ndarray, graph: graph_lib.BipartiteGraph, split_users: np.ndarray,
                   split_items: np.ndarray, eval_config, *, protocol: str = "standard",
                   known: graph_lib.BipartiteGraph | None = None) -> tuple[dict, dict]:
  """Metrics and wall seconds per retrieval mode (and the popularity baseline) for codes [N, K].

  codes holds users first, then items, as `encode.encode_nodes` returns them. `graph` (training
  edges) gives popularity; `known` (default: `graph`) lists the items excluded from each user's
  ranking under the standard protocol, e.g. training plus validation items when testing.
  Protocols: "standard" (exclusion per `eval.exclude_train`, M = `eval.num_candidates`, standard
  NDCG) and "paper" (no exclusion, M = `eval.paper_candidates`, the authors' NDCG).
  """
  num_users, num_items = graph.num_users, graph.num_items
  cutoffs = tuple(eval_config.cutoffs)
  num_results = max(cutoffs)
  paper = protocol == "paper"
  num_candidates = eval_config.paper_candidates if paper else eval_config.num_candidates
  if num_results > num_items:
    raise ValueError(f"config.eval.cutoffs={cutoffs} exceed the catalogue of {num_items} items.")
  if "hierarchical" in eval_config.modes and num_candidates > num_items:
    key = "paper_candidates" if paper else "num_candidates"
    raise ValueError(f"config.eval.{key}={num_candidates} exceeds the catalogue of {num_items} "
                     "items.")
  eval_users = np.unique(split_users)
  if len(eval_users) == 0:
    raise ValueError("The evaluation split has no users with held-out items.")
  num_held_out = np.bincount(split_users, minlength=num_users)[eval_users]
  user_codes, item_codes = codes[:num_users], codes[num_users:]
  known = graph if known is None else known
  exclude_known = eval_config.exclude_train and not paper

  index = retrieval.ItemIndex(item_codes, tie_seed=eval_config.tie_seed)
  popularity = graph.item_degrees().astype(np.float32)

  def rank(mode, chunk_users, exclude):
    if mode == "popularity":
      return retrieval.rank_by_item_score(
          popularity, num_results=num_results, tie_order=index.tie_order, exclude=exclude,
          num_users=None if exclude is not None else len(chunk_users))
    ids, _ = index.search(user_codes[chunk_users], mode=mode, num_results=num_results,
                          num_candidates=num_candidates, exclude=exclude)
    return ids

  results, seconds = {}, {}
  for mode in tuple(eval_config.modes) + ("popularity",):
    start = time.perf_counter()
    ranked = []
    for chunk_users, real in _user_chunks(eval_users, eval_config.user_chunk):
      exclude = known.padded_user_items(chunk_users) if exclude_known else None
      ranked.append(rank(mode, chunk_users, exclude)[:real])
    seconds[mode] = time.perf_counter() - start
    hits = metrics_lib.hit_matrix(np.concatenate(ranked), eval_users, split_users, split_items,
                                  num_items)
    results[mode] = metrics_lib.summarize(
        metrics_lib.ranking_metrics(hits, num_held_out, cutoffs, protocol=protocol))
  return results, seconds


def evaluate(model, params, graph: graph_lib.BipartiteGraph, split_users: np.ndarray,
             split_items: np.ndarray, eval_config, *, step: int, split: str,
             known: graph_lib.BipartiteGraph | None = None) -> dict:
  """Encodes all nodes with `params` and returns the evaluation record of one split.

  "metrics" holds the first of `eval.protocols`; "by_protocol" holds every one of them.
  """
  start = time.perf_counter()
  codes = encode.encode_nodes(model, params, graph, edge_chunk=eval_config.edge_chunk)
  seconds = {"encode": time.perf_counter() - start}
  first = eval_config.protocols[0]
  by_protocol = {}
  for protocol in eval_config.protocols:
    results, protocol_seconds = evaluate_codes(codes, graph, split_users, split_items,
                                               eval_config, protocol=protocol, known=known)
    by_protocol[protocol] = results
    prefix = "" if protocol == first else f"{protocol}/"
    seconds.update({prefix + mode: t for mode, t in protocol_seconds.items()})
  return {
      "step": int(step),
      "split": split,
      "protocol": first,
      "metrics": by_protocol[first],
      "by_protocol": by_protocol,
      "seconds": seconds,
      "num_users": graph.num_users,
      "num_items": graph.num_items,
      "num_eval_users": int(len(np.unique(split_users))),
      "bits": int(codes.shape[1]),
  }
