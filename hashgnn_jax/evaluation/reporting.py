"""Where results go: eval_results.json, metrics.jsonl, TensorBoard scalars and a printed table."""

import json
import os

import tensorboardX

from hashgnn_jax import fileio


class MetricsWriter:
  """Writes training scalars and evaluation records of one run (call on process 0 only)."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self._jsonl = os.path.join(workdir, "metrics.jsonl")
    self._tb = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def _append(self, record: dict) -> None:
    with open(self._jsonl, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def write_train(self, step: int, scalars: dict[str, float]) -> None:
    """Appends {"step", "split": "train", "metrics": {"train": scalars}}."""
    for name, value in scalars.items():
      self._tb.add_scalar(f"train/{name}", value, step)
    self._append({"step": step, "split": "train", "metrics": {"train": scalars}})

  def write_eval(self, record: dict) -> None:
    """Replaces eval_results.json with `record` and appends it to metrics.jsonl."""
    for mode, values in record["metrics"].items():
      for name, value in values.items():
        # TensorBoard tags may not contain '@'.
        tag = f"{record['split']}/{mode}/{name.replace('@', '_')}"
        self._tb.add_scalar(tag, value, record["step"])
    fileio.write_json_atomic(os.path.join(self.workdir, "eval_results.json"), record)
    self._append(record)

  def close(self) -> None:
    self._tb.close()


def format_table(record: dict) -> str:
  """A fixed-width table of an evaluation record: one row per mode, one column per metric."""
  modes = list(record["metrics"])
  names = sorted({name for values in record["metrics"].values() for name in values},
                 key=lambda n: (n.split("@")[0], int(n.split("@")[1]) if "@" in n else 0))
  header = f"{'mode':<13}" + "".join(f"{name:>10}" for name in names) + f"{'seconds':>10}"
  lines = [f"{record['split']} @ step {record['step']} ({record['bits']} bits)", header]
  for mode in modes:
    values = record["metrics"][mode]
    row = f"{mode:<13}" + "".join(f"{values.get(name, float('nan')):>10.4f}" for name in names)
    lines.append(row + f"{record['seconds'].get(mode, float('nan')):>10.2f}")
  return "\n".join(lines)
