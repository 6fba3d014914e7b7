"""The pmapped train step: sample a batch on the device, encode, and update, all in one jit.

`make_stepper` wraps it with the trimmed-set fallback the training loop calls.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.model import losses
from hashgnn_jax.model import network as model_lib
from hashgnn_jax.train import optim
from hashgnn_jax.train import sampler
from hashgnn_jax.train import schedules
from hashgnn_jax.train import state as state_lib
from hashgnn_jax.train import tables

AXIS = "batch"



def local_batch_size(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> int:
  """Each device's share of `config.train.batch_size`, which the devices must divide."""
  batch_size, num_devices = config.train.batch_size, len(devices)
  if batch_size % num_devices:
    raise ValueError(f"config.train.batch_size={batch_size} must be divisible by the number of "
                     f"devices ({num_devices}).")
  return batch_size // num_devices


def make_train_step(model: model_lib.HashGNN, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, per_epoch: int,
                    devices: list[jax.Device], set_sizes: tuple[int, ...] | None = None,
                    capacity: int | None = None):
  """The pmapped step: (state, graph, edge_order, rng, shard_inputs) -> (state, metrics).

  state, graph, edge_order and rng go in unreplicated (in_axes None); shard_inputs [n, 2], a
  device-resident (shard id, stop request) per device (`shard_inputs`), is the one mapped input.
  State and metrics come back unreplicated; metrics["stop"] is 1 where any device's process asked
  to stop, so every process reads the same answer (`train.loop`).
  set_sizes ("node" mode, `sampler.fit_set_sizes`) bounds the node sets; a step whose sample does
  not fit them on some device changes nothing and reports metrics["trimmed"] = 0 (`make_stepper`
  then runs it untrimmed). capacity (the sharded layout, `fit_request_capacity`) bounds the
  lists of rows each device asks of each owner the same way (None: lists that cannot overflow).
  """
  batch_size = config.train.batch_size
  local = local_batch_size(config, devices)
  fanouts = tuple(config.sampler.fanouts)
  num_negatives = config.sampler.num_negatives
  num_targets = local * (2 + num_negatives)
  width = model.hash_bits if config.guidance.granularity == "element" else 1
  share = config.guidance.share_positive_draw and config.guidance.granularity == "node"
  schedule = schedules.create_guidance_schedule(config.guidance, per_epoch)
  method = config.hash.method
  beta = schedules.create_beta_schedule(config.hash)
  tau = schedules.create_temperature_schedule(config.hash)
  update_table = config.train.trainable == "all"
  inbatch = bool(config.loss.inbatch_weight)
  mixed = config.loss.inbatch_negatives  # m: uniform negatives per example in the softmax.

  node_mode = config.sampler.mode == "node"
  full_graph = config.sampler.mode == "full"  # Needs dense updates (config_lib.validate).
  rowwise = config.train.embedding_update == "rowwise"
  # The sharded layout: each device's block of the table and moments, [L, E] inside the step.
  sharded = config.train.embedding_layout == "sharded"
  bounded = set_sizes is not None or capacity is not None
  learning_rate = schedules.create_learning_rate(
      config.train, schedules.total_steps(config.train, per_epoch))

  def sample(graph, edge_ids, keys, sample_key, marks):
    """The batch's sample and the embedding rows it reads: (sample, ids [S], valid [S], marks).
    "full" mode's sample is its targets alone, [b·(2+T)] node ids."""
    if full_graph:
      return sampler.batch_targets(graph, edge_ids, keys, num_negatives), None, None, marks
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

  # HashNet and Gumbel codes are made from the logits a; the others from the model's own z.
  from_logits = method in ("continuation", "gumbel")

  def sampled_nodes(batch):
    """The sample's node ids: node mode's deepest set, or tree mode's trees, whose first
    b·(2+T) entries are the targets."""
    if node_mode:
      return batch.nodes
    return (batch[0] if rowwise else batch).nodes  # Row-wise tree batches are (trees, slots).

  def target_ids(batch):
    """The targets' node ids [b·(2+T)], in the `sampler` layout."""
    if full_graph:
      return batch
    nodes = sampled_nodes(batch)
    return nodes[batch.targets] if node_mode else nodes[:num_targets]

  def sample_degrees(graph, batch):
    """The sampled nodes' degrees in the graph, which lightgcn's layers read (None otherwise);
    "full" mode: every node's, [N], which every aggregator reads."""
    if full_graph:
      return jnp.diff(graph.indptr)
    if not model.lightgcn_layers:
      return None
    return graph_lib.node_degrees(graph, sampled_nodes(batch))

  def codes(params, batch, rows, degrees, edges):
    """z (or a) [b·(2+T), K] of the batch's targets; rows [S, E] are the touched rows, edges the
    graph's (senders, receivers) in "full" mode."""
    if full_graph:
      return model.apply({"params": params}, *edges, degrees, batch,
                         logits=from_logits, method=model_lib.HashGNN.encode_graph)
    if node_mode:
      return model.apply({"params": params}, batch, rows, logits=from_logits, degrees=degrees,
                         method=model_lib.HashGNN.encode_blocks)
    if rows is None:
      return model.apply({"params": params}, batch, num_targets, fanouts, logits=from_logits,
                         degrees=degrees)
    trees, slots = batch
    return model.apply({"params": params}, trees, num_targets, fanouts, rows[slots],
                       logits=from_logits, degrees=degrees)

  def training_codes(out, step, keep, guide_key, within):
    """(the codes the scores read, z behind them), both [b·(2+T), K], from `codes`' output by
    `config.hash.method`."""
    if method == "continuation":
      return model_lib.continuation_codes(out, beta(step)), jnp.tanh(out)
    if method == "gumbel":
      # Drawn per (example, target, bit) like the guidance mask, so the device count does not
      # change them; centred in their 2**-24 bins, so log(u) and log(1 - u) stay finite.
      noise_seed = jax.random.bits(jax.random.fold_in(guide_key, 1), (), jnp.uint32)
      uniform = sampler.target_uniforms(noise_seed, within, num_negatives=num_negatives,
                                        width=model.hash_bits) + 2.0**-25
      return model_lib.gumbel_codes(out, uniform, tau(step)), jnp.tanh(out)
    if method == "identity":
      return out, out  # z = u: trained as it is served.
    return model_lib.guided_codes(out, keep), out  # z mixed with its STE sign (p = 1: z).

  def train_step(state, graph, edge_order, rng, shard_input):
    shard_id, stop = shard_input[0], shard_input[1]
    within = shard_id * local + jnp.arange(local, dtype=jnp.int32)  # Position in global batch.
    batch_start = (state.step % per_epoch) * batch_size  # Of the global batch in the epoch.
    edge_ids = edge_order[batch_start + within]
    sample_key, guide_key = jax.random.split(jax.random.fold_in(rng, state.step))
    batch, row_ids, row_valid, marks = sample(
        graph, edge_ids, sampler.example_keys(sample_key, within), sample_key, state.node_marks)
    degrees = sample_degrees(graph, batch)
    edges = (graph.indices, graph_lib.edge_receivers(graph)) if full_graph else None
    p = schedule(state.step)
    collides = log_q = None
    if inbatch:
      # Every device reads the whole global batch's positive items (cheap: B ids).
      _, items = sampler.edge_endpoints(
          graph, edge_order[batch_start + jnp.arange(batch_size, dtype=jnp.int32)])  # [B]
      own = items[within]  # [b]
      collides = ((own[:, None] == items[None, :])
                  & (within[:, None] != jnp.arange(batch_size)[None, :]))  # [b, B]
      degrees_q = graph_lib.node_degrees(graph, items).astype(jnp.float32)  # [B]
      if not mixed:
        log_q = jnp.log(degrees_q)
      else:
        # The sample's own negatives: each example's first m, every device's, in global-batch
        # order.
        own_negatives = target_ids(batch)[2 * local:].reshape(local, num_negatives)[:, :mixed]
        negatives = jax.lax.all_gather(own_negatives.reshape(-1), AXIS, tiled=True)  # [B·m]
        collides = jnp.concatenate([collides, own[:, None] == negatives[None, :]], axis=1)
        # Expected count of each candidate's item in the mixed set, over B: B positives drawn
        # by degree (d / E) and B·m uniformly over the I items (m / I).
        num_edges = graph.indptr[graph.num_users].astype(jnp.float32)
        degrees_q = jnp.concatenate(
            [degrees_q, graph_lib.node_degrees(graph, negatives).astype(jnp.float32)])
        log_q = jnp.log(degrees_q / num_edges + mixed / graph.num_items)  # [B + B·m]
    keep = sampler.draw_keep_continuous(jax.random.bits(guide_key, (), jnp.uint32), within, p,
                                        num_negatives=num_negatives, width=width,
                                        share_positive=share)

    def loss_fn(params, rows=None):
      h, z = training_codes(codes(params, batch, rows, degrees, edges), state.step, keep, guide_key,
                            within)
      temperature = None
      if model.learned_temperature > 0:
        temperature = model.apply({"params": params}, method=model_lib.HashGNN.temperature)
      batch_items = None
      if inbatch:
        gather = functools.partial(gather_candidates, num_examples=local,
                                   num_negatives=num_negatives, mixed=mixed)
        batch_items = losses.BatchItems(gather(h), within[0], collides, log_q,
                                        gather(z) if config.loss.binary_weight else None)
      loss, parts = losses.hashgnn_loss(h, local, config.loss, model.hash_bits, z, temperature,
                                        batch_items, lambda x: jax.lax.pmean(x, AXIS))
      if temperature is not None:
        parts["temperature"] = temperature
      return loss, parts

    fits = batch.complete if set_sizes is not None else True
    if rowwise:
      table, dense = state_lib.split_embedding(state.params)  # sharded: this device's block
      if sharded:
        # Lists of S (or L) ids, every one of them on one owner at worst, cannot overflow.
        lists = min(capacity or row_ids.shape[0], row_ids.shape[0], table.shape[0])
        rows, requests, rows_fit = tables.lookup(table, row_ids, row_valid, AXIS, lists)
        fits = rows_fit & fits  # rows [S, E]
    # False when some device's sample overflowed set_sizes or a list of requests its capacity:
    # the step then updates nothing.
    complete = True
    if bounded:
      complete = jax.lax.psum(jnp.logical_not(fits).astype(jnp.int32), AXIS) == 0
    if rowwise:
      if not sharded:
        # Padding slots read row 0, reach no target, and get no update (their ids lie past the
        # table, which the update drops).
        rows = table.at[jnp.where(row_valid, row_ids, 0)].get(mode="promise_in_bounds")
        row_ids = jnp.where(row_valid & complete, row_ids, graph.num_nodes)
      (grads, row_grads), metrics = jax.grad(
          lambda d, r: loss_fn(state_lib.join_embedding(table, d), r), argnums=(0, 1),
          has_aux=True)(dense, rows)
      if sharded:
        # `complete` is the same on every device, so owners may drop a trimmed step's requests.
        block_rows = table.shape[0]
        requests = requests._replace(asked=jnp.where(complete, requests.asked, block_rows))
        row_ids, row_grads, marks = tables.owned_gradients(requests, row_grads, block_rows,
                                                           marks, AXIS)
      else:
        row_ids, row_grads, marks = optim.combine_row_grads(row_ids, row_grads, marks, AXIS)
      if update_table:
        table, rows_state = optim.row_adam_update(
            table, state.opt_state["rows"], row_ids, row_grads, learning_rate=learning_rate,
            weight_decay=config.train.embedding_weight_decay)
      else:  # A frozen encoder: the table and its moments stay as they are.
        rows_state = state.opt_state["rows"]
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
    if bounded:
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
      params = state_lib.join_embedding(table, params)
      opt_state = {"dense": dense_state, "rows": rows_state}
    else:
      opt_state = dense_state
    metrics["guidance_p"] = jnp.asarray(p, jnp.float32)
    metrics["stop"] = (jax.lax.psum(stop, AXIS) > 0).astype(jnp.float32)
    return state.replace(step=state.step + jnp.asarray(complete, jnp.int32), params=params,
                         opt_state=opt_state, node_marks=marks), metrics

  # Donating the state lets XLA update the table and its moments in place: without it, each step
  # copies them whole, which at Alibaba size costs more than the batch's own work.
  if not sharded:
    return jax.pmap(train_step, axis_name=AXIS, in_axes=(None, None, None, None, 0),
                    out_axes=(None, None), devices=devices, donate_argnums=(0,))
  # The table and moments, [n, L, E] each, map over their first axis; they travel apart from
  # the rest of the state, so that in_axes and out_axes stay flat tuples (a dict in them is
  # unhashable, which pmap's multi-process path needs).
  def split_step(rest, blocks, *args):
    state, metrics = train_step(state_lib.put_tables(rest, blocks), *args)
    return (*state_lib.take_tables(state), metrics)

  mapped = jax.pmap(split_step, axis_name=AXIS, in_axes=(None, 0, None, None, None, 0),
                    out_axes=(None, 0, None), devices=devices, donate_argnums=(0, 1))

  def sharded_step(state, *args):
    rest, blocks, metrics = mapped(*state_lib.take_tables(state), *args)
    return state_lib.put_tables(rest, blocks), metrics

  return sharded_step


def gather_candidates(codes: jax.Array, num_examples: int, num_negatives: int, mixed: int,
                      axis_name: str = AXIS) -> jax.Array:
  """The in-batch softmax's candidates from every device's targets: [B (+ B·m), K].

  codes [b·(2+T), K] are this device's targets (`sampler` layout). Rows come in global-batch
  order: every device's positives, then (mixed = m > 0) every device's examples' first m
  negatives, example-major. Differentiable: all_gather's transpose sums each device's share of
  the cotangent back.
  """
  b, width = num_examples, codes.shape[-1]
  rows = codes[b:2 * b]
  if mixed:
    negatives = codes[2 * b:].reshape(b, num_negatives, width)[:, :mixed]
    rows = jnp.concatenate([rows, negatives.reshape(b * mixed, width)])
  gathered = jax.lax.all_gather(rows, axis_name)  # [n, b (+ b·m), K]
  return jnp.concatenate([gathered[:, :b].reshape(-1, width),
                          gathered[:, b:].reshape(-1, width)])


def fit_bounds(config: ml_collections.ConfigDict, graph: graph_lib.DeviceGraph,
               devices: list[jax.Device]) -> tuple[tuple[int, ...] | None, int | None]:
  """(set_sizes, capacity) for `make_stepper`, both fitted on one draw of sampled batches."""
  draw = _fit_draw(config, graph, devices)
  set_sizes = fit_set_sizes(config, graph, devices, draw)
  return set_sizes, fit_request_capacity(config, graph, devices, set_sizes, draw)


def _fit_draw(config: ml_collections.ConfigDict, graph: graph_lib.DeviceGraph,
              devices: list[jax.Device]):
  """`sampler.fit_samples` of this run's local batches, drawn on the first call only."""
  return functools.cache(functools.partial(
      sampler.fit_samples, graph, local_batch_size(config, devices),
      fanouts=tuple(config.sampler.fanouts), num_negatives=config.sampler.num_negatives,
      seed=config.seed))


def fit_set_sizes(config: ml_collections.ConfigDict, graph: graph_lib.DeviceGraph,
                  devices: list[jax.Device], draw=None) -> tuple[int, ...] | None:
  """`make_train_step`'s set_sizes for `config.sampler.trim_sets` (None: untrimmed), logged.
  draw: `fit_bounds`' shared `sampler.fit_samples`."""
  trim = config.sampler.trim_sets
  if trim == "auto":
    trim = "always" if devices[0].platform == "cpu" else "never"
  if config.sampler.mode != "node" or trim == "never":
    return None
  sizes = sampler.fit_set_sizes(graph, local_batch_size(config, devices),
                                fanouts=tuple(config.sampler.fanouts),
                                num_negatives=config.sampler.num_negatives, seed=config.seed,
                                draw=draw or _fit_draw(config, graph, devices))
  logging.info("Node sets per device trimmed to %s slots.", sizes or "(none: sets near full)")
  return sizes


def fit_request_capacity(config: ml_collections.ConfigDict, graph: graph_lib.DeviceGraph,
                         devices: list[jax.Device], set_sizes: tuple[int, ...] | None,
                         draw=None) -> int | None:
  """`make_train_step`'s capacity for `config.train.request_capacity` (None: full lists),
  logged. Fitted in "node" mode of the sharded layout only, where it is below a full list."""
  if (config.train.embedding_layout != "sharded" or config.train.request_capacity == "full"
      or config.sampler.mode != "node"):
    return None
  local, fanouts = local_batch_size(config, devices), tuple(config.sampler.fanouts)
  num_negatives, num_devices = config.sampler.num_negatives, len(devices)
  rows_per_device = -(-graph.num_nodes // num_devices)
  samples = (draw or _fit_draw(config, graph, devices))()
  capacity = tables.fit_capacity(samples, rows_per_device, num_devices)
  reads = set_sizes[-1] if set_sizes else sampler.untrimmed_rows(
      local, fanouts=fanouts, num_negatives=num_negatives, num_nodes=graph.num_nodes)
  full = min(reads, rows_per_device)
  if capacity >= full:
    logging.info("Requests to each owner: full lists of %d ids (a fitted list saves none).", full)
    return None
  logging.info("Requests to each owner: lists of %d ids (full: %d).", capacity, full)
  return capacity


def make_stepper(model: model_lib.HashGNN, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, per_epoch: int, devices: list[jax.Device],
                 set_sizes: tuple[int, ...] | None, capacity: int | None = None):
  """The step the train loop calls: `make_train_step`'s, on trimmed sets and fitted request
  lists where a batch fits them.

  With either bound, each step runs bounded and the host reads whether it fitted (so it waits
  for every step); a step that did not is run again without bounds, a second step function
  compiled on first use. metrics["trimmed"] says which one ran.
  """
  unbounded = make_train_step(model, tx, config, per_epoch, devices)
  if set_sizes is None and capacity is None:
    return unbounded
  bounded = make_train_step(model, tx, config, per_epoch, devices, set_sizes, capacity)

  def step(state, graph, edge_order, rng, shard_inputs):
    state, metrics = bounded(state, graph, edge_order, rng, shard_inputs)
    if float(metrics["trimmed"]):
      return state, metrics
    logging.info("Step %d: a sample overflowed the trimmed node sets or request lists; ran "
                 "without them.", int(state.step))
    state, metrics = unbounded(state, graph, edge_order, rng, shard_inputs)
    metrics["trimmed"] = jnp.zeros((), jnp.float32)
    return state, metrics

  return step


def replicated_sharding(devices: list[jax.Device]) -> jax.sharding.NamedSharding:
  """Every one of `devices` (those of all processes) holding the whole array."""
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def place_state(state: state_lib.TrainState, devices: list[jax.Device],
                layout: str = "replicated") -> state_lib.TrainState:
  """The state as the step takes it: replicated over `devices`, except the table and moments of
  the sharded layout, which stay the [n, L, E] blocks that `state_lib.create_train_state` or a
  restore made on their owners.

  Through the host where other processes hold some of the devices: an array on one device is
  not placed across processes.
  """
  blocks = ()
  if layout == "sharded":
    state, blocks = state_lib.take_tables(state)
  state = jax.device_put(state if jax.process_count() == 1 else jax.device_get(state),
                         replicated_sharding(devices))
  return state_lib.put_tables(state, blocks) if layout == "sharded" else state


def device_layout(devices: list[jax.Device]) -> tuple[jax.sharding.Sharding, jax.Array]:
  """The replicated sharding over `devices`, and the step's mapped input with no stop request."""
  return replicated_sharding(devices), shard_inputs(devices, stop=False)


def shard_inputs(devices: list[jax.Device], *, stop: bool) -> jax.Array:
  """The step's mapped input: (shard id, stop request) per device, int32 [n, 2].

  Device i of `devices` gets id i; each process places only its own devices' rows.
  """
  rows = np.stack([np.arange(len(devices)), np.full(len(devices), int(stop))], 1).astype(np.int32)
  mesh = replicated_sharding(devices).mesh
  return jax.device_put(rows, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)))
