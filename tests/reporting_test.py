"""Result files: atomic JSON, appended JSONL, and the printed table."""

import json
import os

import pytest

from hashgnn_jax.evaluation import reporting
from hashgnn_jax import fileio


def _record(step):
  return {"step": step, "split": "test", "bits": 32, "num_users": 3, "num_items": 4,
          "metrics": {"hamming": {"hr@50": 0.5, "ndcg@50": 0.25, "hr@100": 0.75}},
          "seconds": {"hamming": 0.1}}


def test_write_json_atomic_leaves_nothing_on_failure(tmp_path):
  path = tmp_path / "out.json"
  fileio.write_json_atomic(str(path), {"a": 1})
  with pytest.raises(TypeError):
    fileio.write_json_atomic(str(path), {"a": object()})
  assert json.loads(path.read_text()) == {"a": 1}  # The old file survives intact.
  assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_metrics_writer(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path))
  writer.write_train(10, {"loss": 0.5})
  writer.write_eval(_record(10))
  writer.write_eval(_record(20))
  writer.close()
  assert json.loads((tmp_path / "eval_results.json").read_text())["step"] == 20
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in lines] == [(10, "train"), (10, "test"), (20, "test")]
  assert lines[0]["metrics"] == {"train": {"loss": 0.5}}


def test_format_table_orders_cutoffs_numerically():
  table = reporting.format_table(_record(5))
  header = table.splitlines()[1].split()
  assert header == ["mode", "hr@50", "hr@100", "ndcg@50", "seconds"]
  assert table.splitlines()[2].split() == ["hamming", "0.5000", "0.7500", "0.2500", "0.10"]
