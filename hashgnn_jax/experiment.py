"""One configuration assembled: devices, data set, graph, model, optimizer and checkpointers.

Training (`train.loop`), evaluation of a checkpoint (`--mode=eval`) and export all start from an
`Experiment`, so they read the same data and build the same model; `restore_params` is the
checkpoint restore that evaluation and export share.
"""

import functools

from absl import logging

import jax
import ml_collections
import numpy as np

from hashgnn_jax import config_lib
from hashgnn_jax import distributed
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.data import loader
from hashgnn_jax.evaluation import evaluate as evaluate_lib
from hashgnn_jax.evaluation import reporting
from hashgnn_jax.model import encode
from hashgnn_jax.model import network as model_lib
from hashgnn_jax.train import checkpointing
from hashgnn_jax.train import optim
from hashgnn_jax.train import schedules
from hashgnn_jax.train import state as state_lib
from hashgnn_jax.train import step as step_lib
from hashgnn_jax.train import tables


def select_devices(train_config) -> list[jax.Device]:
  """The training devices: each process's first `train.num_devices` local ones (all if 0).

  In process order, so device i of the list holds examples [i·b, (i + 1)·b) of every global
  batch: N processes of D devices take the positions 1 process of N·D devices would.
  """
  per_process = jax.local_device_count()
  if train_config.num_devices > 0:
    if train_config.num_devices > per_process:
      raise ValueError(f"config.train.num_devices={train_config.num_devices} but only "
                       f"{per_process} local devices exist.")
    per_process = train_config.num_devices
  by_process = {}
  for device in jax.devices():
    by_process.setdefault(device.process_index, []).append(device)
  counts = {p: len(d) for p, d in by_process.items()}
  if min(counts.values()) < per_process:
    raise ValueError(f"Processes hold different numbers of devices ({counts}); "
                     f"config.train.num_devices={train_config.num_devices} needs {per_process} "
                     "on each.")
  return [d for p in sorted(by_process)
          for d in sorted(by_process[p], key=lambda d: d.id)[:per_process]]


class Experiment:
  """Data, graph, model and optimizer of one configuration, shared by train and eval modes."""

  def __init__(self, config: ml_collections.ConfigDict):
    config_lib.validate(config)
    self.config = config
    self.devices = select_devices(config.train)
    # This process's share of them: where it builds arrays and evaluates.
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.dataset = loader.load_dataset(config.data)
    self.graph = graph_lib.build_graph(self.dataset.train_users, self.dataset.train_items,
                                       self.dataset.num_users, self.dataset.num_items)
    self.per_epoch = schedules.steps_per_epoch(self.graph.num_edges, config.train.batch_size)
    # trainable "none" (LSH) trains nothing: the loop saves the initial state and evaluates it.
    self.num_steps = (0 if config.train.trainable == "none"
                      else schedules.total_steps(config.train, self.per_epoch))
    self.model = model_lib.create_model(config.model, self.dataset.num_users,
                                        self.dataset.num_items, config.hash, config.loss)
    self.tx = optim.create_optimizer(config.train, self.num_steps)
    root = jax.random.PRNGKey(config.seed)
    self.init_rng, self.order_rng, self.step_rng = jax.random.split(root, 3)
    # The sharded layout's owners of the table's rows (None: replicated).
    self.row_sharding = (tables.RowSharding(tuple(self.devices), self.model.num_nodes)
                         if config.train.embedding_layout == "sharded" else None)

  def initial_state(self) -> state_lib.TrainState:
    """Fresh parameters, or `train.init_from`'s run's (see `state.with_trained`)."""
    with jax.default_device(self.local_devices[0]):
      state = state_lib.create_train_state(self.model, self.tx, self.init_rng,
                                           self.config.train.embedding_update, self.row_sharding)
      source = self.config.train.init_from
      if not source:
        return state
      trained, which, step = checkpointing.trained_params(source)
      # A run that trains only the hash layer (HashGNN_sp) learns a fresh one.
      fresh = self.config.train.trainable == "hash"
      params = state_lib.with_trained(self.whole_params(state.params), trained, source=source,
                                      fresh_hash_layer=fresh)
      if self.row_sharding is not None:
        table, dense = state_lib.split_embedding(params)
        params = state_lib.join_embedding(self.row_sharding.split(table), dense)
      logging.info("Parameters from %s (%s checkpoint, step %d)%s.", source, which, step,
                   ", a fresh hash layer" if fresh else "")
      return state.replace(params=params)

  def abstract_state(self):
    """The train state's shapes as checkpoints hold them: the restore target's layout.

    Replicated over `devices`, except in the sharded layout the table and moments, saved as
    [n·L, E] split by rows (`tables.RowSharding.to_saved`).
    """
    shapes = jax.eval_shape(lambda: state_lib.create_train_state(self.model, self.tx, self.init_rng,
                                                       self.config.train.embedding_update))
    abstract = checkpointing.abstract_like(shapes, self.replicated)
    rows = self.row_sharding
    if rows is None:
      return abstract
    return state_lib.map_tables(
        lambda x: jax.ShapeDtypeStruct(rows.saved_shape(x.shape[1]), x.dtype,
                                       sharding=rows.sharding), abstract)

  def whole_params(self, params):
    """params with a sharded table gathered whole onto the host (evaluation, export, init)."""
    if self.row_sharding is None:
      return params
    table, dense = state_lib.split_embedding(params)
    return state_lib.join_embedding(self.row_sharding.gather(table), dense)

  def encode(self, params) -> np.ndarray:
    """Continuous codes z [N, K] of every node, users first, from params in this experiment's
    layout: encoded on this process's devices from its copy of them (replicated), or by each
    owner from its block of the table (sharded; `encode.encode_nodes_sharded`)."""
    if self.row_sharding is None:
      return encode.encode_nodes(self.model, distributed.local_copy(params), self.graph,
                                 edge_chunk=self.config.eval.edge_chunk)
    return encode.encode_nodes_sharded(self.model, params, self.graph, self.row_sharding,
                                       edge_chunk=self.config.eval.edge_chunk)

  @functools.cached_property
  def replicated(self) -> jax.sharding.NamedSharding:
    """Every training device holding the whole array: the layout of state and graph."""
    return step_lib.replicated_sharding(self.devices)

  def checkpointer(self, workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(workdir, every_steps=self.config.checkpoint.every_steps,
                                      max_to_keep=self.config.checkpoint.max_to_keep,
                                      sharding=self.replicated, rows=self.row_sharding)

  def best_checkpointer(self, workdir: str) -> checkpointing.Checkpointer:
    """Keeps the checkpoint with the best validation `eval.best_metric`."""
    return checkpointing.Checkpointer(workdir, every_steps=1, max_to_keep=1,
                                      subdir="checkpoints_best", keep_best=True,
                                      sharding=self.replicated, rows=self.row_sharding)

  @property
  def has_validation(self) -> bool:
    return self.dataset.num_valid > 0

  def evaluate(self, params, step: int, split: str = "test") -> dict:
    """Evaluates on "valid" (training items known) or "test" (training + validation known)."""
    if split == "valid":
      users, items, known = self.dataset.valid_users, self.dataset.valid_items, self.graph
    elif split == "test":
      users, items = self.dataset.test_users, self.dataset.test_items
      known = self.known_at_test
    else:
      raise ValueError(f"Unknown split {split!r}; expected 'valid' or 'test'.")
    return evaluate_lib.evaluate(lambda: self.encode(params), self.graph, users, items,
                                 self.config.eval,
                                 step=step, split=split, known=known)

  @functools.cached_property
  def known_at_test(self) -> graph_lib.BipartiteGraph:
    """Training plus validation pairs: what a test ranking must not count as new."""
    if not self.has_validation:
      return self.graph
    d = self.dataset
    return graph_lib.build_graph(np.concatenate([d.train_users, d.valid_users]),
                                 np.concatenate([d.train_items, d.valid_items]),
                                 d.num_users, d.num_items)

  def selection_score(self, record: dict) -> float:
    """The value of `eval.best_metric` ("mode/metric") in a record's first protocol."""
    mode, name = self.config.eval.best_metric.split("/")
    try:
      return record["metrics"][mode][name]
    except KeyError:
      raise ValueError(f"config.eval.best_metric={self.config.eval.best_metric!r} names no "
                       f"metric; available modes {sorted(record['metrics'])}.") from None


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None, which: str = "latest") -> dict:
  """Restores a checkpoint and evaluates it on test without training.

  which="latest" takes `step` (latest if None) from WORKDIR/checkpoints; which="best" takes the
  best-by-validation checkpoint from WORKDIR/checkpoints_best.
  """
  exp = Experiment(config)
  params, step = restore_params(exp, workdir, step, which)
  record = exp.evaluate(params, step, "test")
  record["checkpoint"] = which
  if distributed.is_main():
    writer = reporting.MetricsWriter(workdir)
    writer.write_eval(record)
    writer.close()
  return record


def restore_params(exp: Experiment, workdir: str, step: int | None,
                   which: str) -> tuple[dict, int]:
  """(parameters in the experiment's layout, for `Experiment.encode`; step) of checkpoint
  `which` ("latest", at `step` if given, or "best").

  The optimizer state is dropped as soon as it is read: at Alibaba size its moments are 2.4 GB
  that encoding and scoring do not need.
  """
  if which not in ("latest", "best"):
    raise ValueError(f"Unknown checkpoint choice {which!r}; expected 'latest' or 'best'.")
  ckpt = exp.checkpointer(workdir) if which == "latest" else exp.best_checkpointer(workdir)
  if which == "best":
    step = ckpt.best_step()
    if step is None:
      raise FileNotFoundError(f"No best checkpoint under {ckpt.directory}: the run had no "
                              "validation split (config.data.valid_fraction) or no evaluation.")
  state = ckpt.restore(exp.abstract_state(), step, exp.config.to_dict())
  ckpt.close()
  return state.params, int(state.step)
