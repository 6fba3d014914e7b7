"""Times the built-in default job end to end and checks its quality target against popularity.

  python bench/default_run.py [--devices=1,4] [--out=bench_default.json]

For each device count (fake CPU devices beyond 1), runs
`python -m hashgnn_jax.main --config=configs/default.py` in a fresh workdir, then prints JSON with
wall seconds (compilation included) and HR@50 per mode against the popularity baseline, and a table.
Targets (issue 2): under 180 s on a 2-core CPU, Hamming and hierarchical HR@50 >= 1.3x popularity.
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


def run_default(num_devices: int) -> dict:
  """One end-to-end run of the default config; returns its timing and final record."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if num_devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hashgnn_jax.main", "--config=configs/default.py",
                    f"--workdir={workdir}"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "eval_results.json")) as f:
      record = json.load(f)
  popularity = record["metrics"]["popularity"]["hr@50"]
  return {
      "devices": num_devices,
      "wall_seconds": round(wall, 1),
      "hr@50": {mode: round(v["hr@50"], 4) for mode, v in record["metrics"].items()},
      "ratio_to_popularity": {mode: round(v["hr@50"] / popularity, 2)
                              for mode, v in record["metrics"].items() if mode != "popularity"},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,4", help="Comma-separated device counts.")
  parser.add_argument("--out", default="", help="Also write the JSON here.")
  args = parser.parse_args()
  results = [run_default(int(n)) for n in args.devices.split(",")]
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
