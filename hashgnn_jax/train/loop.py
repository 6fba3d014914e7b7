"""The training loop: resume, step, log, evaluate on validation, checkpoint, test the best."""

import functools
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from hashgnn_jax import distributed
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.evaluation import reporting
from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax.train import sampler
from hashgnn_jax.train import signals
from hashgnn_jax.train import step as step_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from WORKDIR/checkpoints if present), evaluates, returns the final record.

  A SIGTERM or SIGINT stops training after the step in flight, with a checkpoint at the step
  reached, and returns {"interrupted": signal name, "step", "num_steps"} without evaluating.
  With several processes, a signal to any of them stops all at the same step.
  """
  exp = experiment_lib.Experiment(config)
  devices = exp.devices
  logging.info("Devices: %d in all, %d of them here (%s); dataset: %s", len(devices),
               len(exp.local_devices), devices[0].platform, exp.dataset.summary())
  writer = reporting.MetricsWriter(workdir) if distributed.is_main() else None
  ckpt = exp.checkpointer(workdir)

  config_dict = config.to_dict()
  state = exp.initial_state()
  if ckpt.latest_step() is not None:
    state = ckpt.restore(exp.abstract_state(), config_dict=config_dict, set_aside_unreadable=True)
    logging.info("Resumed from step %d.", int(state.step))

  replicated = exp.replicated
  # A stop request rides in the step's mapped input, so the processes agree on it for free.
  inputs = {stop: step_lib.shard_inputs(devices, stop=stop) for stop in (False, True)}
  # The step returns state in this layout; giving it the same from the start keeps the first
  # call from tracing a second time.
  state = step_lib.place_state(state, devices, config.train.embedding_layout)
  graph = graph_lib.to_device(exp.graph, replicated)
  order_fn = jax.jit(functools.partial(sampler.epoch_order, num_edges=exp.graph.num_edges),
                     out_shardings=replicated)
  set_sizes, capacity = step_lib.fit_bounds(config, graph, devices)
  p_train_step = step_lib.make_stepper(exp.model, exp.tx, config, exp.per_epoch, devices,
                                       set_sizes, capacity)
  best = exp.best_checkpointer(workdir)

  def periodic_eval(state, step):
    """Validation (keeping the best) when the data has it; otherwise a look at test."""
    split = "valid" if exp.has_validation else "test"
    record = exp.evaluate(state.params, step, split)
    if split == "valid":
      best.save(step, state, config_dict, force=True, score=exp.selection_score(record))
    if writer:
      writer.write_eval(record)
    logging.info("\n%s", reporting.format_table(record))

  step = int(state.step)
  epoch, edge_order, metrics = None, None, None
  log_every = config.train.log_every_steps
  window_start, window_steps = time.perf_counter(), 0
  logging.info("Training steps %d..%d (%d per epoch, batch %d on %d devices).", step,
               exp.num_steps, exp.per_epoch, config.train.batch_size, len(devices))
  stopping = None  # The signal that stopped the run, as this process heard of it.
  with signals.StopOnSignal() as stop:
    while step < exp.num_steps and not stopping:
      if step // exp.per_epoch != epoch:
        epoch = step // exp.per_epoch
        edge_order = order_fn(exp.order_rng, epoch)
      previous = metrics
      state, metrics = p_train_step(state, graph, edge_order, exp.step_rng,
                                    inputs[bool(stop.requested)])
      # At most two steps in flight: with dozens queued, XLA's CPU runtime deadlocked in the
      # all-reduce of fake devices on 2 cores (BUILD_NOTES.md); one queued step keeps a GPU busy.
      jax.block_until_ready(previous)
      step += 1
      if previous is not None and float(previous["stop"]):
        # Some process asked before the step before this one; all of them read it here and
        # stop after the same step.
        stopping = stop.requested or "a signal to another process"
      window_steps += 1
      if step % log_every == 0 or step == exp.num_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "stop"}
        elapsed = time.perf_counter() - window_start
        scalars["steps_per_second"] = window_steps / max(elapsed, 1e-9)
        eta = (exp.num_steps - step) / scalars["steps_per_second"]
        logging.info("step %d/%d  loss %.4f (cross %.4f, rank %.4f)  p %.3f  %.1f steps/s  "
                     "ETA %.0fs", step, exp.num_steps, scalars["loss"], scalars["cross_loss"],
                     scalars["rank_loss"], scalars["guidance_p"], scalars["steps_per_second"], eta)
        if not np.isfinite(scalars["loss"]):
          raise FloatingPointError(f"Loss became {scalars['loss']} at step {step}.")
        if writer:
          writer.write_train(step, scalars)
        window_start, window_steps = time.perf_counter(), 0
      ckpt.save(step, state, config_dict)
      every_eval = config.eval.every_steps
      if every_eval > 0 and step % every_eval == 0 and step < exp.num_steps:
        periodic_eval(state, step)

  ckpt.save(step, state, config_dict, force=step not in ckpt.all_steps())
  ckpt.close()
  if stopping:
    best.close()
    if writer:
      writer.close()
    logging.warning("Stopped by %s at step %d of %d; checkpoint saved under %s. Rerun the same "
                    "command to resume.", stopping, step, exp.num_steps, ckpt.directory)
    return {"interrupted": stopping, "step": step, "num_steps": exp.num_steps}
  if not exp.has_validation:
    record = exp.evaluate(state.params, step, "test")
  else:
    # The final state competes for "best" too; the test split is scored on the winner only.
    if step not in best.all_steps():
      periodic_eval(state, step)
    best.wait()
    best_step = best.best_step()
    logging.info("Testing the best checkpoint by validation %s: step %d.",
                 config.eval.best_metric, best_step)
    # Free the training state and device graph first: at Alibaba size a second state (table and
    # both moments) is another 3.7 GB.
    del state, graph
    best_params = best.restore(exp.abstract_state(), best_step, config_dict).params
    record = exp.evaluate(best_params, best_step, "test")
    record["checkpoint"] = "best"
  best.close()
  if writer:
    writer.write_eval(record)
    writer.close()
  return record
