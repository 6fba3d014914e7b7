"""The pmapped train step and the train/eval loop, end to end on configs/test.py."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax.model import losses
from hashgnn_jax.serving import export
from hashgnn_jax.train import checkpointing
from hashgnn_jax.train import loop as train
from hashgnn_jax.train import optim
from hashgnn_jax.train import sampler
from hashgnn_jax.train import schedules
from hashgnn_jax.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import test as test_config  # pylint: disable=g-import-not-at-top


def _config(**overrides):
  config = test_config.get_config()
  for key, value in overrides.items():
    group, field = key.split("__")
    config[group][field] = value
  return config


def _run_steps(exp, devices, num_steps, state=None, set_sizes=None, capacity=None):
  """Runs `num_steps` pmapped steps on `devices` the way train_and_evaluate does."""
  replicated, shard_inputs = step_lib.device_layout(devices)
  graph = graph_lib.to_device(exp.graph, replicated)
  if set_sizes == "fit":
    set_sizes = step_lib.fit_set_sizes(exp.config, graph, devices)
    assert set_sizes is not None
  step_fn = step_lib.make_train_step(exp.model, exp.tx, exp.config, exp.per_epoch, devices,
                                     set_sizes, capacity)
  state = step_lib.place_state(exp.initial_state() if state is None else state, devices,
                               exp.config.train.embedding_layout)
  metrics = None
  for _ in range(num_steps):
    epoch = int(state.step) // exp.per_epoch
    order = jax.device_put(sampler.epoch_order(exp.order_rng, epoch, exp.graph.num_edges),
                           replicated)
    state, metrics = step_fn(state, graph, order, exp.step_rng, shard_inputs)
  return state, metrics, step_fn


@pytest.fixture(scope="module")
def experiment():
  return experiment_lib.Experiment(_config())


# "rowwise" at this size streams its update (optim.STREAMING_SHARE); "rowwise-gathered" forces
# the gathered form that large catalogues use.
@pytest.mark.parametrize("mode,update", [("node", "rowwise"), ("node", "rowwise-gathered"),
                                         ("tree", "rowwise"), ("node", "dense"),
                                         ("node", "rowwise-trimmed"), ("full", "dense")])
def test_four_devices_match_one_device(experiment, mode, update, monkeypatch):
  assert jax.local_device_count() >= 4
  if update == "rowwise-gathered":
    monkeypatch.setattr(optim, "STREAMING_SHARE", float("inf"))
  set_sizes = "fit" if update == "rowwise-trimmed" else None
  monkeypatch.setattr(sampler, "_MIN_TRIM_SLOTS", 0)  # This config's sets are small.
  update = update.split("-")[0]
  if (mode, update) != (experiment.config.sampler.mode, experiment.config.train.embedding_update):
    experiment = experiment_lib.Experiment(
        _config(sampler__mode=mode, train__embedding_update=update))
  one_state, one_metrics, _ = _run_steps(experiment, jax.local_devices()[:1], 2,
                                         set_sizes=set_sizes)
  four_state, four_metrics, _ = _run_steps(experiment, jax.local_devices()[:4], 2,
                                           set_sizes=set_sizes)
  assert int(one_state.step) == int(four_state.step) == 2
  if set_sizes:
    assert float(one_metrics["trimmed"]) == float(four_metrics["trimmed"]) == 1.0
  for name in one_metrics:
    np.testing.assert_allclose(four_metrics[name], one_metrics[name], rtol=1e-5, atol=1e-6)
  # Adam divides by the gradient's own scale, so the summation order's float noise in a near-zero
  # gradient moves a row by up to ~1e-3 of a step (lr 1e-2 here); a real error moves it ~lr.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               one_state.params, four_state.params)


@pytest.mark.parametrize("mode", ["node", "tree", "full"])
def test_lightgcn_four_devices_match_one_device(mode):
  update = "dense" if mode == "full" else "rowwise"
  exp = experiment_lib.Experiment(_config(model__aggregator="lightgcn", model__hidden_dims=(16, 16),
                                          sampler__mode=mode, train__embedding_update=update))
  one_state, one_metrics, _ = _run_steps(exp, jax.local_devices()[:1], 2)
  four_state, four_metrics, _ = _run_steps(exp, jax.local_devices()[:4], 2)
  for name in one_metrics:
    np.testing.assert_allclose(four_metrics[name], one_metrics[name], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               one_state.params, four_state.params)
  # The table trained: the step reached the embeddings through the weightless propagation.
  initial = exp.initial_state().params["embedding"]["embedding"]
  assert not np.allclose(one_state.params["embedding"]["embedding"], initial)


@pytest.mark.parametrize("mixed", [0, 2])
def test_code_terms_four_devices_match_one_device(mixed):
  """The in-batch softmax (over every device's positives, and with `mixed` > 0 their uniform
  negatives too), the binary term and the z terms."""
  exp = experiment_lib.Experiment(_config(
      loss__inbatch_weight=1.0, loss__binary_weight=0.5, loss__quant_weight=0.1,
      loss__balance_weight=0.1, loss__decorr_weight=0.1, loss__logit_scale="cosine",
      loss__temperature=5.0, loss__learn_temperature=True, loss__inbatch_negatives=mixed))
  one_state, one_metrics, _ = _run_steps(exp, jax.local_devices()[:1], 2)
  four_state, four_metrics, _ = _run_steps(exp, jax.local_devices()[:4], 2)
  assert {"inbatch_loss", "binary_loss", "quant_loss", "temperature"} <= set(one_metrics)
  for name in one_metrics:
    np.testing.assert_allclose(four_metrics[name], one_metrics[name], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               one_state.params, four_state.params)
  assert float(one_metrics["inbatch_loss"]) > 0


@pytest.mark.parametrize("mixed", [0, 1, 3])
def test_softmax_candidates_come_in_global_batch_order(mixed):
  # 3 devices, b = 2 examples each with T = 3 negatives; row r of device d codes (d, r).
  n, b, t = 3, 2, 3
  codes = np.stack([np.stack([[d, r] for r in range(b * (2 + t))]) for d in range(n)])
  gathered = jax.vmap(lambda c: step_lib.gather_candidates(c, b, t, mixed, "dev"),
                      axis_name="dev")(jnp.asarray(codes, jnp.float32))
  positives = [[d, b + k] for d in range(n) for k in range(b)]
  negatives = [[d, 2 * b + k * t + j] for d in range(n) for k in range(b) for j in range(mixed)]
  for device in range(n):  # Every device sees the same candidates.
    np.testing.assert_array_equal(gathered[device], np.asarray(positives + negatives))


@pytest.mark.parametrize("update", ["rowwise", "dense"])
def test_trimmed_steps_match_untrimmed_steps(update, monkeypatch):
  monkeypatch.setattr(sampler, "_MIN_TRIM_SLOTS", 0)  # This config's sets are small.
  experiment = experiment_lib.Experiment(_config(train__embedding_update=update))
  devices = jax.local_devices()[:1]
  full_state, full_metrics, _ = _run_steps(experiment, devices, 3)
  trim_state, trim_metrics, _ = _run_steps(experiment, devices, 3, set_sizes="fit")
  assert int(trim_state.step) == 3 and float(trim_metrics.pop("trimmed")) == 1.0
  for name in full_metrics:
    np.testing.assert_allclose(trim_metrics[name], full_metrics[name], rtol=1e-5, atol=1e-6)
  # Fewer padding rows change the float summation order only (see the four-device test).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               full_state.params, trim_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               full_state.opt_state, trim_state.opt_state)


def test_trim_sets_setting(experiment, monkeypatch):
  monkeypatch.setattr(sampler, "_MIN_TRIM_SLOTS", 0)
  devices = jax.local_devices()[:1]
  graph = graph_lib.to_device(experiment.graph)
  fit = lambda **overrides: step_lib.fit_set_sizes(_config(**overrides), graph, devices)
  sizes = fit()  # "auto", on CPU devices.
  assert sizes is not None and sizes == fit(sampler__trim_sets="always")
  assert fit(sampler__trim_sets="never") is None
  assert fit(sampler__mode="tree") is None


@pytest.mark.parametrize("update", ["rowwise", "dense"])
def test_overflowing_step_changes_nothing_and_the_stepper_reruns_it(update):
  experiment = experiment_lib.Experiment(_config(train__embedding_update=update))
  devices = jax.local_devices()[:2]
  replicated, shard_inputs = step_lib.device_layout(devices)
  graph = graph_lib.to_device(experiment.graph, replicated)
  order = jax.device_put(sampler.epoch_order(experiment.order_rng, 0, experiment.graph.num_edges),
                         replicated)
  args = (graph, order, experiment.step_rng, shard_inputs)
  fresh = lambda: jax.device_put(experiment.initial_state(), replicated)
  too_small = (32, 1024, 1024)  # Fewer slots than the batch's distinct targets.
  start = experiment.initial_state()
  state, metrics = step_lib.make_train_step(experiment.model, experiment.tx, experiment.config,
                                         experiment.per_epoch, devices, too_small)(fresh(), *args)
  assert float(metrics["trimmed"]) == 0.0 and int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.params, start.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, start.opt_state)
  np.testing.assert_array_equal(state.node_marks, start.node_marks)

  untrimmed_state, untrimmed_metrics = step_lib.make_train_step(
      experiment.model, experiment.tx, experiment.config, experiment.per_epoch, devices)(
          fresh(), *args)
  stepper = step_lib.make_stepper(experiment.model, experiment.tx, experiment.config,
                               experiment.per_epoch, devices, too_small)
  state, metrics = stepper(fresh(), *args)
  assert float(metrics.pop("trimmed")) == 0.0 and int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, state, untrimmed_state)
  jax.tree.map(np.testing.assert_array_equal, metrics, untrimmed_metrics)


def test_step_compiles_once_across_steps_and_epochs(experiment, monkeypatch):
  traces = []
  original = losses.hashgnn_loss

  def counting_loss(*args, **kwargs):
    traces.append(1)  # Runs only while tracing.
    return original(*args, **kwargs)

  monkeypatch.setattr(losses, "hashgnn_loss", counting_loss)
  steps = experiment.per_epoch + 2  # Crosses an epoch boundary and a new edge order.
  state, _, _ = _run_steps(experiment, jax.local_devices()[:2], steps)
  assert int(state.step) == steps
  assert len(traces) == 1


def test_learned_temperature_trains_and_stays_positive():
  exp = experiment_lib.Experiment(_config(loss__logit_scale="cosine", loss__temperature=4.0,
                                          loss__learn_temperature=True, train__learning_rate=0.5))
  start = exp.initial_state()
  np.testing.assert_allclose(start.params["log_temperature"], np.log(4.0), rtol=1e-6)
  # A large rate moves log t by about 0.5 a step; the temperature exp(log t) stays above 0.
  state, _, _ = _run_steps(exp, jax.local_devices()[:1], 5)
  log_t = float(state.params["log_temperature"])
  assert abs(log_t - np.log(4.0)) > 0.5
  # A step reports the temperature its loss used: the one it started from.
  _, metrics, _ = _run_steps(exp, jax.local_devices()[:1], 1, state=state)
  np.testing.assert_allclose(float(metrics["temperature"]), np.exp(log_t), rtol=1e-5)
  assert float(metrics["temperature"]) > 0
  # Without learn_temperature there is no such parameter.
  fixed = experiment_lib.Experiment(_config(loss__logit_scale="cosine", loss__temperature=4.0))
  assert "log_temperature" not in fixed.initial_state().params


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_embedding_weight_decay_shrinks_exactly_the_trained_rows(layout):
  # From one state the Adam part of a step is the same with and without decay, so their tables
  # differ by lr · wd · row on the rows the step trained and not at all elsewhere.
  lr, wd = 0.01, 0.5
  tables = {}
  for decay in (0.0, wd):
    exp = experiment_lib.Experiment(_config(train__learning_rate=lr, train__num_devices=2,
                                            train__embedding_weight_decay=decay,
                                            train__embedding_layout=layout))
    state, _, _ = _run_steps(exp, exp.devices, 1)
    tables[decay] = np.asarray(exp.whole_params(state.params)["embedding"]["embedding"])
  start = np.asarray(exp.whole_params(exp.initial_state().params)["embedding"]["embedding"])
  trained = np.any(tables[0.0] != start, axis=1)
  assert 0 < trained.sum() < len(start)
  np.testing.assert_allclose(tables[wd][trained] - tables[0.0][trained],
                             -lr * wd * start[trained], rtol=1e-4, atol=1e-8)
  np.testing.assert_array_equal(tables[wd][~trained], start[~trained])


def test_batch_size_must_divide_by_devices(experiment):
  config = _config(train__batch_size=130)
  with pytest.raises(ValueError, match=r"batch_size=130 must be divisible .* devices \(4\)"):
    step_lib.make_train_step(experiment.model, experiment.tx, config, 10, jax.local_devices()[:4])


def test_batch_larger_than_training_edges_is_rejected():
  with pytest.raises(ValueError, match="batch_size=10000000 exceeds"):
    schedules.steps_per_epoch(5_000, 10_000_000)


def test_guidance_schedules():
  config = _config().guidance
  config.schedule, config.init, config.decay_rate, config.transition_steps, config.floor = (
      "exponential", 1.0, 0.95, 250, 0.5)
  schedule = schedules.create_guidance_schedule(config, per_epoch=100)
  np.testing.assert_allclose([schedule(s) for s in (0, 249, 250, 500, 100_000)],
                             [1.0, 1.0, 0.95, 0.9025, 0.5], rtol=1e-6)
  config.schedule, config.decrement, config.transition_steps, config.floor = ("linear", 0.02, -2,
                                                                              0.0)
  schedule = schedules.create_guidance_schedule(config, per_epoch=100)  # Every two epochs.
  np.testing.assert_allclose([schedule(s) for s in (0, 199, 200, 1_999, 10_000_000)],
                             [1.0, 1.0, 0.98, 0.82, 0.0], atol=1e-6)


def test_learning_rate_schedules():
  config = _config().train
  config.learning_rate, config.lr_end_fraction = 0.4, 0.25
  config.lr_schedule, config.warmup_steps = "constant", 0
  schedule = schedules.create_learning_rate(config, 100)
  np.testing.assert_allclose([schedule(t) for t in (0, 50, 99, 500)], 0.4)
  config.warmup_steps = 4
  schedule = schedules.create_learning_rate(config, 100)
  np.testing.assert_allclose([schedule(t) for t in (0, 1, 3, 4, 99)], [0, 0.1, 0.3, 0.4, 0.4],
                             atol=1e-7)
  config.lr_schedule, config.warmup_steps = "cosine", 10
  schedule = schedules.create_learning_rate(config, 110)
  steps = np.array([0, 5, 10, 35, 60, 109, 110, 1_000])
  # Half a cosine from the peak (0.4) at the warm-up's end down to 0.25 * 0.4 at step 110.
  phase = np.clip((steps - 10) / 100, 0, 1)
  expected = np.where(steps < 10, 0.4 * steps / 10, 0.1 + 0.3 * 0.5 * (1 + np.cos(np.pi * phase)))
  np.testing.assert_allclose([schedule(t) for t in steps], expected, rtol=1e-5, atol=1e-7)
  config.warmup_steps = 0
  schedule = schedules.create_learning_rate(config, 100)
  np.testing.assert_allclose([schedule(t) for t in (0, 50, 100)], [0.4, 0.25, 0.1], rtol=1e-5)
  config.warmup_steps = 10
  with pytest.raises(ValueError, match=r"config\.train\.warmup_steps=10 must be below"):
    schedules.create_learning_rate(config, 10)


def test_warm_up_step_zero_leaves_every_parameter_unchanged():
  # lr(0) = 0: the first update must move neither the dense parameters nor the table's rows,
  # so both optimizers follow the schedule; the second (lr > 0) must move both.
  exp = experiment_lib.Experiment(_config(train__warmup_steps=5, train__lr_schedule="cosine"))
  start = exp.initial_state().params
  devices = jax.local_devices()[:1]
  one, _, _ = _run_steps(exp, devices, 1)
  jax.tree.map(np.testing.assert_array_equal, start, one.params)
  two, _, _ = _run_steps(exp, devices, 2)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), start, two.params)
  assert all(jax.tree.leaves(moved)), moved


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """configs/test.py trained on all four fake devices, unchanged."""
  workdir = str(tmp_path_factory.mktemp("run"))
  record = train.train_and_evaluate(_config(), workdir)
  return workdir, record


def test_end_to_end_beats_popularity(trained_run):
  _, record = trained_run
  popularity = record["metrics"]["popularity"]["hr@50"]
  assert popularity > 0.2  # The baseline is not trivial on this graph ...
  for mode in ("hamming", "hierarchical"):  # ... and the learned codes beat it.
    assert record["metrics"][mode]["hr@50"] > 1.3 * popularity, record["metrics"]


def test_results_files(trained_run):
  workdir, record = trained_run
  with open(os.path.join(workdir, "eval_results.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(record))
  assert set(saved) >= {"step", "split", "metrics", "seconds", "num_users", "num_items", "bits"}
  assert set(saved["metrics"]) == {"hamming", "hierarchical", "continuous", "popularity"}
  assert set(saved["metrics"]["hamming"]) == {"hr@10", "hr@50", "ndcg@10", "ndcg@50"}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [r["step"] for r in lines if r["split"] == "train"] == [100, 200, 300, 400, 500, 600]
  assert lines[-1] == saved
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert not [n for n in os.listdir(workdir) if n.startswith(".tmp_")]


def test_eval_mode_reproduces_final_metrics(trained_run):
  workdir, record = trained_run
  again = experiment_lib.evaluate_checkpoint(_config(), workdir)
  assert again["step"] == record["step"] == 600
  assert again["metrics"] == record["metrics"]
  with pytest.raises(FileNotFoundError, match="No checkpoint for step 7"):
    experiment_lib.evaluate_checkpoint(_config(), workdir, step=7)


@pytest.mark.parametrize("bits", [64, 128])
def test_long_codes_train_checkpoint_evaluate_and_export(tmp_path, bits):
  # K = 64 and 128: two and four uint32 words per code, end to end.
  config = _config(model__hash_bits=bits, train__num_steps=100, train__num_devices=1,
                   checkpoint__every_steps=50)
  workdir = str(tmp_path)
  record = train.train_and_evaluate(config, workdir)
  assert record["bits"] == bits and record["step"] == 100
  assert all(0 <= v <= 1 for m in record["metrics"].values() for v in m.values())
  again = experiment_lib.evaluate_checkpoint(config, workdir)
  assert again["metrics"] == record["metrics"]
  path = export.export_checkpoint(config, workdir)
  manifest = json.loads(pathlib.Path(path, "manifest.json").read_text())
  assert (manifest["bits"], manifest["words"]) == (bits, bits // 32)
  exp = experiment_lib.Experiment(config)
  params, _ = experiment_lib.restore_params(exp, workdir, None, "latest")
  node_z = exp.encode(params)
  users = np.load(os.path.join(path, "user_codes.npy"))
  assert users.shape == (exp.graph.num_users, bits // 32) and users.dtype == np.uint32
  # Bit j of word w is code bit 32 w + j, set where z >= 0: unpacked with NumPy shifts.
  unpacked = (users[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1  # [U, W, 32]
  np.testing.assert_array_equal(unpacked.reshape(len(users), bits).astype(bool),
                                node_z[:exp.graph.num_users] >= 0)


def _final_params(workdir, exp):
  ckpt = exp.checkpointer(workdir)
  state = ckpt.restore(exp.abstract_state())
  ckpt.close()
  return state


def test_resume_continues_from_checkpoint(tmp_path):
  half, full = str(tmp_path / "half"), str(tmp_path / "full")
  config = _config(train__num_devices=1, train__num_steps=300)
  train.train_and_evaluate(config, half)
  resumed = train.train_and_evaluate(_config(train__num_devices=1), half)
  straight = train.train_and_evaluate(_config(train__num_devices=1), full)
  assert resumed["step"] == straight["step"] == 600
  exp = experiment_lib.Experiment(_config(train__num_devices=1))
  assert sorted(exp.checkpointer(half).all_steps())[-1] == 600
  # Sampling and shuffling are functions of (seed, step), so resuming changes nothing.
  jax.tree.map(np.testing.assert_array_equal, _final_params(half, exp).params,
               _final_params(full, exp).params)
  assert resumed["metrics"] == straight["metrics"]


def test_constant_rate_keeps_plain_adam_state():
  # Checkpoints of constant-rate runs hold optax.adam(float)'s state; a schedule would add a step
  # count to it, and those checkpoints could no longer be restored.
  params = {"w": np.zeros((2, 3), np.float32)}
  expected = jax.tree.structure(optax.adam(1e-3).init(params))
  tx = optim.create_optimizer(_config().train, num_steps=10)
  assert jax.tree.structure(tx.init(params)) == expected


def test_resume_with_other_optimizer_names_the_setting(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(train__num_devices=1, train__num_steps=2), workdir)
  config = _config(train__num_devices=1, train__num_steps=4, train__lr_schedule="cosine")
  with pytest.raises(ValueError, match=r"step 2 under .* does not fit") as error:
    train.train_and_evaluate(config, workdir)
  assert "config.train.lr_schedule: 'constant' -> 'cosine'" in str(error.value)
  assert "config.train.num_steps: 2 -> 4" in str(error.value)


def _main(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "hashgnn_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_a_checkpoint_and_the_rerun_equals_a_straight_run(tmp_path, signum):
  workdir = tmp_path / "stopped"
  args = ("--config=configs/test.py", "--config.train.num_devices=1",
          "--config.checkpoint.every_steps=10000")  # Only the stop and the end save.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.Popen([sys.executable, "-m", "hashgnn_jax.main", *args,
                              f"--workdir={workdir}"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in process.stderr:  # Once training is under way, ask it to stop.
    if "step 100/600" in line:
      process.send_signal(signum)
      break
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-2000:]
  assert "rerun the same command to resume" in stdout
  exp = experiment_lib.Experiment(_config(train__num_devices=1))
  stop_step = max(exp.checkpointer(str(workdir)).all_steps())  # (Orbax also kept step 1.)
  assert 100 <= stop_step < 600
  assert f"at step {stop_step} of 600" in stdout
  assert not (workdir / "eval_results.json").exists()  # Stopped before evaluating.
  # Rerunning resumes; sampling is a function of (seed, step), so it ends where a straight run
  # does.
  resumed = train.train_and_evaluate(_config(train__num_devices=1), str(workdir))
  straight_dir = str(tmp_path / "straight")
  straight = train.train_and_evaluate(_config(train__num_devices=1), straight_dir)
  jax.tree.map(np.testing.assert_array_equal, _final_params(str(workdir), exp).params,
               _final_params(straight_dir, exp).params)
  assert resumed["metrics"] == straight["metrics"]


def test_cli_rejects_unknown_key_and_bad_type(tmp_path):
  result = _main("--config=configs/test.py", f"--workdir={tmp_path}", "--config.train.bogus=1")
  assert result.returncode != 0
  assert "bogus" in result.stderr
  result = _main("--config=configs/test.py", f"--workdir={tmp_path}",
                 "--config.train.batch_size=big")
  assert result.returncode != 0
  assert "batch_size" in result.stderr


def test_cli_alibaba_names_missing_data_path(tmp_path):
  result = _main("--config=configs/alibaba.py", f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert "config.data.path" in result.stderr


def test_invalid_config_values_name_the_key():
  config = _config()
  config.model.aggregator = "max"
  with pytest.raises(ValueError, match=r"config\.model\.aggregator='max'"):
    experiment_lib.Experiment(config)
  config = _config()
  config.model.hidden_dims = (8,)
  with pytest.raises(ValueError, match=r"config\.model\.hidden_dims"):
    experiment_lib.Experiment(config)
  config = _config(model__aggregator="lightgcn")  # Widths (32, 16) on a 16-wide embedding.
  with pytest.raises(ValueError, match=r"config\.model\.hidden_dims=\(32, 16\): lightgcn .*"
                     r"expected \(16, 16\)"):
    experiment_lib.Experiment(config)
  config = _config(sampler__trim_sets="yes")
  with pytest.raises(ValueError, match=r"config\.sampler\.trim_sets='yes'"):
    experiment_lib.Experiment(config)
  with pytest.raises(ValueError, match=r"config\.loss\.inbatch_negatives=9: expected "
                                       r"0\.\.config\.sampler\.num_negatives=5"):
    experiment_lib.Experiment(_config(loss__inbatch_weight=1.0, loss__inbatch_negatives=9,
                                      sampler__num_negatives=5))
  with pytest.raises(ValueError, match=r"config\.loss\.inbatch_negatives=1 needs "
                                       r"config\.loss\.inbatch_weight"):
    experiment_lib.Experiment(_config(loss__inbatch_weight=0.0, loss__inbatch_negatives=1))
  with pytest.raises(ValueError, match=r"config\.train\.embedding_weight_decay needs .*rowwise"):
    experiment_lib.Experiment(_config(train__embedding_weight_decay=0.1,
                                      train__embedding_update="dense"))
  with pytest.raises(ValueError, match=r"config\.sampler\.mode='full' .*needs "
                                       r"config\.train\.embedding_update='dense'"):
    experiment_lib.Experiment(_config(sampler__mode="full"))
  for key, value in (("lr_schedule", "step"), ("lr_end_fraction", 1.5), ("warmup_steps", -1),
                     ("embedding_weight_decay", -0.1)):
    config = _config()
    config.train[key] = value
    with pytest.raises(ValueError, match=rf"config\.train\.{key}="):
      experiment_lib.Experiment(config)


def test_checkpoint_restore_missing_dir(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=1, max_to_keep=1)
  with pytest.raises(FileNotFoundError, match="No checkpoint found"):
    ckpt.restore({})
  ckpt.close()


def test_validation_selects_best_checkpoint_for_test(tmp_path):
  config = _config(train__num_devices=2, data__valid_fraction=0.1, eval__every_steps=200)
  workdir = str(tmp_path)
  record = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    valid = [r for r in map(json.loads, f) if r["split"] == "valid"]
  assert [r["step"] for r in valid] == [200, 400, 600]
  scores = [r["metrics"]["hierarchical"]["hr@50"] for r in valid]
  assert record["split"] == "test" and record["checkpoint"] == "best"
  assert record["step"] == valid[int(np.argmax(scores))]["step"]
  again = experiment_lib.evaluate_checkpoint(config, workdir, which="best")
  assert again["step"] == record["step"] and again["metrics"] == record["metrics"]
  # Both protocols are recorded; the paper one ranks known items too, so it differs.
  assert set(record["by_protocol"]) == {"standard", "paper"}
  assert record["by_protocol"]["standard"] == record["metrics"]
  assert record["by_protocol"]["paper"] != record["metrics"]
