"""The training state: parameters, optimizer state and the sampler's scratch, and its creation."""

import flax
import jax
import jax.numpy as jnp
import optax

from hashgnn_jax import config_lib
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.model import network as model_lib
from hashgnn_jax.train import optim
from hashgnn_jax.train import tables


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps taken so far.
  params: flax.core.FrozenDict
  opt_state: optax.OptState
  # [num_nodes + 1] scratch of `graph_lib.unique_nodes`, all empty between steps; carried (and
  # donated) so de-duplication costs O(batch) rather than a fresh catalogue-sized array per step.
  node_marks: jax.Array



def split_embedding(params) -> tuple[jax.Array, dict]:
  """(the ID-embedding table [N, E], every other parameter)."""
  dense = {k: v for k, v in params.items() if k != "embedding"}
  return params["embedding"]["embedding"], dense


def join_embedding(table: jax.Array, dense: dict) -> dict:
  return {**dense, "embedding": {"embedding": table}}


# The leaves `map_tables` reaches, as paths of names into the state.
TABLE_PATHS = (("params", "embedding", "embedding"), ("opt_state", "rows", "mu"),
               ("opt_state", "rows", "nu"))


def map_tables(fn, state: TrainState) -> TrainState:
  """`state` with fn applied to the embedding table and both of its row-wise Adam moments: the
  leaves `train.embedding_layout` shards (`tables.RowSharding`)."""
  table, dense = split_embedding(state.params)
  rows = state.opt_state["rows"]
  return state.replace(params=join_embedding(fn(table), dense),
                       opt_state={**state.opt_state,
                                  "rows": rows.replace(mu=fn(rows.mu), nu=fn(rows.nu))})


def take_tables(state: TrainState) -> tuple[TrainState, tuple]:
  """(the state without its table and moments, (table, mu, nu))."""
  taken = []
  return map_tables(lambda x: taken.append(x), state), tuple(taken)


def put_tables(state: TrainState, arrays: tuple) -> TrainState:
  """`take_tables` undone: (table, mu, nu) put back into the state."""
  rest = iter(arrays)
  return map_tables(lambda _: next(rest), state)


def with_trained(params: dict, trained: dict, *, source: str, fresh_hash_layer: bool) -> dict:
  """`params` with every parameter taken from `trained`, the hash layers too unless
  `fresh_hash_layer` (they then keep their fresh initialisation).

  Raises ValueError naming the parameter where `trained` (another run's, read from `source`)
  lacks one or has another shape.
  """
  flat, restored = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(trained)
  merged = {}
  for path, value in flat.items():
    if fresh_hash_layer and path[0] in optim.HASH_LAYERS:
      merged[path] = value
      continue
    name = "/".join(path)
    if path not in restored:
      raise ValueError(f"config.train.init_from={source!r}: its run has no parameter {name}; "
                       "the two runs' encoders (model settings) differ.")
    if restored[path].shape != value.shape:
      raise ValueError(f"config.train.init_from={source!r}: parameter {name} has shape "
                       f"{restored[path].shape} there, {value.shape} here; the two runs' "
                       "model settings differ.")
    merged[path] = jnp.asarray(restored[path], value.dtype)
  return flax.traverse_util.unflatten_dict(merged)


def create_train_state(model: model_lib.HashGNN, tx: optax.GradientTransformation,
                       rng: jax.Array, embedding_update: str = "rowwise",
                       rows: tables.RowSharding | None = None) -> TrainState:
  """Initial parameters (from a one-node dummy tree) and optimizer state.

  With row-wise updates, `tx` optimises every parameter but the table, whose Adam moments live in
  an `optim.RowAdamState`; with dense updates `tx` optimises everything. With `rows` (the
  sharded layout) the table and moments come as [n, L, E] blocks on their owners; the moments
  are made there, never whole.
  """
  num_layers = len(model.hidden_dims)
  dummy = graph_lib.sampled_tree_graph(
      jnp.zeros((1 + num_layers,), jnp.int32),
      jnp.zeros((num_layers,), bool), 1, (1,) * num_layers)
  params = model.init(rng, dummy, 1, (1,) * num_layers,
                      degrees=jnp.ones((1 + num_layers,)))["params"]
  if embedding_update == "dense":
    opt_state = tx.init(params)
  elif embedding_update == "rowwise":
    table, dense = split_embedding(params)
    if rows is None:
      opt_state = {"dense": tx.init(dense), "rows": optim.row_adam_init(table)}
    else:
      blocks = rows.split(table)
      del table, params  # The whole table: 2.6 GB at 10M rows of 64.
      zeros = lambda: rows.zeros(blocks.shape[-1], blocks.dtype)
      params = join_embedding(blocks, dense)
      opt_state = {"dense": tx.init(dense),
                   "rows": optim.RowAdamState(count=jnp.zeros((), jnp.int32), mu=zeros(),
                                              nu=zeros())}
  else:
    raise ValueError(f"config.train.embedding_update={embedding_update!r} is not one of "
                     f"{config_lib.EMBEDDING_UPDATES}.")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    node_marks=graph_lib.empty_marks(model.num_nodes))
