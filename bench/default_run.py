"""Times the built-in default job end to end and checks its quality target against popularity.

  python bench/default_run.py [--devices=1,4] [--platform=cpu|default] [--serve]
      [--out=bench_default.json]

For each device count (fake CPU devices beyond 1), runs
`python -m hashgnn_jax.main --config=configs/default.py` in a fresh workdir, then prints JSON with
wall seconds (compilation included) and HR@50 per mode against the popularity baseline, and a table.
Targets (issue 2): under 180 s on a 2-core CPU, Hamming and hierarchical HR@50 >= 1.3x popularity.
--platform=default lets JAX pick the device (bench/gpu.sh's accelerator run); --serve then also
runs --mode=eval (its metrics must equal the training run's final ones), --mode=export and a
`Retriever` search of the export, and reports their seconds.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Runs in a child on the run's platform: loads the export and ranks the first users every way.
SERVE = """
import sys
import numpy as np
from hashgnn_jax.serving.retriever import Retriever
retriever = Retriever.load(sys.argv[1])
for mode in ("hamming", "hierarchical", "continuous"):
  ids, scores = retriever.search(np.arange(8), k=50, mode=mode, raw_ids=False)
  assert ids.shape == (8, 50) and np.all(np.diff(scores, axis=1) <= 0), mode
"""


def timed_run(command, env) -> float:
  start = time.perf_counter()
  subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def read_results(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval_results.json")) as f:
    return json.load(f)


def run_default(num_devices: int, platform: str, serve: bool) -> dict:
  """One end-to-end run of the default config; returns its timing and final record."""
  env = dict(os.environ)
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  if num_devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, "-m", "hashgnn_jax.main", "--config=configs/default.py",
               f"--workdir={workdir}"]
    wall = timed_run(command, env)
    record = read_results(workdir)
    result = {"devices": num_devices, "platform": platform, "wall_seconds": round(wall, 1)}
    if serve:
      # Removed first, so the comparison reads what --mode=eval wrote.
      os.remove(os.path.join(workdir, "eval_results.json"))
      seconds = {"eval": timed_run(command + ["--mode=eval"], env)}
      result["eval_reproduces_metrics"] = read_results(workdir)["metrics"] == record["metrics"]
      seconds["export"] = timed_run(command + ["--mode=export"], env)
      seconds["retriever"] = timed_run(
          [sys.executable, "-c", SERVE, os.path.join(workdir, "export")], env)
      result["serve_seconds"] = {name: round(value, 1) for name, value in seconds.items()}
  popularity = record["metrics"]["popularity"]["hr@50"]
  result["hr@50"] = {mode: round(v["hr@50"], 4) for mode, v in record["metrics"].items()}
  result["ratio_to_popularity"] = {mode: round(v["hr@50"] / popularity, 2)
                                   for mode, v in record["metrics"].items() if mode != "popularity"}
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,4", help="Comma-separated device counts.")
  parser.add_argument("--platform", default="cpu", choices=("cpu", "default"),
                      help="cpu: JAX_PLATFORMS=cpu; default: whatever JAX picks.")
  parser.add_argument("--serve", action="store_true",
                      help="Also time --mode=eval, --mode=export and a Retriever search.")
  parser.add_argument("--out", default="", help="Also write the JSON here.")
  args = parser.parse_args()
  results = [run_default(int(n), args.platform, args.serve) for n in args.devices.split(",")]
  print(json.dumps(results, indent=2))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
  print(f"\n{'devices':>8}{'wall s':>9}{'hamming':>9}{'hier.':>9}{'contin.':>9}{'popul.':>9}"
        f"{'ham/pop':>9}{'hier/pop':>9}")
  for r in results:
    h, ratio = r["hr@50"], r["ratio_to_popularity"]
    print(f"{r['devices']:>8}{r['wall_seconds']:>9.1f}{h['hamming']:>9.4f}{h['hierarchical']:>9.4f}"
          f"{h['continuous']:>9.4f}{h['popularity']:>9.4f}{ratio['hamming']:>9.2f}"
          f"{ratio['hierarchical']:>9.2f}")


if __name__ == "__main__":
  main()
