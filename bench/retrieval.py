"""Exact top-n retrieval speed at the paper's Table 4 shapes, against faiss and NumPy.

  python bench/retrieval.py [--quick] [--devices=1,2] [--bits=32,64] [--out=retrieval.json]

For each shape (users × items) and code length K, every method ranks all items for each user and
keeps the top `--num-results`:
  ours        `retrieval.ItemIndex` in Hamming, hierarchical (M = 100 and 500) and continuous mode,
              once per device count (a subprocess each, `--xla_force_host_platform_device_count`)
              and per `--selections` entry (rows named METHOD/SELECTION unless it is "auto");
  faiss       IndexBinaryFlat (Hamming) and IndexFlatIP (continuous), omp threads = all cores,
              skipped with a note when faiss is not installed (`pip install -e .[bench]`);
  numpy       brute force per chunk of users, with the index's tie rule (see `_exact_top`).
Codes are random: z ~ U(-1, 1)^K per user and item, binary codes sign(z), and continuous search
(and the hierarchical re-rank) uses the same z, so its dimension is K. Seconds are for all users:
measured over every user where `users_timed` equals the user count, else extrapolated linearly
from the first `users_timed` users (marked "extrapolated"); each is the least of `--repeats`
timings, as other jobs on a shared machine only add time; compilation is excluded (a warm-up
chunk). Checks: every method returns the same top-n score multiset per user (Hamming exactly,
inner products to 1e-5); ours returns the same ids for every device count and selection, and in
Hamming mode the ids of NumPy under the index's tie rule (float modes report the share of
identical rows). The JSON also records the peak RSS of each `ours` process. Ours runs with
`hostmem.reuse_freed_memory()`, as `main.py`'s evaluation does (`--host-memory=default`: glibc's
malloc as it is, which faults every call's buffers in afresh).
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from hashgnn_jax import hostmem
from hashgnn_jax.retrieval import codes as codes_lib
from hashgnn_jax.retrieval import index as retrieval

SHAPES = {  # Paper Table 1: users, items.
    "movielens": (6_040, 3_952),
    "pinterest": (55_187, 9_916),
    "gowalla": (29_858, 40_981),
    "alibaba": (601_946, 4_167_708),
}
OUR_MODES = (("hamming", None), ("hierarchical", 100), ("hierarchical", 500), ("continuous", None))
TIE_SEED = 0
INNER_TOLERANCE = 1e-5


def method_name(mode: str, num_candidates: int | None) -> str:
  return f"{mode}{num_candidates or ''}"


def make_codes(shape: str, bits: int, num_users: int):
  """Seeded z: users [num_users, K] (a prefix of the shape's users), items [I, K], float32."""
  seed = [list(SHAPES).index(shape), bits]
  user_z = np.random.default_rng(seed + [0]).random((num_users, bits), np.float32)
  item_z = np.random.default_rng(seed + [1]).random((SHAPES[shape][1], bits), np.float32)
  return 2 * user_z - 1, 2 * item_z - 1


def users_timed(shape: str, args, baseline: bool) -> int:
  """How many users (a prefix) a method times for `shape`."""
  alibaba = shape == "alibaba"
  caps = [args.alibaba_users if alibaba else args.max_users]
  if baseline:
    caps.append(args.alibaba_baseline_users if alibaba else args.baseline_users)
  return min([SHAPES[shape][0]] + [cap for cap in caps if cap > 0])


def least_time(fn, *args, repeats: int):
  """(Least wall seconds over `repeats` calls, last result): other jobs can only add time."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn(*args)
    best = min(best, time.perf_counter() - start)
  return best, result


def search_chunks(index, chunks, kwargs):
  """ItemIndex.search of every chunk: (ids, scores) [U, n], U = users in all chunks."""
  ids, scores = zip(*(index.search(chunk, **kwargs) for chunk in chunks))
  return np.concatenate(ids), np.concatenate(scores)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB.


def run_ours(args) -> None:
  """Child process: times ItemIndex on the devices set up by the parent; saves top-n scores."""
  # Read when JAX initialises its backends, at the first device query below.
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.child_devices}"
  if args.host_memory == "reuse":
    # Before that query starts JAX's threads: a thread keeps the malloc arena it first used.
    hostmem.reuse_freed_memory()
  report = {"devices": len(jax.local_devices()), "device_kind": jax.local_devices()[0].device_kind,
            "runs": []}
  for shape in args.shapes:
    for bits in args.bits:
      num_users = users_timed(shape, args, baseline=False)
      user_z, item_z = make_codes(shape, bits, num_users)
      run = {"shape": shape, "bits": bits, "users_timed": num_users, "build_seconds": {},
             "block_size": {}, "seconds": {}}
      chunk = min(args.user_chunk, num_users)  # Fewer users than a chunk: one call of them all.
      chunks = [user_z[i:i + chunk] for i in range(0, num_users, chunk)]
      chunks[-1] = np.pad(chunks[-1], ((0, chunk - len(chunks[-1])), (0, 0)))
      for selection in args.selections:
        start = time.perf_counter()
        index = retrieval.ItemIndex(item_z, tie_seed=TIE_SEED, selection=selection)
        run["build_seconds"][selection] = time.perf_counter() - start
        run["block_size"][selection] = index.block_size
        for mode, num_candidates in OUR_MODES:
          kwargs = {"mode": mode, "num_results": args.num_results,
                    "num_candidates": num_candidates}
          index.search(chunks[0], **kwargs)  # Compiles.
          name = method_name(mode, num_candidates)
          name += "" if selection == "auto" else f"/{selection}"
          run["seconds"][name], (ids, scores) = least_time(
              search_chunks, index, chunks, kwargs, repeats=args.repeats)
          for part, array in (("ids", ids), ("scores", scores)):
            np.save(os.path.join(args.child_out, f"{shape}_{bits}_{name.replace('/', '@')}_"
                                 f"{part}.npy"), array[:num_users])
        del index
      del item_z
      run["peak_rss_gb"] = peak_rss_gb()
      report["runs"].append(run)
      print(f"  ours x{report['devices']}: {shape} K={bits} done", file=sys.stderr, flush=True)
  print(json.dumps(report))


def _exact_top(keys: np.ndarray, k: int) -> np.ndarray:
  """Columns [C, k] of the k smallest keys per row, ties to the lower column (the index's rule)."""
  kth = np.partition(keys, k - 1, axis=1)[:, k - 1]  # [C]
  top = np.empty((len(keys), k), np.int64)
  for row, (values, bound) in enumerate(zip(keys, kth)):
    below = np.flatnonzero(values < bound)
    candidates = np.concatenate([below, np.flatnonzero(values == bound)[:k - len(below)]])
    top[row] = candidates[np.lexsort((candidates, values[candidates]))]
  return top


def run_numpy(user_z, item_z, method: str, num_results: int, chunk: int):
  """NumPy brute force over the tie-ordered item axis: (positions, scores) [U, n]."""
  mode = method.rstrip("0123456789")
  item_words = np.packbits(item_z >= 0, axis=1)  # [I, K / 8]
  positions, scores = [], []
  for start in range(0, len(user_z), chunk):
    users = user_z[start:start + chunk]
    if mode == "continuous":
      inner = users @ item_z.T  # [C, I]
      top = _exact_top(-inner, num_results)
      positions.append(top)
      scores.append(np.take_along_axis(inner, top, axis=1))
      continue
    user_words = np.packbits(users >= 0, axis=1)
    distances = np.zeros((len(users), len(item_z)), np.uint8)  # [C, I]
    for byte in range(item_words.shape[1]):
      distances += np.bitwise_count(user_words[:, byte, None] ^ item_words[None, :, byte])
    if mode == "hamming":
      top = _exact_top(distances, num_results)
      positions.append(top)
      scores.append(-np.take_along_axis(distances, top, axis=1).astype(np.float32))
      continue
    candidates = _exact_top(distances, int(method[len(mode):]))  # [C, M], Hamming rank order
    inner = np.einsum("ck,cmk->cm", users, item_z[candidates])
    order = np.argsort(-inner, axis=1, kind="stable")[:, :num_results]
    positions.append(np.take_along_axis(candidates, order, axis=1))
    scores.append(np.take_along_axis(inner, order, axis=1))
  return np.concatenate(positions), np.concatenate(scores)


def run_faiss(faiss, user_z, item_z, method: str, num_results: int):
  """faiss IndexBinaryFlat or IndexFlatIP over all users at once: scores [U, n]."""
  if method == "hamming":
    index = faiss.IndexBinaryFlat(item_z.shape[1])
    index.add(np.packbits(item_z >= 0, axis=1))
    distances, _ = index.search(np.packbits(user_z >= 0, axis=1), num_results)
    return -distances.astype(np.float32)
  index = faiss.IndexFlatIP(item_z.shape[1])
  index.add(item_z)
  scores, _ = index.search(user_z, num_results)
  return scores


def check(ours: np.ndarray, other: np.ndarray, method: str) -> dict:
  """Per-user top-n score multisets of two methods over the users both ran."""
  rows = min(len(ours), len(other))
  a, b = np.sort(ours[:rows], axis=1), np.sort(other[:rows], axis=1)
  if method == "hamming":
    return {"users": rows, "passed": bool(np.array_equal(a, b))}
  diff = float(np.max(np.abs(a - b)))
  return {"users": rows, "passed": diff <= INNER_TOLERANCE, "max_abs_diff": diff}


# Full run, and --quick (flags given explicitly win over both).
DEFAULTS = {"bits": "32,64", "devices": "1,2", "max_users": 0, "alibaba_users": 2_000,
            "baseline_users": 0, "alibaba_baseline_users": 500, "repeats": 2}
QUICK = {"bits": "32", "devices": "1", "max_users": 256, "alibaba_users": 256,
         "baseline_users": 64, "alibaba_baseline_users": 32, "repeats": 1}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(SHAPES), help="Comma-separated, of " +
                      ", ".join(SHAPES) + ".")
  parser.add_argument("--bits", help=f"Comma-separated code lengths K ({DEFAULTS['bits']}).")
  parser.add_argument("--devices", help="Device counts for ours, a process each; CPU devices are "
                      f"fake ones, one per core at most ({DEFAULTS['devices']}).")
  parser.add_argument("--num-results", type=int, default=100)
  parser.add_argument("--max-users", type=int,
                      help="Users timed per shape except alibaba; <= 0: all (0).")
  parser.add_argument("--alibaba-users", type=int,
                      help="Users timed at the alibaba shape; <= 0: all 601,946 (2,000).")
  parser.add_argument("--baseline-users", type=int,
                      help="Users faiss and NumPy time, at most, except at alibaba; <= 0: as ours "
                      "(0).")
  parser.add_argument("--alibaba-baseline-users", type=int,
                      help="Users faiss and NumPy time at the alibaba shape, at most (500).")
  parser.add_argument("--user-chunk", type=int, default=1024,
                      help="Users per ItemIndex.search (1,024: per-call work outweighed the "
                      "calls' fixed costs at 256 on the small shapes, on CPU).")
  parser.add_argument("--selections", default="auto",
                      help="Comma-separated ItemIndex selections to time, of " +
                      ", ".join(retrieval.SELECTIONS) + " (auto).")
  parser.add_argument("--numpy-chunk", type=int, default=64, help="Users per NumPy step.")
  parser.add_argument("--methods", default="ours,faiss,numpy")
  parser.add_argument("--host-memory", choices=("reuse", "default"), default="reuse",
                      help="reuse: ours runs with hostmem.reuse_freed_memory(), as main.py's "
                           "evaluation does (freed buffers stay in the heap instead of being "
                           "faulted in again every call); default: glibc's malloc as it is.")
  parser.add_argument("--repeats", type=int, help="Timings per method, the least kept (2).")
  parser.add_argument("--quick", action="store_true", help="Well under a minute: " +
                      ", ".join(f"{k}={v}" for k, v in QUICK.items()) + ".")
  parser.add_argument("--out", default="", help="Also write the JSON here.")
  parser.add_argument("--child-devices", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  for key, value in (QUICK if args.quick else DEFAULTS).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  # The child times ours with exactly these settings.
  child_flags = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in (
      "shapes", "bits", "num_results", "max_users", "alibaba_users", "user_chunk", "selections",
      "repeats", "host_memory")]
  args.shapes = args.shapes.split(",")
  args.bits = [int(b) for b in args.bits.split(",")]
  args.selections = args.selections.split(",")
  methods = args.methods.split(",")
  if args.child_devices:
    run_ours(args)
    return

  results = {"config": {k: v for k, v in vars(args).items() if not k.startswith("child")},
             "cpu_count": os.cpu_count(), "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    ours = {}
    for devices in ([int(d) for d in args.devices.split(",")] if "ours" in methods else []):
      out = os.path.join(tmp, str(devices))
      os.makedirs(out)
      child = subprocess.run(
          [sys.executable, __file__, f"--child-devices={devices}", f"--child-out={out}"] +
          child_flags, check=True,
          stdout=subprocess.PIPE, text=True)
      ours[devices] = (json.loads(child.stdout.splitlines()[-1]), out)
    faiss = None
    if "faiss" in methods:
      try:
        import faiss  # pylint: disable=g-import-not-at-top
        faiss.omp_set_num_threads(os.cpu_count())
      except ImportError:
        print("faiss is not installed (pip install -e .[bench]): faiss columns are skipped.")

    for shape in args.shapes:
      num_users, num_items = SHAPES[shape]
      for bits in args.bits:
        key = f"{shape}/K{bits}"
        run = results["runs"][key] = {"users": num_users, "items": num_items, "bits": bits,
                                      "methods": {}, "checks": {}}
        reference = {}  # method -> (ids, scores) of the first `ours` device count and selection.
        for devices, (report, out) in ours.items():
          report_run = next(r for r in report["runs"] if r["shape"] == shape and r["bits"] == bits)
          for name, seconds in report_run["seconds"].items():
            timed = report_run["users_timed"]
            run["methods"][f"ours_x{devices}/{name}"] = {
                "seconds": seconds * num_users / timed, "users_timed": timed,
                "extrapolated": timed < num_users, "peak_rss_gb": report_run["peak_rss_gb"]}
            loaded = tuple(np.load(os.path.join(
                out, f"{shape}_{bits}_{name.replace('/', '@')}_{part}.npy"))
                for part in ("ids", "scores"))
            method = name.split("/")[0]
            if method in reference:
              run["checks"][f"ours_x{devices}/{name} ids"] = {
                  "users": timed, "passed": bool(np.array_equal(loaded[0], reference[method][0]))}
            else:
              reference[method] = loaded
        timed = users_timed(shape, args, baseline=True)
        user_z, item_z = make_codes(shape, bits, timed)
        tie_order = codes_lib.tie_break_order(num_items, TIE_SEED)
        item_z = item_z[tie_order]
        baselines = []
        if faiss is not None:
          baselines += [("faiss", "hamming"), ("faiss", "continuous")]
        if "numpy" in methods:
          baselines += [("numpy", method_name(*m)) for m in OUR_MODES]
        for library, method in baselines:
          if library == "faiss":
            seconds, output = least_time(run_faiss, faiss, user_z, item_z, method,
                                         args.num_results, repeats=args.repeats)
          else:
            seconds, output = least_time(run_numpy, user_z, item_z, method, args.num_results,
                                         args.numpy_chunk, repeats=args.repeats)
          run["methods"][f"{library}/{method}"] = {
              "seconds": seconds * num_users / timed, "users_timed": timed,
              "extrapolated": timed < num_users}
          scores = output if library == "faiss" else output[1]
          if method in reference:
            run["checks"][f"{library}/{method} scores"] = check(
                reference[method][1], scores, method.rstrip("0123456789"))
            if library == "numpy":
              same = (reference[method][0][:timed] == tie_order[output[0]]).all(axis=1)
              # Float scores may round differently and swap near-equal items; distances may not.
              run["checks"][f"numpy/{method} ids"] = {
                  "users": timed, "equal_rows": float(same.mean()),
                  "passed": bool(same.all()) or method != "hamming"}
          print(f"  {library}/{method}: {key} done", file=sys.stderr, flush=True)

  print(json.dumps(results, indent=2))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
  print_table(results)


def print_table(results: dict) -> None:
  """All-users seconds, a row per method and a column per run; * marks extrapolation."""
  runs = results["runs"]
  names = sorted({name for run in runs.values() for name in run["methods"]})
  print("\nall-users seconds (* extrapolated from the first users_timed users)")
  print(f"{'method':<34}" + "".join(f"{key:>15}" for key in runs))
  for name in names:
    cells = []
    for run in runs.values():
      method = run["methods"].get(name)
      cells.append("-" if method is None else
                   f"{method['seconds']:.3g}{'*' if method['extrapolated'] else ''}")
    print(f"{name:<34}" + "".join(f"{c:>15}" for c in cells))
  failed = [f"{key}: {name}" for key, run in runs.items()
            for name, result in run["checks"].items() if not result["passed"]]
  print("checks: all passed" if not failed else "checks FAILED:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
  main()
