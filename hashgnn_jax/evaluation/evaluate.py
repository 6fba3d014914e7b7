"""Evaluation: encode everyone, retrieve per user chunk, score HR@n / NDCG@n against a split.

Protocol ("standard"): users with at least one held-out item are evaluated; their training items
are excluded from the ranking unless `eval.exclude_train` is off; the whole catalogue is ranked;
ties break by a seeded item order (`retrieval.codes.tie_break_order`).

With several processes (`hashgnn_jax.distributed`), each scores every P-th user chunk on its own
devices and the hit lists are gathered in chunk order, so the metrics equal one process's.

At Alibaba scale (600k users × 4.2M items) `eval.max_users` evaluates a seeded sample of those
users, the same one for every mode, protocol and evaluation of a run; the record says how many
users were evaluated out of how many and whether they were a sample.
"""

import time

from absl import logging
import jax
import numpy as np

from hashgnn_jax import distributed
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.evaluation import metrics as metrics_lib
from hashgnn_jax.evaluation import popularity as popularity_lib
from hashgnn_jax.retrieval import index as retrieval

# Seconds between progress lines; an evaluation shorter than this logs none.
PROGRESS_SECONDS = 30.0


def _user_chunks(users: np.ndarray, chunk: int):
  """Fixed-size chunks of `users`, the last padded by repetition so one shape compiles once."""
  for start in range(0, len(users), chunk):
    block = users[start:start + chunk]
    real = len(block)
    if real < chunk:
      block = np.concatenate([block, np.full(chunk - real, block[0], block.dtype)])
    yield block, real


class _Progress:
  """Logs chunks done, elapsed time and an ETA at most every PROGRESS_SECONDS."""

  def __init__(self, num_chunks: int, num_users: int):
    self._num_chunks, self._num_users = num_chunks, num_users
    self._start = self._last = time.perf_counter()

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if now - self._last < PROGRESS_SECONDS or done == self._num_chunks:
      return
    self._last = now
    elapsed = now - self._start
    logging.info("Evaluation: %d/%d user chunks (%d users) in %.0f s, about %.0f s left.",
                 done, self._num_chunks, self._num_users, elapsed,
                 elapsed / done * (self._num_chunks - done))


def sample_users(split_users: np.ndarray, max_users: int, seed: int) -> np.ndarray:
  """Sorted distinct users of a split, or a seeded sample of `max_users` of them (<= 0: all)."""
  users = np.unique(split_users)
  if 0 < max_users < len(users):
    users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
  return users


def evaluate_codes(codes: np.ndarray, graph: graph_lib.BipartiteGraph, split_users: np.ndarray,
                   split_items: np.ndarray, eval_config, *,
                   known: graph_lib.BipartiteGraph | None = None) -> dict:
  """Metrics and wall seconds per protocol and retrieval mode (plus popularity) for codes [N, K].

  codes holds users first, then items, as `encode.encode_nodes` returns them. `graph` (training
  edges) gives popularity; `known` (default: `graph`) lists the items excluded from each user's
  ranking under the standard protocol, e.g. training plus validation items when testing.
  Protocols (`eval.protocols`): "standard" (exclusion per `eval.exclude_train`, M =
  `eval.num_candidates`, standard NDCG) and "paper" (no exclusion, M = `eval.paper_candidates`,
  the authors' NDCG).

  Returns {"by_protocol": {protocol: {mode: metrics}}, "seconds": {protocol: {mode: s}},
  "num_eval_users", "num_split_users", "user_sample"}.
  """
  num_users, num_items = graph.num_users, graph.num_items
  cutoffs = tuple(eval_config.cutoffs)
  num_results = max(cutoffs)
  if num_results > num_items:
    raise ValueError(f"config.eval.cutoffs={cutoffs} exceed the catalogue of {num_items} items.")
  candidates = {"standard": eval_config.num_candidates, "paper": eval_config.paper_candidates}
  for protocol in eval_config.protocols:
    if "hierarchical" in eval_config.modes and candidates[protocol] > num_items:
      key = "paper_candidates" if protocol == "paper" else "num_candidates"
      raise ValueError(f"config.eval.{key}={candidates[protocol]} exceeds the catalogue of "
                       f"{num_items} items.")
  split_user_ids = np.unique(split_users)
  if len(split_user_ids) == 0:
    raise ValueError("The evaluation split has no users with held-out items.")
  eval_users = sample_users(split_user_ids, eval_config.max_users, eval_config.sample_seed)
  num_held_out = np.bincount(split_users, minlength=num_users)[eval_users]
  # Held-out pairs grouped by user, so each chunk scores hits against its own users' pairs only.
  by_user = np.argsort(split_users, kind="stable")
  split_users, split_items = split_users[by_user], split_items[by_user]
  user_codes, item_codes = codes[:num_users], codes[num_users:]
  known = graph if known is None else known
  excluding = {p: p == "standard" and eval_config.exclude_train for p in eval_config.protocols}

  index = retrieval.ItemIndex(item_codes, tie_seed=eval_config.tie_seed)
  popularity = popularity_lib.ScoreRanking(graph.item_degrees(), tie_order=index.tie_order)
  # More hierarchical depths, each a mode of its own ("hierarchical@100"), for both protocols.
  # M candidates rank M items, so such a mode reports the cutoffs up to M only.
  extra = {f"hierarchical@{m}": int(m) for m in eval_config.get("extra_candidates", ())}
  for m in extra.values():
    if m > num_items:
      raise ValueError(f"config.eval.extra_candidates holds {m}, more than the catalogue's "
                       f"{num_items} items.")
  modes = tuple(eval_config.modes) + tuple(extra) + ("popularity",)
  hits = {(p, m): [] for p in eval_config.protocols for m in modes}
  seconds = dict.fromkeys(hits, 0.0)
  rank, num_parts = jax.process_index(), jax.process_count()
  num_chunks = -(-len(eval_users) // eval_config.user_chunk)
  progress = _Progress(len(range(rank, num_chunks, num_parts)), len(eval_users))
  done = 0
  for chunk_index, (chunk_users, real) in enumerate(
      _user_chunks(eval_users, eval_config.user_chunk)):
    if chunk_index % num_parts != rank:
      continue
    done += 1
    # One exclusion list per chunk, shared by every mode.
    known_items = known.padded_user_items(chunk_users) if any(excluding.values()) else None
    pairs = slice(*np.searchsorted(split_users, [chunk_users[0], chunk_users[real - 1] + 1]))
    for protocol in eval_config.protocols:
      exclude = known_items if excluding[protocol] else None
      for mode in modes:
        start = time.perf_counter()
        if mode == "popularity":
          ranked = popularity.top(num_results=num_results, exclude=exclude,
                                  num_users=None if exclude is not None else len(chunk_users))
        else:
          search_mode = "hierarchical" if mode in extra else mode
          ranked, _ = index.search(user_codes[chunk_users], mode=search_mode,
                                   num_results=min(num_results, extra.get(mode, num_results)),
                                   num_candidates=extra.get(mode, candidates[protocol]),
                                   exclude=exclude)
        seconds[protocol, mode] += time.perf_counter() - start
        hits[protocol, mode].append(metrics_lib.hit_matrix(
            ranked[:real], chunk_users[:real], split_users[pairs], split_items[pairs], num_items))
    progress.update(done)
  hits = {key: np.concatenate(parts) if parts else None for key, parts in hits.items()}
  if num_parts > 1:
    hits = _gather_chunks(hits, len(eval_users), eval_config.user_chunk)
  by_protocol = {
      p: {m: metrics_lib.summarize(metrics_lib.ranking_metrics(
          hits[p, m], num_held_out,
          tuple(n for n in cutoffs if n <= extra.get(m, n)), protocol=p)) for m in modes}
      for p in eval_config.protocols}
  return {
      "by_protocol": by_protocol,
      "seconds": {p: {m: seconds[p, m] for m in modes} for p in eval_config.protocols},
      "num_eval_users": len(eval_users),
      "num_split_users": len(split_user_ids),
      "user_sample": len(eval_users) < len(split_user_ids),
  }


def _gather_chunks(hits: dict, num_users: int, chunk: int) -> dict:
  """Every process's hit rows {key: bool [n_p, w_key]} (chunks p, p + P, ... of `chunk` users)
  as every user's, in user order: {key: bool [num_users, w_key]}. One exchange for all keys."""
  keys = list(hits)
  widths = [hits[key].shape[1] if hits[key] is not None else 0 for key in keys]
  # A process with no chunk learns the widths from the others' (all equal where rows exist).
  widths = [int(w) for w in np.max(np.stack(distributed.gather_rows(np.asarray([widths]))), 0)[0]]
  first = next((h for h in hits.values() if h is not None), None)
  rows = 0 if first is None else len(first)  # This process's users: the same for every key.
  packed = np.zeros((rows, sum(widths)), bool)
  for key, start, width in zip(keys, np.cumsum([0] + widths[:-1]), widths):
    if hits[key] is not None:
      packed[:, start:start + width] = hits[key]
  parts = distributed.gather_rows(packed)
  offsets = [0] * len(parts)
  ordered = []
  num_parts = len(parts)
  for chunk_index, start in enumerate(range(0, num_users, chunk)):
    real, part = min(chunk, num_users - start), chunk_index % num_parts
    ordered.append(parts[part][offsets[part]:offsets[part] + real])
    offsets[part] += real
  packed = np.concatenate(ordered)
  return {key: packed[:, start:start + width]
          for key, start, width in zip(keys, np.cumsum([0] + widths[:-1]), widths)}


def evaluate(encode_all, graph: graph_lib.BipartiteGraph, split_users: np.ndarray,
             split_items: np.ndarray, eval_config, *, step: int, split: str,
             known: graph_lib.BipartiteGraph | None = None) -> dict:
  """Encodes all nodes with `encode_all()` (-> z [N, K], users first) and returns the
  evaluation record of one split.

  "metrics" holds the first of `eval.protocols`; "by_protocol" holds every one of them.
  "num_eval_users" users were evaluated out of "num_split_users" with held-out items
  ("user_sample": whether `eval.max_users` drew a sample).
  """
  start = time.perf_counter()
  codes = encode_all()
  seconds = {"encode": time.perf_counter() - start}
  result = evaluate_codes(codes, graph, split_users, split_items, eval_config, known=known)
  first = eval_config.protocols[0]
  for protocol, protocol_seconds in result["seconds"].items():
    prefix = "" if protocol == first else f"{protocol}/"
    seconds.update({prefix + mode: t for mode, t in protocol_seconds.items()})
  return {
      "step": int(step),
      "split": split,
      "protocol": first,
      "metrics": result["by_protocol"][first],
      "by_protocol": result["by_protocol"],
      "seconds": seconds,
      "num_users": graph.num_users,
      "num_items": graph.num_items,
      "num_eval_users": result["num_eval_users"],
      "num_split_users": result["num_split_users"],
      "user_sample": result["user_sample"],
      "bits": int(codes.shape[1]),
  }
