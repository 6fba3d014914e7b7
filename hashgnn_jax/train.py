"""Training and evaluation loop: one pmapped step that samples, encodes, and updates."""

import functools
import time

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hashgnn_jax import checkpointing
from hashgnn_jax import config_lib
from hashgnn_jax import data as data_lib
from hashgnn_jax import evaluate as evaluate_lib
from hashgnn_jax import graph as graph_lib
from hashgnn_jax import losses
from hashgnn_jax import model as model_lib
from hashgnn_jax import optim
from hashgnn_jax import reporting
from hashgnn_jax import sampler

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps taken so far.
  params: flax.core.FrozenDict
  opt_state: optax.OptState
  # [num_nodes + 1] scratch of `graph_lib.unique_nodes`, all empty between steps; carried (and
  # donated) so de-duplication costs O(batch) rather than a fresh catalogue-sized array per step.
  node_marks: jax.Array


def steps_per_epoch(num_edges: int, batch_size: int) -> int:
  """Full batches in one pass over the training edges; the remainder waits for the next epoch."""
  if batch_size > num_edges:
    raise ValueError(f"config.train.batch_size={batch_size} exceeds the {num_edges} training "
                     "edges; lower it.")
  return num_edges // batch_size


def total_steps(train_config, per_epoch: int) -> int:
  if train_config.num_steps > 0:
    return int(train_config.num_steps)
  return max(1, int(round(train_config.num_epochs * per_epoch)))


def create_guidance_schedule(guidance_config, per_epoch: int) -> optax.Schedule:
  """p(step), the probability of keeping a continuous code bit (Q = 1)."""
  every = guidance_config.transition_steps
  if every <= 0:
    every = -every * per_epoch  # Negative: counted in epochs.
  every = max(int(every), 1)
  if guidance_config.schedule == "constant":
    return optax.constant_schedule(guidance_config.init)
  if guidance_config.schedule == "exponential":
    return optax.exponential_decay(
        init_value=guidance_config.init, transition_steps=every,
        decay_rate=guidance_config.decay_rate, staircase=True,
        end_value=guidance_config.floor)
  if guidance_config.schedule == "linear":
    init, decrement, floor = guidance_config.init, guidance_config.decrement, guidance_config.floor
    return lambda step: jnp.maximum(floor, init - decrement * (step // every))
  raise ValueError(f"config.guidance.schedule={guidance_config.schedule!r} is not one of "
                   f"{config_lib.SCHEDULES}.")


def create_learning_rate(train_config, num_steps: int) -> optax.Schedule:
  """lr(t) for the t-th update (t = 0 first), shared by optax Adam and the row-wise update."""
  peak, warmup = train_config.learning_rate, int(train_config.warmup_steps)
  if warmup >= num_steps:
    raise ValueError(f"config.train.warmup_steps={warmup} must be below the run's {num_steps} "
                     "steps.")
  if train_config.lr_schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(peak, num_steps - warmup,
                                               alpha=train_config.lr_end_fraction)
  elif train_config.lr_schedule == "constant":
    after_warmup = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.train.lr_schedule={train_config.lr_schedule!r} is not one of "
                     f"{config_lib.LR_SCHEDULES}.")
  if warmup == 0:
    return after_warmup
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup])


def create_optimizer(train_config, num_steps: int) -> optax.GradientTransformation:
  """Adam on the learning-rate schedule of a run of `num_steps` (the cosine's length)."""
  if train_config.lr_schedule == "constant" and train_config.warmup_steps == 0:
    # A float, not a schedule: optax then keeps no step count in Adam's state, so constant-rate
    # runs keep the checkpoint structure they had before schedules existed, and can resume.
    return optax.adam(train_config.learning_rate)
  return optax.adam(create_learning_rate(train_config, num_steps))


def split_embedding(params) -> tuple[jax.Array, dict]:
  """(the ID-embedding table [N, E], every other parameter)."""
  dense = {k: v for k, v in params.items() if k != "embedding"}
  return params["embedding"]["embedding"], dense


def join_embedding(table: jax.Array, dense: dict) -> dict:
  return {**dense, "embedding": {"embedding": table}}


def create_train_state(model: model_lib.HashGNN, tx: optax.GradientTransformation,
                       rng: jax.Array, embedding_update: str = "rowwise") -> TrainState:
  """Initial parameters (from a one-node dummy tree) and optimizer state.

  With row-wise updates, `tx` optimises every parameter but the table, whose Adam moments live in
  an `optim.RowAdamState`; with dense updates `tx` optimises everything.
  """
  num_layers = len(model.hidden_dims)
  dummy = graph_lib.sampled_tree_graph(
      jnp.zeros((1 + num_layers,), jnp.int32),
      jnp.zeros((num_layers,), bool), 1, (1,) * num_layers)
  params = model.init(rng, dummy, 1, (1,) * num_layers)["params"]
  if embedding_update == "dense":
    opt_state = tx.init(params)
  elif embedding_update == "rowwise":
    table, dense = split_embedding(params)
    opt_state = {"dense": tx.init(dense), "rows": optim.row_adam_init(table)}
  else:
    raise ValueError(f"config.train.embedding_update={embedding_update!r} is not one of "
                     f"{config_lib.EMBEDDING_UPDATES}.")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    node_marks=graph_lib.empty_marks(model.num_nodes))


def local_batch_size(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> int:
  """Each device's share of `config.train.batch_size`, which the devices must divide."""
  batch_size, num_devices = config.train.batch_size, len(devices)
  if batch_size % num_devices:
    raise ValueError(f"config.train.batch_size={batch_size} must be divisible by the number of "
                     f"devices ({num_devices}).")
  return batch_size // num_devices


def make_train_step(model: model_lib.HashGNN, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, per_epoch: int,
                    devices: list[jax.Device], set_sizes: tuple[int, ...] | None = None):
  """The pmapped step: (state, graph, edge_order, rng, shard_ids) -> (state, metrics).

  state, graph, edge_order and rng go in unreplicated (in_axes None); shard_ids, a device-resident
  arange over devices, is the one mapped input. State and metrics come back unreplicated.
  set_sizes ("node" mode, `sampler.fit_set_sizes`) bounds the node sets; a step whose sample does
  not fit them on some device changes nothing and reports metrics["trimmed"] = 0 (`make_stepper`
  then runs it untrimmed).
  """
  batch_size = config.train.batch_size
  local = local_batch_size(config, devices)
  fanouts = tuple(config.sampler.fanouts)
  num_negatives = config.sampler.num_negatives
  num_targets = local * (2 + num_negatives)
  width = model.hash_bits if config.guidance.granularity == "element" else 1
  share = config.guidance.share_positive_draw and config.guidance.granularity == "node"
  schedule = create_guidance_schedule(config.guidance, per_epoch)

  node_mode = config.sampler.mode == "node"
  rowwise = config.train.embedding_update == "rowwise"
  learning_rate = create_learning_rate(config.train, total_steps(config.train, per_epoch))

  def sample(graph, edge_ids, keys, sample_key, marks):
    """The batch's sample and the embedding rows it reads: (sample, ids [S], valid [S], marks)."""
    if node_mode:
      blocks, marks = sampler.sample_blocks(graph, edge_ids, keys, sample_key, marks,
                                            fanouts=fanouts, num_negatives=num_negatives,
                                            sizes=set_sizes)
      return blocks, blocks.nodes, blocks.valid, marks
    trees = sampler.sample_batch(graph, edge_ids, keys, fanouts=fanouts,
                                 num_negatives=num_negatives)
    if not rowwise:
      return trees, None, None, marks
    # The trees repeat nodes; differentiate each distinct row once.
    ids, valid, slots, marks = graph_lib.unique_nodes(
        trees.nodes, jnp.ones(trees.nodes.shape, bool),
        min(trees.nodes.shape[0], graph.num_nodes), marks)
    return (trees, slots), ids, valid, marks

  def codes(params, batch, rows):
    """z [b·(2+T), K] of the batch's targets; rows [S, E] are the touched rows (row-wise)."""
    if node_mode:
      return model.apply({"params": params}, batch, rows, method=model_lib.HashGNN.encode_blocks)
    if rows is None:
      return model.apply({"params": params}, batch, num_targets, fanouts)
    trees, slots = batch
    return model.apply({"params": params}, trees, num_targets, fanouts, rows[slots])

  def train_step(state, graph, edge_order, rng, shard_id):
    within = shard_id * local + jnp.arange(local, dtype=jnp.int32)  # Position in global batch.
    edge_ids = edge_order[(state.step % per_epoch) * batch_size + within]
    sample_key, guide_key = jax.random.split(jax.random.fold_in(rng, state.step))
    batch, row_ids, row_valid, marks = sample(
        graph, edge_ids, sampler.example_keys(sample_key, within), sample_key, state.node_marks)
    p = schedule(state.step)
    keep = sampler.draw_keep_continuous(jax.random.bits(guide_key, (), jnp.uint32), within, p,
                                        num_negatives=num_negatives, width=width,
                                        share_positive=share)

    def loss_fn(params, rows=None):
      z = codes(params, batch, rows)
      return losses.hashgnn_loss(model_lib.guided_codes(z, keep), local, config.loss,
                                 model.hash_bits)

    # False when some device's sample overflowed set_sizes: the step then updates nothing.
    complete = True
    if set_sizes is not None:
      complete = jax.lax.psum(jnp.logical_not(batch.complete).astype(jnp.int32), AXIS) == 0
    if rowwise:
      table, dense = split_embedding(state.params)
      # Padding slots read row 0, reach no target, and get no update (their ids lie past the
      # table, which the update drops).
      rows = table.at[jnp.where(row_valid, row_ids, 0)].get(mode="promise_in_bounds")  # [S, E]
      row_ids = jnp.where(row_valid & complete, row_ids, graph.num_nodes)
      (grads, row_grads), metrics = jax.grad(
          lambda d, r: loss_fn(join_embedding(table, d), r), argnums=(0, 1),
          has_aux=True)(dense, rows)
      row_ids, row_grads, marks = optim.combine_row_grads(row_ids, row_grads, marks, AXIS)
      table, rows_state = optim.row_adam_update(table, state.opt_state["rows"], row_ids,
                                                row_grads, learning_rate=learning_rate)
    else:
      dense = state.params
      grads, metrics = jax.grad(loss_fn, has_aux=True)(dense)
    # Each device's loss is a mean over its equal share, so the mean of gradients is the
    # gradient of the global-batch mean.
    grads = jax.lax.pmean(grads, AXIS)
    metrics = jax.lax.pmean(metrics, AXIS)
    dense_state = state.opt_state["dense"] if rowwise else state.opt_state
    updates, dense_state = tx.update(grads, dense_state, dense)
    params = optax.apply_updates(dense, updates)
    if set_sizes is not None:
      # Rows were kept from the update above; the rest is small, except in dense mode's table.
      keep_old = lambda new, old: jnp.where(complete, new, old)
      params = jax.tree.map(keep_old, params, dense)
      dense_state = jax.tree.map(keep_old, dense_state,
                                 state.opt_state["dense"] if rowwise else state.opt_state)
      if rowwise:
        rows_state = rows_state.replace(
            count=keep_old(rows_state.count, state.opt_state["rows"].count))
      metrics["trimmed"] = jnp.asarray(complete, jnp.float32)
    if rowwise:
      params = join_embedding(table, params)
      opt_state = {"dense": dense_state, "rows": rows_state}
    else:
      opt_state = dense_state
    metrics["guidance_p"] = jnp.asarray(p, jnp.float32)
    return state.replace(step=state.step + jnp.asarray(complete, jnp.int32), params=params,
                         opt_state=opt_state, node_marks=marks), metrics

  # Donating the state lets XLA update the table and its moments in place: without it, each step
  # copies them whole, which at Alibaba size costs more than the batch's own work.
  return jax.pmap(train_step, axis_name=AXIS, in_axes=(None, None, None, None, 0),
                  out_axes=(None, None), devices=devices, donate_argnums=(0,))


def fit_set_sizes(config: ml_collections.ConfigDict, graph: graph_lib.DeviceGraph,
                  devices: list[jax.Device]) -> tuple[int, ...] | None:
  """`make_train_step`'s set_sizes for `config.sampler.trim_sets` (None: untrimmed), logged."""
  trim = config.sampler.trim_sets
  if trim == "auto":
    trim = "always" if devices[0].platform == "cpu" else "never"
  if config.sampler.mode != "node" or trim == "never":
    return None
  sizes = sampler.fit_set_sizes(graph, local_batch_size(config, devices),
                                fanouts=tuple(config.sampler.fanouts),
                                num_negatives=config.sampler.num_negatives, seed=config.seed)
  logging.info("Node sets per device trimmed to %s slots.", sizes or "(none: sets near full)")
  return sizes


def make_stepper(model: model_lib.HashGNN, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, per_epoch: int, devices: list[jax.Device],
                 set_sizes: tuple[int, ...] | None):
  """The step the train loop calls: `make_train_step`'s, on trimmed sets where a batch fits them.

  With set_sizes, each step runs trimmed and the host reads whether it fitted (so it waits for
  every step); a step that did not is run again untrimmed, a second step function compiled on
  first use. metrics["trimmed"] says which one ran.
  """
  untrimmed = make_train_step(model, tx, config, per_epoch, devices)
  if set_sizes is None:
    return untrimmed
  trimmed = make_train_step(model, tx, config, per_epoch, devices, set_sizes)

  def step(state, graph, edge_order, rng, shard_ids):
    state, metrics = trimmed(state, graph, edge_order, rng, shard_ids)
    if float(metrics["trimmed"]):
      return state, metrics
    logging.info("Step %d: a sample overflowed the trimmed node sets; ran untrimmed.",
                 int(state.step))
    state, metrics = untrimmed(state, graph, edge_order, rng, shard_ids)
    metrics["trimmed"] = jnp.zeros((), jnp.float32)
    return state, metrics

  return step


def device_layout(devices: list[jax.Device]) -> tuple[jax.sharding.Sharding, jax.Array]:
  """The replicated sharding over `devices`, and the step's mapped input: shard ids [n]."""
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shard_ids = jax.device_put(np.arange(len(devices), dtype=np.int32),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)))
  return replicated, shard_ids


def select_devices(train_config) -> list[jax.Device]:
  devices = jax.local_devices()
  if train_config.num_devices > 0:
    if train_config.num_devices > len(devices):
      raise ValueError(f"config.train.num_devices={train_config.num_devices} but only "
                       f"{len(devices)} local devices exist.")
    devices = devices[:train_config.num_devices]
  return devices


class Experiment:
  """Data, graph, model and optimizer of one configuration, shared by train and eval modes."""

  def __init__(self, config: ml_collections.ConfigDict):
    config_lib.validate(config)
    self.config = config
    self.devices = select_devices(config.train)
    self.dataset = data_lib.load_dataset(config.data)
    self.graph = graph_lib.build_graph(self.dataset.train_users, self.dataset.train_items,
                                       self.dataset.num_users, self.dataset.num_items)
    self.per_epoch = steps_per_epoch(self.graph.num_edges, config.train.batch_size)
    self.num_steps = total_steps(config.train, self.per_epoch)
    self.model = model_lib.create_model(config.model, self.dataset.num_users,
                                        self.dataset.num_items)
    self.tx = create_optimizer(config.train, self.num_steps)
    root = jax.random.PRNGKey(config.seed)
    self.init_rng, self.order_rng, self.step_rng = jax.random.split(root, 3)

  def initial_state(self) -> TrainState:
    with jax.default_device(self.devices[0]):
      return create_train_state(self.model, self.tx, self.init_rng,
                                self.config.train.embedding_update)

  def abstract_state(self):
    shapes = jax.eval_shape(lambda: create_train_state(self.model, self.tx, self.init_rng,
                                                       self.config.train.embedding_update))
    return checkpointing.abstract_like(shapes, self.devices[0])

  def checkpointer(self, workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(workdir, every_steps=self.config.checkpoint.every_steps,
                                      max_to_keep=self.config.checkpoint.max_to_keep)

  def best_checkpointer(self, workdir: str) -> checkpointing.Checkpointer:
    """Keeps the checkpoint with the best validation `eval.best_metric`."""
    return checkpointing.Checkpointer(workdir, every_steps=1, max_to_keep=1,
                                      subdir="checkpoints_best", keep_best=True)

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
    return evaluate_lib.evaluate(self.model, params, self.graph, users, items, self.config.eval,
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from WORKDIR/checkpoints if present), evaluates, returns the final record."""
  exp = Experiment(config)
  devices = exp.devices
  logging.info("Devices: %d local (%s); dataset: %s", len(devices), devices[0].platform,
               exp.dataset.summary())
  is_main = jax.process_index() == 0
  writer = reporting.MetricsWriter(workdir) if is_main else None
  ckpt = exp.checkpointer(workdir)

  config_dict = config.to_dict()
  state = exp.initial_state()
  if ckpt.latest_step() is not None:
    state = ckpt.restore(exp.abstract_state(), config_dict=config_dict)
    logging.info("Resumed from step %d.", int(state.step))

  replicated, shard_ids = device_layout(devices)
  # The step returns state replicated over `devices`; giving it the same layout from the start
  # keeps the first call from tracing a second time.
  state = jax.device_put(state, replicated)
  graph = graph_lib.to_device(exp.graph, replicated)
  order_fn = jax.jit(functools.partial(sampler.epoch_order, num_edges=exp.graph.num_edges),
                     out_shardings=replicated)
  set_sizes = fit_set_sizes(config, graph, devices)
  p_train_step = make_stepper(exp.model, exp.tx, config, exp.per_epoch, devices, set_sizes)
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
  while step < exp.num_steps:
    if step // exp.per_epoch != epoch:
      epoch = step // exp.per_epoch
      edge_order = order_fn(exp.order_rng, epoch)
    previous = metrics
    state, metrics = p_train_step(state, graph, edge_order, exp.step_rng, shard_ids)
    # At most two steps in flight: with dozens queued, XLA's CPU runtime deadlocked in the
    # all-reduce of fake devices on 2 cores (BUILD_NOTES.md); one queued step keeps a GPU busy.
    jax.block_until_ready(previous)
    step += 1
    window_steps += 1
    if step % log_every == 0 or step == exp.num_steps:
      scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - window_start
      scalars["steps_per_second"] = window_steps / max(elapsed, 1e-9)
      eta = (exp.num_steps - step) / scalars["steps_per_second"]
      logging.info("step %d/%d  loss %.4f (cross %.4f, rank %.4f)  p %.3f  %.1f steps/s  ETA %.0fs",
                   step, exp.num_steps, scalars["loss"], scalars["cross_loss"],
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
  if jax.process_index() == 0:
    writer = reporting.MetricsWriter(workdir)
    writer.write_eval(record)
    writer.close()
  return record


def restore_params(exp: Experiment, workdir: str, step: int | None,
                   which: str) -> tuple[dict, int]:
  """(parameters, step) of checkpoint `which` ("latest", at `step` if given, or "best").

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
