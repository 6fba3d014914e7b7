"""Train-step throughput on graphs of MovieLens, Gowalla and Alibaba size (issue 4's benchmark).

  python bench/train_step.py [--shapes=movielens,gowalla,alibaba] [--batches=256,4096]
      [--variants=node/rowwise,node/dense,tree/rowwise,node/rowwise/ib,node/rowwise/ib/lightgcn,
                  full/dense/ib/lightgcn]
      [--devices=1] [--steps=10]
      [--processes=1,2] [--host-memory=reuse,default] [--out=bench_train.json]
      [--cache=/tmp/hashgnn_bench] [--scale=1.0] [--quick] [--prepare-only]

Every (shape, batch, variant) runs in its own subprocess, so each reports its own peak RSS
(embeddings + optimizer state + graph + the step's buffers). A variant is sampler.mode /
train.embedding_update (mode full, whole-graph layers with no sampling, needs dense), then
optionally / ib for the default variant's in-batch softmax and / lightgcn for LightGCN's layers
instead of gcn ones; the first listed is the baseline the others are compared with in the same run.
`--devices=1,2` also runs each on that many devices (host CPU devices split with XLA_FLAGS on a CPU;
the batch is global, split over the devices). `--processes=1,2` also runs each case as that many JAX
processes over 127.0.0.1 (jax.distributed with gloo, host CPU devices), the same devices in all
split among them: against one process of the same devices, the step's extra time is what its
collectives cost across processes, which the run also times alone (`collective_ms`: the step's
all-gather of touched rows and their gradients and its pmean of the dense gradients, at the step's
shapes; for /sharded, its exchange of requests, rows and gradients with the owners).
`--host-memory=reuse,default` also runs each with glibc's malloc left as it is, against
`hostmem.reuse_freed_memory()` (what `main.py` does) as the baseline. Graphs come from the
planted-community generator at each data set's sizes (cached as .npz under --cache, since the
Alibaba one takes a while to generate).

Benchmark configuration (issue 4): ID embeddings of dim 64; two gcn layers
u' = leaky_relu(W·mean(self ∪ sampled neighbours)) of sizes 128 then 68; hash layer 68 -> 32 with
tanh; element-wise guidance with constant p = 0.8; fanouts (10, 5) with replacement; B positive
edges from a per-epoch shuffle + 5 negative items each; BCE on <h_u, h_i>/32 plus 0.5 x the hinge
triplet loss with margin 0.2; Adam 1e-3.

Reported per run: ms per step (median of --steps timed steps after a warm-up step), steps/s,
positive edges/s, the share of step time spent sampling (the sampler jitted alone on the same
batch; one process only), and peak RSS (of process 0). --quick uses reduced sizes (for
bench/gpu.sh's smoke test on a CPU).
"""

import argparse
import functools
import itertools
import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

SHAPES = {
    # users, items, interactions (paper Table 1).
    "movielens": (6_040, 3_706, 1_000_209),
    "gowalla": (29_858, 40_981, 1_027_370),
    "alibaba": (601_946, 4_167_708, 28_489_957),
    # Issue 21's memory check: 10M nodes, whose 64-d table and moments (7.7 GB) no replicated
    # run of 8 CPU devices holds in 24 GB; only variants with /sharded fit.
    "10m": (2_000_000, 8_000_000, 20_000_000),
}
QUICK_SCALE = 0.05


def benchmark_config(batch_size: int, sampler_mode: str, embedding_update: str, *extras: str):
  """Issue 4's benchmark configuration; extra "ib" adds the default variant's in-batch softmax
  (hashgnn_ib: scores · 10 / K, p = 1), "lightgcn" swaps the layers for LightGCN's (weightless,
  64 wide, the layers' mean), "sharded" shards the table and moments by rows (issue 21), and
  "fulllists" keeps its requests to each owner in full lists (train.request_capacity)."""
  from hashgnn_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.default_config()
  config.model.embed_dim = 64
  config.model.aggregator = "gcn"
  config.model.hidden_dims = (128, 68)
  # The layers are leaky_relu(W·mean(...)), without a bias (the hash layer keeps its b).
  config.model.use_bias = False
  config.model.hash_bits = 32
  config.guidance.granularity = "element"
  config.guidance.schedule = "constant"
  config.guidance.init = 0.8
  config.guidance.floor = 0.8
  config.sampler.fanouts = (10, 5)
  config.sampler.num_negatives = 5
  config.sampler.mode = sampler_mode
  config.loss.logit_scale = "inv_bits"
  config.loss.rank = "hinge"
  config.loss.rank_weight = 0.5
  config.loss.margin = 0.2
  config.train.learning_rate = 1e-3
  config.train.batch_size = batch_size
  config.train.embedding_update = embedding_update
  for extra in extras:
    if extra == "ib":
      config.loss.temperature = 10.0
      config.loss.inbatch_weight = 1.0
      config.guidance.init = config.guidance.floor = 1.0
    elif extra == "lightgcn":
      config.model.aggregator = "lightgcn"
      config.model.hidden_dims = (config.model.embed_dim,) * 2
    elif extra == "sharded":
      config.train.embedding_layout = "sharded"
    elif extra == "fulllists":
      config.train.request_capacity = "full"
    else:
      raise ValueError(f"Unknown {extra!r} in a variant; expected 'ib', 'lightgcn', 'sharded' "
                       "or 'fulllists'.")
  config_lib.validate(config)
  return config


def load_pairs(shape: str, scale: float, cache: str):
  """(users, items, num_users, num_items) of a generated graph of `shape`'s size, cached."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  num_users, num_items, num_pairs = SHAPES[shape]
  num_users, num_items = max(int(num_users * scale), 50), max(int(num_items * scale), 50)
  num_pairs = max(int(num_pairs * scale), 1_000)
  path = os.path.join(cache, f"{shape}_{num_users}x{num_items}_{num_pairs}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["users"], f["items"], num_users, num_items
  users, items = synthetic.generate_interactions(
      num_users=num_users, num_items=num_items, num_communities=max(num_items // 5_000, 8),
      # Scaled down, MovieLens's 166 items a user would exceed its 74 items.
      mean_items_per_user=min(num_pairs / num_users, num_items / 4), min_items_per_user=5,
      popularity_exponent=1.0, in_community_prob=0.8, seed=0)
  os.makedirs(cache, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, users=users, items=items)
  os.replace(tmp, path)
  return users, items, num_users, num_items


def step_collectives(dense, shard_inputs, *, rows: int, dim: int):
  """What the rowwise step sends between devices, at its shapes, with nothing else: the
  all-gather of each device's touched row ids [rows] and their gradients [rows, dim]
  (`optim.combine_row_grads`) and the pmean of the dense gradients (a tree like `dense`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  shard = shard_inputs[0]
  ids = jax.lax.all_gather(jnp.arange(rows, dtype=jnp.int32) + shard, step_lib.AXIS)
  grads = jax.lax.all_gather(jnp.full((rows, dim), shard, jnp.float32), step_lib.AXIS)
  dense = jax.lax.pmean(jax.tree.map(lambda x: x + shard, dense), step_lib.AXIS)
  # Reduced to scalars so that the output is small and the collectives cannot be dropped.
  return ids.sum() + grads.sum() + sum(x.sum() for x in jax.tree.leaves(dense))


def sharded_exchange(blocks, shard_inputs, marks, *, rows: int, capacity: int):
  """What the sharded layout's step does instead, through its own functions (`tables.lookup`,
  `tables.owned_gradients` with the step's list capacity): [rows] ids spread over the owners
  asked for, the rows back, and their gradients to the owners, summed there; the dense
  gradients' pmean as in `step_collectives` is left out (the same in both)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import tables  # pylint: disable=g-import-not-at-top
  block = blocks.shape[0]
  # Distinct global ids (97 is prime), a device's share of each owner alike.
  ids = (jnp.arange(rows, dtype=jnp.int32) * 97 + shard_inputs[0]) % (
      jax.lax.axis_size(step_lib.AXIS) * block)
  got, requests, _ = tables.lookup(blocks, ids, jnp.ones(rows, bool), step_lib.AXIS, capacity)
  _, summed, _ = tables.owned_gradients(requests, got, block, marks, step_lib.AXIS)
  return summed.sum()


def worker(args) -> dict:
  """One (shape, batch, variant) measurement in this process."""
  if args.host_memory == "reuse":
    # Before JAX starts its threads: a thread keeps the malloc arena it first used.
    from hashgnn_jax import hostmem  # pylint: disable=g-import-not-at-top
    hostmem.reuse_freed_memory()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hashgnn_jax import distributed  # pylint: disable=g-import-not-at-top
  from hashgnn_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.data import graph as graph_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.model import network as model_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import sampler  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import optim  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import schedules  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from hashgnn_jax.train import tables  # pylint: disable=g-import-not-at-top

  multiprocess = args.num_processes > 1
  if multiprocess:
    distributed.initialize("on", coordinator_address=args.coordinator,
                           num_processes=args.num_processes, process_id=args.process_id,
                           cpu_only=True)
  mode, update, *extras = args.variant.split("/")
  config = benchmark_config(args.batch, mode, update, *extras)
  users, items, num_users, num_items = load_pairs(args.shape, args.scale, args.cache)
  graph = graph_lib.build_graph(users, items, num_users, num_items)
  del users, items
  # Each process's share of the devices, in process order, as a training run takes them.
  config.train.num_devices = args.num_devices // args.num_processes
  devices = experiment_lib.select_devices(config.train)
  local = step_lib.local_batch_size(config, devices)
  model = model_lib.create_model(config.model, num_users, num_items, config.hash, config.loss)
  per_epoch = schedules.steps_per_epoch(graph.num_edges, args.batch)
  tx = optim.create_optimizer(config.train, schedules.total_steps(config.train, per_epoch))
  replicated, shard_inputs = step_lib.device_layout(devices)
  # Through the host, as train.loop does: an array on one device is not placed across processes.
  via_host = jax.device_get if multiprocess else lambda x: x
  layout = config.train.embedding_layout
  rows = tables.RowSharding(tuple(devices), graph.num_nodes) if layout == "sharded" else None
  state = step_lib.place_state(
      state_lib.create_train_state(model, tx, jax.random.PRNGKey(0), update, rows), devices,
      layout)
  device_graph = graph_lib.to_device(graph, replicated)
  order = jax.device_put(via_host(sampler.epoch_order(jax.random.PRNGKey(1), 0, graph.num_edges)),
                         replicated)
  rng = jax.random.PRNGKey(2)
  set_sizes, capacity = step_lib.fit_bounds(config, device_graph, devices)
  step_fn = step_lib.make_stepper(model, tx, config, per_epoch, devices, set_sizes, capacity)

  def sample_only(step, marks):
    # The same draw the first device makes at `step`, jitted alone (devices sample concurrently).
    positions = jnp.arange(local, dtype=jnp.int32)
    edge_ids = order[(step % per_epoch) * args.batch + positions]
    key, _ = jax.random.split(jax.random.fold_in(rng, step))
    keys = sampler.example_keys(key, positions)
    if mode == "node":
      return sampler.sample_blocks(device_graph, edge_ids, keys, key, marks, fanouts=(10, 5),
                                   num_negatives=5, sizes=set_sizes)
    return sampler.sample_batch(device_graph, edge_ids, keys, fanouts=(10, 5), num_negatives=5)

  def timed(fn, n):
    times = []
    for _ in range(n):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
    return float(np.median(times))

  compile_start = time.perf_counter()
  state, metrics = step_fn(state, device_graph, order, rng, shard_inputs)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - compile_start

  def one_step():
    nonlocal state, metrics
    state, metrics = step_fn(state, device_graph, order, rng, shard_inputs)
    return metrics

  step_seconds = timed(one_step, args.steps)
  sample_share = None
  if not multiprocess:  # Sampling is local work: timed once, in the one-process run.
    sample_fn = jax.jit(sample_only)
    marks = graph_lib.empty_marks(graph.num_nodes)
    jax.block_until_ready(sample_fn(jnp.int32(1), marks))
    sample_share = round(timed(lambda: sample_fn(jnp.int32(1), marks), args.steps) / step_seconds,
                         3)
  collective_seconds = None
  if len(devices) > 1 and set_sizes and update == "rowwise":
    if rows is None:
      collectives = jax.pmap(
          functools.partial(step_collectives, rows=set_sizes[-1], dim=config.model.embed_dim),
          axis_name=step_lib.AXIS, in_axes=(None, 0), out_axes=None, devices=devices)
      inputs = (state_lib.split_embedding(state.params)[1], shard_inputs)
    else:
      lists = capacity or min(set_sizes[-1], rows.rows_per_device)
      collectives = jax.pmap(
          functools.partial(sharded_exchange, rows=set_sizes[-1], capacity=lists),
          axis_name=step_lib.AXIS, in_axes=(0, 0, None), out_axes=None, devices=devices)
      inputs = (state_lib.split_embedding(state.params)[0], shard_inputs,
                graph_lib.empty_marks(rows.rows_per_device))
    jax.block_until_ready(collectives(*inputs))
    collective_seconds = timed(lambda: collectives(*inputs), args.steps)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  # The table and both moments as the first device holds them (its block when sharded).
  held = []
  state_lib.map_tables(lambda x: held.append(x.addressable_data(0).nbytes), state)
  return {
      "shape": args.shape, "batch": args.batch, "variant": args.variant,
      "devices": len(devices), "processes": args.num_processes, "host_memory": args.host_memory,
      "num_users": num_users, "num_items": num_items, "num_edges": int(graph.num_edges),
      "ms_per_step": round(step_seconds * 1e3, 2),
      "steps_per_second": round(1.0 / step_seconds, 2),
      "edges_per_second": round(args.batch / step_seconds, 1),
      "sample_share": sample_share,
      "collective_ms": None if collective_seconds is None else round(collective_seconds * 1e3, 2),
      "first_step_seconds": round(compile_seconds, 2),
      "peak_rss_gib": round(peak_rss / 2**30, 3),
      "table_gib_per_device": round(sum(held) / 2**30, 3),
      "loss": float(metrics["loss"]),
      # Per-device set sizes the model ran on when the last step's sample fit them.
      "set_sizes": list(set_sizes) if set_sizes else None,
      # The sharded layout's fitted list of ids asked of each owner (None: full lists).
      "request_capacity": capacity,
      "trimmed": float(metrics.get("trimmed", 0.0)),
      "device": str(devices[0].platform),
  }


def run_case(cmd: list[str], num_devices: int, num_processes: int) -> dict:
  """Runs one worker command as `num_processes` processes of num_devices / num_processes
  devices each; returns process 0's result, or {"error": [...]} with the first failure's last
  line."""
  env = dict(os.environ)
  per_process = num_devices // num_processes
  if num_processes > 1:
    env["JAX_PLATFORMS"] = "cpu"
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    cmd = cmd + [f"--num_processes={num_processes}", f"--coordinator=127.0.0.1:{port}"]
  if per_process > 1:  # On a CPU, split the host into devices; accelerators ignore it.
    flag = f"--xla_force_host_platform_device_count={per_process}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  procs = [subprocess.Popen(cmd + ([f"--process_id={i}"] if num_processes > 1 else []), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  outputs = [proc.communicate() for proc in procs]
  for proc, (_, stderr) in zip(procs, outputs):
    if proc.returncode:
      return {"error": stderr.strip().splitlines()[-1:]}
  return json.loads(outputs[0][0].strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="movielens,gowalla,alibaba")
  parser.add_argument("--batches", default="256,4096")
  parser.add_argument("--variants", default="node/rowwise,node/dense,tree/rowwise")
  parser.add_argument("--devices", default="1", help="Device counts to run each case on.")
  parser.add_argument("--processes", default="1",
                      help="Process counts to run each case as (the devices split among them; "
                      "more than one: host CPU devices over 127.0.0.1).")
  parser.add_argument("--host-memory", default="reuse",
                      help="Comma-separated, of reuse (hostmem.reuse_freed_memory(), as main.py "
                      "does) and default (glibc's malloc as it is); the first is the baseline.")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default="")
  parser.add_argument("--cache", default="/tmp/hashgnn_bench")
  parser.add_argument("--quick", action="store_true", help="Graphs at 5%% of full size.")
  parser.add_argument("--prepare-only", action="store_true",
                      help="Only generate and cache the --shapes' graphs (no JAX), then exit.")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--shape", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--variant", help=argparse.SUPPRESS)
  parser.add_argument("--scale", type=float, default=1.0,
                      help="The graphs' users, items and pairs times this (--quick: 5%%).")
  parser.add_argument("--num_devices", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--num_processes", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    result = worker(args)
    if args.process_id == 0:
      print(json.dumps(result))
    return

  scale = QUICK_SCALE if args.quick else args.scale
  if args.prepare_only:
    for shape in args.shapes.split(","):
      load_pairs(shape, scale, args.cache)
    return
  device_counts = [int(n) for n in args.devices.split(",")]
  process_counts = [int(n) for n in args.processes.split(",")]
  host_memories = args.host_memory.split(",")
  if not set(host_memories) <= {"reuse", "default"}:
    parser.error(f"--host-memory: expected reuse and/or default, got {args.host_memory!r}")
  for num_devices, num_processes in itertools.product(device_counts, process_counts):
    if num_devices % num_processes:
      parser.error(f"--devices={num_devices} cannot be split over --processes={num_processes}.")
  results = []
  for shape in args.shapes.split(","):
    for batch in map(int, args.batches.split(",")):
      for variant in args.variants.split(","):
        for num_devices, num_processes, host_memory in itertools.product(
            device_counts, process_counts, host_memories):
          cmd = [sys.executable, __file__, "--worker", f"--shape={shape}", f"--batch={batch}",
                 f"--variant={variant}", f"--steps={args.steps}", f"--cache={args.cache}",
                 f"--scale={scale}", f"--num_devices={num_devices}",
                 f"--host-memory={host_memory}"]
          result = run_case(cmd, num_devices, num_processes)
          if "error" in result:
            result = {"shape": shape, "batch": batch, "variant": variant,
                      "devices": num_devices, "processes": num_processes,
                      "host_memory": host_memory, "error": result["error"]}
          results.append(result)
          print(json.dumps(result), file=sys.stderr, flush=True)

  baseline = args.variants.split(",")[0]
  first = (device_counts[0], process_counts[0], host_memories[0])
  by_key = {(r["shape"], r["batch"], r["variant"], r["devices"], r["processes"],
             r["host_memory"]): r for r in results}
  for r in results:
    base = by_key.get((r["shape"], r["batch"], baseline, *first))
    if "ms_per_step" in r and base and "ms_per_step" in base:
      r["speed_vs_" + baseline.replace("/", "_")] = round(base["ms_per_step"] / r["ms_per_step"],
                                                          3)
  summary = {"quick": args.quick, "results": results}
  for batch in map(int, args.batches.split(",")):
    small = by_key.get(("movielens", batch, baseline, *first), {})
    large = by_key.get(("alibaba", batch, baseline, *first), {})
    if "ms_per_step" in small and "ms_per_step" in large:
      summary[f"alibaba_over_movielens_step_b{batch}"] = round(
          large["ms_per_step"] / small["ms_per_step"], 2)
  text = json.dumps(summary, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(f"\n{'shape':<10}{'batch':>6} {'variant':<26}{'dev':>4}{'proc':>5} {'memory':<8}"
        f"{'ms/step':>9}{'edges/s':>10}{'sample':>8}{'coll ms':>9}{'RSS GiB':>9}")
  for r in results:
    head = (f"{r['shape']:<10}{r['batch']:>6} {r['variant']:<26}{r['devices']:>4}"
            f"{r['processes']:>5} {r['host_memory']:<8}")
    if "ms_per_step" not in r:
      print(f"{head} failed: {r['error']}")
      continue
    share = "-" if r["sample_share"] is None else f"{r['sample_share']:.0%}"
    collective = "-" if r["collective_ms"] is None else f"{r['collective_ms']:.1f}"
    print(f"{head}{r['ms_per_step']:>9.1f}{r['edges_per_second']:>10.0f}{share:>8}"
          f"{collective:>9}{r['peak_rss_gib']:>9.2f}")


if __name__ == "__main__":
  main()
