"""ItemIndex search time per block size, on whatever device JAX finds (the block-size cap's check).

  python bench/block_size.py [--shape=alibaba] [--bits=32,64] [--blocks=32,64,128,256]
      [--users=4096] [--repeats=5] [--quick] [--out=block_size.json]

`retrieval._MAX_BLOCK_SIZE` caps the automatic block size per platform: 64 on CPU, 128 elsewhere,
from one H200 (docs/experiments.md, "On a GPU"), where blocks of 64 made XLA split the K = 64 key
pass into six kernels. This script times one `ItemIndex.search` call of --users users per block
size and mode at a Table 4 shape (random codes, as bench/retrieval.py makes them), so a new card or
a new XLA can be checked in a minute. Every block size must return the same ids (the search is
exact whatever the blocks); the check is printed with the table. A case that fails on the device
(out of memory, say) is reported as an error and the others go on. --quick: 1/16 of the items and
256 users.
"""

import argparse
import functools
import json
import pathlib
import time

import jax
import numpy as np
import retrieval as retrieval_bench  # bench/retrieval.py, beside this script.

from hashgnn_jax.retrieval import index as retrieval
from hashgnn_jax.retrieval import layout

MODES = (("hamming", None), ("hierarchical", 100), ("hierarchical", 500))


def median_seconds(fn, repeats: int):
  """(Median wall seconds over `repeats` calls after a compiling one, the last call's result)."""
  fn()  # Compiles.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="alibaba", choices=tuple(retrieval_bench.SHAPES))
  parser.add_argument("--bits", default="32,64")
  parser.add_argument("--blocks", default="32,64,128,256")
  parser.add_argument("--users", type=int, default=4096, help="Users in the one timed call.")
  parser.add_argument("--repeats", type=int, default=5, help="Timed calls; the median is kept.")
  parser.add_argument("--quick", action="store_true", help="1/16 of the items, 256 users.")
  parser.add_argument("--out", default="", help="Also write the JSON here.")
  args = parser.parse_args()
  users = 256 if args.quick else args.users
  device = jax.local_devices()[0]
  report = {"device": device.device_kind, "platform": device.platform, "shape": args.shape,
            "users": users, "runs": []}
  for bits in map(int, args.bits.split(",")):
    user_z, item_z = retrieval_bench.make_codes(args.shape, bits, users)
    if args.quick:
      item_z = item_z[:len(item_z) // 16]
    run = {"bits": bits, "items": len(item_z), "ms": {}, "same_ids": {}, "errors": {},
           "auto_block_size": layout.index_layout(len(item_z), jax.local_devices())[1]}
    reference = {}
    for block_size in map(int, args.blocks.split(",")):
      index = retrieval.ItemIndex(item_z, tie_seed=0, block_size=block_size)
      for mode, num_candidates in MODES:
        name = retrieval_bench.method_name(mode, num_candidates)
        search = functools.partial(index.search, user_z, mode=mode, num_results=100,
                                   num_candidates=num_candidates)
        try:
          seconds, (ids, _) = median_seconds(search, args.repeats)
        except jax.errors.JaxRuntimeError as error:
          # One case out of device memory (seen on an H100) must not lose the other cases.
          run["errors"][f"{name} b={block_size}"] = str(error).splitlines()[0][:300]
          run["ms"].setdefault(name, {})[block_size] = None
          continue
        run["ms"].setdefault(name, {})[block_size] = 1e3 * seconds
        if name in reference:
          run["same_ids"][f"{name} b={block_size}"] = bool(np.array_equal(ids, reference[name]))
        else:
          reference[name] = ids
      del index
    report["runs"].append(run)
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")
  print_table(report)
  if any(run["errors"] for run in report["runs"]):
    raise SystemExit("Some cases failed on the device; see the errors above.")


def print_table(report: dict) -> None:
  """ms per call, a row per (K, mode) and a column per block size; * marks the automatic one."""
  print(f"\n{report['device']} ({report['platform']}), {report['shape']}, {report['users']} users "
        "per call, median ms (* the automatic block size)")
  for run in report["runs"]:
    blocks = sorted({b for times in run["ms"].values() for b in times})
    print(f"K={run['bits']:<4}{'mode':<16}" + "".join(
        f"{f'b={b}' + ('*' if b == run['auto_block_size'] else ''):>10}" for b in blocks))
    for name, times in run["ms"].items():
      print(f"{'':<6}{name:<16}" + "".join(
          f"{'error':>10}" if times.get(b) is None else f"{times[b]:>10.1f}" for b in blocks))
    for case, message in run["errors"].items():
      print(f"K={run['bits']} {case}: {message}")
  same = [ok for run in report["runs"] for ok in run["same_ids"].values()]
  print("ids identical across block sizes" if all(same) else "ids DIFFER across block sizes")


if __name__ == "__main__":
  main()
