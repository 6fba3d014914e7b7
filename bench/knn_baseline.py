"""A non-neural reference on the same split and protocols: item-based kNN (cosine).

  python bench/knn_baseline.py --config=configs/gowalla.py --config.data.path=DATA_DIR \
      [--config.data.cache_dir=DIR] [--neighbours=200] [--split=test] [--out=knn.json]

It answers one question about a reproduction: what does a simple, well-known recommender reach on
exactly the data, split, exclusions and metrics our model is scored with? The data come from the
config as in `hashgnn_jax.main` (same cache, seed and split); the scoring is `hashgnn_jax.metrics`
under both protocols, with the same users, known items and tie order (`eval.tie_seed`). The paper
protocol ranks the whole catalogue without exclusion (there are no codes to re-rank).

Item kNN: s(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|) over training users, each item keeping its
`--neighbours` most similar items (0: all); a user's score for j is the sum of s(i, j) over the
items i the user trained on. scipy (a dependency of jax) provides the sparse products.
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from scipy import sparse

from hashgnn_jax.data import loader
from hashgnn_jax.evaluation import evaluate as evaluate_lib
from hashgnn_jax.evaluation import metrics as metrics_lib
from hashgnn_jax.retrieval import codes as codes_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration (its data and eval parts).")
flags.DEFINE_integer("neighbours", 200, "Most similar items kept per item; 0 keeps all.")
flags.DEFINE_enum("split", "test", ["valid", "test"], "Which held-out split to score.")
flags.DEFINE_integer("user_chunk", 1024, "Users scored at once ([chunk, items] float32 scores).")
flags.DEFINE_string("out", "", "Write the JSON record here too.")
flags.mark_flags_as_required(["config"])


def item_similarity(train: sparse.csr_matrix, neighbours: int) -> sparse.csr_matrix:
  """Cosine similarity [I, I] of the items' user sets, top `neighbours` per row, no diagonal."""
  norms = np.sqrt(np.asarray(train.sum(axis=0), np.float64).ravel())  # [I]
  scaled = train @ sparse.diags(1.0 / np.maximum(norms, 1.0))  # [U, I]
  sim = (scaled.T @ scaled).tocsr().astype(np.float32)  # [I, I]
  sim.setdiag(0.0)
  sim.eliminate_zeros()
  if neighbours <= 0:
    return sim
  rows, cols, vals = [], [], []
  for item in range(sim.shape[0]):
    lo, hi = sim.indptr[item], sim.indptr[item + 1]
    keep = np.argsort(-sim.data[lo:hi], kind="stable")[:neighbours] + lo
    rows.append(np.full(keep.size, item))
    cols.append(sim.indices[keep])
    vals.append(sim.data[keep])
  return sparse.csr_matrix(
      (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=sim.shape)


@functools.partial(jax.jit, static_argnames="num_results")
def _top(scores, tie_order, excluded, *, num_results):
  """Best item ids [C, n] per row; columns go in tie order, so top_k's lower-index rule is ours."""
  scores = jnp.where(excluded, -jnp.inf, scores)[:, tie_order]  # [C, I]
  _, slots = jax.lax.top_k(scores, num_results)  # [C, n]
  return tie_order[slots]


def main(argv):
  del argv
  config = FLAGS.config
  start = time.perf_counter()
  dataset = loader.load_dataset(config.data)
  num_users, num_items = dataset.num_users, dataset.num_items
  train = sparse.csr_matrix(
      (np.ones(dataset.num_train, np.float32), (dataset.train_users, dataset.train_items)),
      shape=(num_users, num_items))
  sim = item_similarity(train, FLAGS.neighbours)
  build_seconds = time.perf_counter() - start

  if FLAGS.split == "valid":
    split_users, split_items = dataset.valid_users, dataset.valid_items
    known_users, known_items = dataset.train_users, dataset.train_items
  else:
    split_users, split_items = dataset.test_users, dataset.test_items
    known_users = np.concatenate([dataset.train_users, dataset.valid_users])
    known_items = np.concatenate([dataset.train_items, dataset.valid_items])
  if split_users.size == 0:
    raise ValueError(f"The {FLAGS.split} split is empty; set config.data.valid_fraction.")
  known = sparse.csr_matrix(
      (np.ones(known_users.size, bool), (known_users, known_items)), shape=(num_users, num_items))
  users = evaluate_lib.sample_users(split_users, config.eval.max_users, config.eval.sample_seed)
  num_held_out = np.bincount(split_users, minlength=num_users)[users]
  tie_order = jnp.asarray(codes_lib.tie_break_order(num_items, config.eval.tie_seed))
  no_exclusion = jnp.zeros((1, num_items), bool)

  cutoffs = tuple(config.eval.cutoffs)
  start = time.perf_counter()
  hits = {"standard": [], "paper": []}
  for lo in range(0, users.size, FLAGS.user_chunk):
    chunk = users[lo:lo + FLAGS.user_chunk]
    # Dataset pairs are sorted by user: the chunk's own held-out pairs, not the whole split,
    # go to hit_matrix, which sorts what it is given.
    pairs = slice(*np.searchsorted(split_users, [chunk[0], chunk[-1] + 1]))
    scores = jnp.asarray((train[chunk] @ sim).toarray())  # [C, I]
    for protocol, excluded in (("standard", jnp.asarray(known[chunk].toarray())),
                               ("paper", no_exclusion)):
      ranked = np.asarray(_top(scores, tie_order, excluded, num_results=max(cutoffs)))
      hits[protocol].append(metrics_lib.hit_matrix(
          ranked, chunk, split_users[pairs], split_items[pairs], num_items))
  score_seconds = time.perf_counter() - start

  record = {
      "dataset": dataset.name, "split": FLAGS.split, "neighbours": FLAGS.neighbours,
      "num_eval_users": int(users.size), "similarity_nnz": int(sim.nnz),
      "seconds": {"build": build_seconds, "score": score_seconds},
      "by_protocol": {p: metrics_lib.summarize(metrics_lib.ranking_metrics(
          np.concatenate(h), num_held_out, cutoffs, protocol=p)) for p, h in hits.items()},
  }
  print(json.dumps(record, indent=1))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=1)
  names = [f"{m}@{n}" for m in ("hr", "ndcg") for n in cutoffs]
  print(f"\nitem kNN ({FLAGS.neighbours or 'all'} neighbours), {dataset.name} {FLAGS.split}, "
        f"{users.size} users")
  print(f"{'protocol':<10}" + "".join(f"{n:>10}" for n in names))
  for protocol, values in record["by_protocol"].items():
    print(f"{protocol:<10}" + "".join(f"{values[n]:>10.4f}" for n in names))


if __name__ == "__main__":
  app.run(main)
