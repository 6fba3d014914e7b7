"""Evaluation of the sharded layout at catalogue sizes no device holds whole (issue 21).

  python bench/sharded_eval.py [--shape=10m] [--devices=8] [--modes=sharded,whole]
      [--users=2000] [--edge_chunk=65536] [--cache=/tmp/hashgnn_bench] [--out=FILE] [--quick]

Each mode runs in its own process on --devices host CPU devices (XLA_FLAGS), so each reports
its own peak RSS: "sharded" creates the row-sharded state as training does
(`tables.RowSharding`, blocks on their owners) and encodes every node shard by shard
(`encode.encode_nodes_sharded`); "whole" gathers the table onto the host and encodes it on one
device (`encode.encode_nodes`), what evaluation did before. Both then score --users sampled
users, each with one of its pairs held out of the graph, against every item (Hamming,
hierarchical and continuous, standard protocol; `evaluate.evaluate_codes`). The model is the
default variant's (sage layers 128, 68; K = 32) on 64-d embeddings, untrained: encoding and
scoring cost the same whatever the weights. Graphs are `bench/train_step.py`'s (same cache).
"""

import argparse
import json
import resource
import sys
import time

from train_step import QUICK_SCALE, load_pairs, run_case  # pylint: disable=g-bad-import-order


def worker(args) -> dict:
  """One mode's encoding and scoring in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hashgnn_jax import config_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.data import graph as graph_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.model import encode  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.model import network as model_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import optim  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import tables  # pylint: disable=g-import-not-at-top

  users, items, num_users, num_items = load_pairs(args.shape, args.scale, args.cache)
  # One held-out pair for each of --users users drawn from those with two or more pairs.
  rng = np.random.default_rng(0)
  counts = np.bincount(users, minlength=num_users)
  chosen = rng.choice(np.flatnonzero(counts >= 2), size=args.users, replace=False)
  order = np.argsort(users, kind="stable")
  users, items = users[order], items[order]
  held = np.zeros(len(users), bool)
  held[np.searchsorted(users, chosen)] = True  # Each chosen user's first pair.
  graph = graph_lib.build_graph(users[~held], items[~held], num_users, num_items)
  split_users, split_items = users[held], items[held]
  del users, items

  config = config_lib.apply_variant(config_lib.default_config(), config_lib.DEFAULT_VARIANT)
  config.model.embed_dim = 64
  config.eval.edge_chunk = args.edge_chunk
  config.eval.max_users = args.users
  config.eval.protocols = ("standard",)
  model = model_lib.create_model(config.model, num_users, num_items, config.hash, config.loss)
  tx = optim.create_optimizer(config.train, 1)
  devices = tuple(jax.local_devices())
  rows = tables.RowSharding(devices, graph.num_nodes)
  state = state_lib.create_train_state(model, tx, jax.random.PRNGKey(0), "rowwise", rows)
  params = state.params
  del state  # The moments: evaluation reads none of them.
  per_device = None
  if args.mode == "sharded":
    # XLA's own account of one device's buffers (arguments, output, temporaries), untimed.
    encoder, graph_inputs = encode.sharded_encoder(model, graph, rows,
                                                   edge_chunk=args.edge_chunk)
    table, dense = state_lib.split_embedding(params)
    memory = encoder.lower(dense, table, *graph_inputs).compile().memory_analysis()
    per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                  + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    del encoder, graph_inputs, table, dense
  start = time.perf_counter()
  if args.mode == "sharded":
    codes = encode.encode_nodes_sharded(model, params, graph, rows, edge_chunk=args.edge_chunk)
  else:
    table, dense = state_lib.split_embedding(params)
    whole = state_lib.join_embedding(rows.gather(table), jax.device_get(dense))
    del params, table
    codes = encode.encode_nodes(model, whole, graph, edge_chunk=args.edge_chunk)
  encode_seconds = time.perf_counter() - start
  start = time.perf_counter()
  result = evaluate.evaluate_codes(codes, graph, split_users, split_items, config.eval)
  score_seconds = time.perf_counter() - start
  metrics = result["by_protocol"]["standard"]
  return {
      "shape": args.shape, "mode": args.mode, "devices": len(devices),
      "num_users": num_users, "num_items": num_items, "num_edges": int(graph.num_edges),
      "edge_chunk": args.edge_chunk, "users_scored": int(result["num_eval_users"]),
      "encode_seconds": round(encode_seconds, 2), "score_seconds": round(score_seconds, 2),
      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
      # One device's encoder buffers (sharded), by XLA's compiled memory analysis.
      "encoder_gib_per_device": None if per_device is None else round(per_device / 2**30, 3),
      "table_gib_per_device": round(rows.rows_per_device * 64 * 4 / 2**30, 3),
      "table_gib_whole": round(graph.num_nodes * 64 * 4 / 2**30, 3),
      "hamming_hr@50": metrics["hamming"]["hr@50"],
      "continuous_hr@50": metrics["continuous"]["hr@50"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="10m")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--modes", default="sharded,whole")
  parser.add_argument("--users", type=int, default=2_000)
  parser.add_argument("--edge_chunk", type=int, default=65_536)
  parser.add_argument("--cache", default="/tmp/hashgnn_bench")
  parser.add_argument("--out", default="")
  parser.add_argument("--quick", action="store_true", help="A graph at 5%% of full size.")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mode", help=argparse.SUPPRESS)
  parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return
  results = []
  for mode in args.modes.split(","):
    if mode not in ("sharded", "whole"):
      parser.error(f"--modes: expected sharded and/or whole, got {mode!r}")
    cmd = [sys.executable, __file__, "--worker", f"--mode={mode}", f"--shape={args.shape}",
           f"--users={args.users}", f"--edge_chunk={args.edge_chunk}", f"--cache={args.cache}",
           f"--scale={QUICK_SCALE if args.quick else 1.0}"]
    result = run_case(cmd, args.devices, 1)
    results.append({"mode": mode, **result})
    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
  text = json.dumps({"quick": args.quick, "results": results}, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(f"\n{'mode':<9}{'dev':>4}{'nodes':>11}{'encode s':>10}{'score s':>9}{'RSS GiB':>9}"
        f"{'GiB/device':>11}")
  for r in results:
    if "error" in r:
      print(f"{r['mode']:<9} failed: {r['error']}")
      continue
    print(f"{r['mode']:<9}{r['devices']:>4}{r['num_users'] + r['num_items']:>11}"
          f"{r['encode_seconds']:>10.1f}{r['score_seconds']:>9.1f}{r['peak_rss_gib']:>9.2f}"
          f"{r['encoder_gib_per_device'] or float('nan'):>11.3f}")


if __name__ == "__main__":
  main()
