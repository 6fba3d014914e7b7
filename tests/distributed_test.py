"""Multi-process runs over loopback: `launch/local_multiprocess.sh` against one process.

Each launch starts two JAX processes of two CPU devices (or one) on this machine; the reference
runs in this test process on its four fake devices. The processes cost most of this file's time,
so a module fixture shares one 2 × 2 run and one 1 × 4 run among several tests.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hashgnn_jax import distributed
from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax.train import loop as train

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import test as test_config  # pylint: disable=g-import-not-at-top

NUM_STEPS = 60  # Across the epoch boundary at step 49 (6,274 training edges, batch 128).
EVERY = 30  # A checkpoint in the middle of the run as well as at its end.
OVERRIDES = {"train.num_steps": NUM_STEPS, "checkpoint.every_steps": EVERY,
             "train.log_every_steps": 10}


def _config(num_devices=0, **overrides):
  config = test_config.get_config()
  for key, value in {**OVERRIDES, "train.num_devices": num_devices, **overrides}.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def _launch(workdir, *, processes=2, devices=2, extra=()):
  """Starts the launcher; returns the Popen (text stdout and stderr pipes)."""
  env = dict(os.environ, NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS=str(devices))
  args = [f"--config.{key}={value}" for key, value in OVERRIDES.items()] + list(extra)
  return subprocess.Popen(["bash", "launch/local_multiprocess.sh", "configs/test.py",
                           str(workdir), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process, timeout=400):
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    raise
  return process.returncode, stdout, stderr


def _wait_for(process, pattern):
  """Reads stderr until a line matches; returns the match and the lines read."""
  lines = []
  for line in process.stderr:
    lines.append(line)
    match = re.search(pattern, line)
    if match:
      return match, lines
  raise AssertionError("The launch ended before printing " + pattern + ":\n" + "".join(lines[-40:]))


def _pids(process):
  """{process index: pid} from the processes' start lines."""
  pids = {}
  while len(pids) < 2:
    match, _ = _wait_for(process, r"JAX process (\d)/2 \(pid (\d+)\)")
    pids[int(match.group(1))] = int(match.group(2))
  return pids


def _state(workdir, config, step=None):
  exp = experiment_lib.Experiment(config)
  ckpt = exp.checkpointer(str(workdir))
  state = ckpt.restore(exp.abstract_state(), step)
  ckpt.close()
  return jax.device_get(state)


def _assert_close(a, b, bound=1e-3):
  """Each leaf of a within bound × its norm of b's.

  Processes sum the devices' gradients over gloo, one process over its own all-reduce, in
  other orders: rounding differences of 1e-7 that 60 Adam steps grow to 1e-4 relative (4.5e-4
  at most on a 2-core Xeon, in the momenta). A wrong batch, seed or shard moves leaves by O(1).
  """
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, jax.tree_util.keystr(path)
    error = np.linalg.norm(x - y)
    assert error <= bound * np.linalg.norm(y), (jax.tree_util.keystr(path), error)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of the same job as 2 processes × 2 devices and as 1 process × 4 devices."""
  root = tmp_path_factory.mktemp("runs")
  code, stdout, stderr = _finish(_launch(root / "2x2"))
  assert code == 0, stderr[-3000:]
  one = train.train_and_evaluate(_config(), str(root / "1x4"))
  return {"2x2": root / "2x2", "1x4": root / "1x4", "stdout": stdout, "one": one}


def test_two_processes_train_like_one_process_of_all_devices(runs):
  for step in (EVERY, NUM_STEPS):  # Mid-run (before the epoch boundary) and at the end.
    _assert_close(_state(runs["2x2"], _config(), step), _state(runs["1x4"], _config(), step))
  # Losses logged by process 0 alone, into one metrics file.
  lines = [json.loads(x) for x in (runs["2x2"] / "metrics.jsonl").read_text().splitlines()]
  reference = [json.loads(x) for x in (runs["1x4"] / "metrics.jsonl").read_text().splitlines()]
  def losses(records):
    return [(x["step"], x["metrics"]["train"]["loss"]) for x in records if x["split"] == "train"]

  assert [s for s, _ in losses(lines)] == list(range(10, NUM_STEPS + 1, 10))
  np.testing.assert_allclose([v for _, v in losses(lines)], [v for _, v in losses(reference)],
                             rtol=1e-5)
  # Only process 0 printed the results table.
  assert "[0] test @ step 60" in runs["stdout"] and "[1] test @" not in runs["stdout"]


def test_sharded_tables_over_two_processes_train_like_the_replicated_run(runs, tmp_path):
  """Each of the 4 devices of 2 processes owns a quarter of the table and moments; the rows and
  their gradients travel between the processes (all_to_all over gloo)."""
  workdir = tmp_path / "sharded"
  code, _, stderr = _finish(_launch(workdir, extra=["--config.train.embedding_layout=sharded"]))
  assert code == 0, stderr[-3000:]
  for step in (EVERY, NUM_STEPS):
    # Restored whole, into the replicated layout: rows past the 900 nodes are cut.
    sharded = _state(workdir, _config(), step)
    # The replicated 2 × 2 run sums the same gradients in the same order.
    _assert_close(sharded, _state(runs["2x2"], _config(), step), bound=1e-6)
    _assert_close(sharded, _state(runs["1x4"], _config(), step))
  written = json.loads((workdir / "eval_results.json").read_text())
  assert written["by_protocol"] == json.loads(
      (runs["2x2"] / "eval_results.json").read_text())["by_protocol"]


def test_split_evaluation_equals_one_process_and_restores_on_other_topologies(runs):
  # The 2 × 2 run evaluated its final state with the test users split between its processes
  # (5 chunks of 128); one process restoring that checkpoint on 1 or 4 devices scores the same.
  written = json.loads((runs["2x2"] / "eval_results.json").read_text())
  for num_devices in (1, 4):
    record = experiment_lib.evaluate_checkpoint(_config(num_devices), str(runs["2x2"]))
    assert record["step"] == NUM_STEPS
    assert record["by_protocol"] == written["by_protocol"]


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_resume_equals_a_straight_run(
    runs, tmp_path):
  workdir = tmp_path / "stopped"
  process = _launch(workdir, devices=2, extra=["--config.checkpoint.every_steps=1000"])
  pids = _pids(process)
  _wait_for(process, r"\[1\] .*step 20/60")
  os.kill(pids[1], signal.SIGTERM)  # Process 0 hears nothing; the step's flag tells it.
  code, stdout, stderr = _finish(process)
  assert code == 0, stderr[-3000:]
  stops = re.findall(r"\[(\d)\] .*Stopped by (.+) at step (\d+) of 60", stderr)
  assert {(p, step) for p, _, step in stops} == {("0", stops[0][2]), ("1", stops[0][2])}, stops
  assert dict((p, by) for p, by, _ in stops) == {"0": "a signal to another process",
                                                 "1": "SIGTERM"}
  step = int(stops[0][2])
  assert 20 <= step < NUM_STEPS
  assert max(experiment_lib.Experiment(_config()).checkpointer(str(workdir)).all_steps()) == step
  # Resumed on one process of four devices: the same run as the uninterrupted one.
  resumed = train.train_and_evaluate(_config(), str(workdir))
  _assert_close(_state(workdir, _config()), _state(runs["1x4"], _config()))
  assert resumed["step"] == NUM_STEPS


def test_kill_9_then_resume_equals_a_straight_run(runs, tmp_path):
  workdir = tmp_path / "killed"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
  process = subprocess.Popen(
      [sys.executable, "-m", "hashgnn_jax.main", "--config=configs/test.py", *args,
       "--config.checkpoint.every_steps=10", f"--workdir={workdir}"], cwd=ROOT, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(process, r"step 40/60")
  process.kill()
  process.wait(timeout=60)
  process.stderr.close()
  assert process.returncode == -signal.SIGKILL
  # Whatever the kill interrupted (a save included), the rerun resumes from a complete
  # checkpoint and ends where the straight run did.
  train.train_and_evaluate(_config(), str(workdir))
  # One process both times, the same sums in the same order.
  _assert_close(_state(workdir, _config()), _state(runs["1x4"], _config()), bound=1e-6)


def test_a_dead_process_makes_the_other_exit_with_an_error(tmp_path):
  process = _launch(tmp_path / "dead", devices=1,
                    extra=["--config.train.num_steps=100000", "--heartbeat_timeout_seconds=10"])
  pids = _pids(process)
  _wait_for(process, r"\[0\] .*step 10/")
  start = time.monotonic()
  os.kill(pids[1], signal.SIGKILL)
  code, _, stderr = _finish(process, timeout=180)
  assert code != 0
  assert time.monotonic() - start < 120, stderr[-2000:]


def test_auto_mode_joins_only_when_the_environment_says_so(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.wanted("auto", None)
  assert distributed.wanted("auto", "10.0.0.1:1234")
  assert distributed.wanted("on", None) and not distributed.wanted("off", "10.0.0.1:1234")
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
  assert not distributed.wanted("auto", None)  # One task: a single-process job.
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
  assert distributed.wanted("auto", None)
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "eight")
  with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS='eight'"):
    distributed.wanted("auto", None)
  with pytest.raises(ValueError, match="'sometimes' is not one of"):
    distributed.wanted("sometimes", None)


def test_single_process_helpers_change_nothing():
  rows = np.arange(6).reshape(3, 2)
  (gathered,) = distributed.gather_rows(rows)
  np.testing.assert_array_equal(gathered, rows)
  tree = {"a": jax.numpy.ones(3)}
  assert distributed.local_copy(tree)["a"] is tree["a"]
  assert distributed.main_first("x", lambda: 7) == 7
