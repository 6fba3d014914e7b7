"""Full-neighbour encoding against a NumPy forward pass, for any edge chunk size."""

import jax
import numpy as np
import pytest

from hashgnn_jax import config_lib
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.model import encode
from hashgnn_jax.model import network as model_lib
from hashgnn_jax.train import state as state_lib
from hashgnn_jax.train import tables


def _numpy_encode(params, graph, kind):
  """Two mean layers over all neighbours, then the hash layer, written out in NumPy."""
  act = lambda v: np.where(v > 0, v, 0.2 * v)
  x = np.asarray(params["embedding"]["embedding"], np.float64)
  for layer in range(2):
    dense = params[f"layers_{layer}"]["Dense_0"]
    out = []
    for v in range(graph.num_nodes):
      nbrs = graph.indices[graph.indptr[v]:graph.indptr[v + 1]]
      if kind == "gcn":
        h = (x[v] + x[nbrs].sum(0)) / (1 + len(nbrs))
      else:
        h = np.concatenate([x[v], x[nbrs].mean(0) if len(nbrs) else np.zeros_like(x[v])])
      out.append(h)
    x = act(np.stack(out) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]))
  return np.tanh(x @ np.asarray(params["user_hash"]["kernel"]) + params["user_hash"]["bias"])


def _random_graph(seed, num_users, num_items, draws=30):
  """(pairs [P, 2], graph) of up to `draws` distinct random (user, item) pairs, sorted."""
  rng = np.random.default_rng(seed)
  pairs = np.array(sorted({(int(rng.integers(num_users)), int(rng.integers(num_items)))
                           for _ in range(draws)}))
  return pairs, graph_lib.build_graph(pairs[:, 0], pairs[:, 1], num_users, num_items)


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_encode_matches_numpy_for_any_chunks(kind):
  num_users, num_items = 9, 7
  # Item 6 and user 8 may end up isolated: their mean over no neighbours must still work.
  _, graph = _random_graph(0, num_users, num_items)
  config = config_lib.default_config().model
  config.aggregator, config.embed_dim, config.hidden_dims, config.hash_bits = kind, 4, (5, 3), 6
  model = model_lib.create_model(config, num_users, num_items)
  tree = graph_lib.sampled_tree_graph(np.zeros(3, np.int32), np.ones(2, bool), 1, (1, 1))
  params = model.init(jax.random.PRNGKey(2), tree, 1, (1, 1))["params"]
  expected = _numpy_encode(params, graph, kind)
  for edge_chunk, row_chunk in ((1, 1), (7, 5), (10_000, 10_000)):
    z = encode.encode_nodes(model, params, graph, edge_chunk=edge_chunk, row_chunk=row_chunk)
    assert z.shape == (num_users + num_items, 6)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)


def test_encode_a_graph_without_edges():
  graph = graph_lib.build_graph(np.zeros(0, np.int64), np.zeros(0, np.int64), 3, 2)
  config = config_lib.default_config().model
  config.aggregator, config.embed_dim, config.hidden_dims, config.hash_bits = "sage", 4, (5, 3), 6
  model = model_lib.create_model(config, 3, 2)
  tree = graph_lib.sampled_tree_graph(np.zeros(3, np.int32), np.ones(2, bool), 1, (1, 1))
  params = model.init(jax.random.PRNGKey(2), tree, 1, (1, 1))["params"]
  z = encode.encode_nodes(model, params, graph, edge_chunk=4)
  np.testing.assert_allclose(z, _numpy_encode(params, graph, "sage"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_lightgcn_encode_matches_dense_propagation(num_layers):
  """LightGCN written as its paper does: E^(l+1) = D^-½ A D^-½ E^(l), u = mean_l E^(l)."""
  num_users, num_items = 9, 7
  pairs, graph = _random_graph(1, num_users, num_items)
  config = config_lib.default_config().model
  config.aggregator, config.embed_dim, config.hash_bits = "lightgcn", 4, 6
  config.hidden_dims = (4,) * num_layers
  model = model_lib.create_model(config, num_users, num_items)
  fanouts = (1,) * num_layers
  tree = graph_lib.sampled_tree_graph(np.zeros(num_layers + 1, np.int32),
                                      np.ones(num_layers, bool), 1, fanouts)
  params = model.init(jax.random.PRNGKey(2), tree, 1, fanouts,
                      degrees=np.ones(num_layers + 1))["params"]

  n = graph.num_nodes
  adjacency = np.zeros((n, n))
  adjacency[pairs[:, 0], num_users + pairs[:, 1]] = 1
  adjacency += adjacency.T
  degree = adjacency.sum(1)
  scale = np.where(degree > 0, 1 / np.sqrt(np.maximum(degree, 1)), 0)  # Isolated nodes: 0.
  normalised = scale[:, None] * adjacency * scale[None, :]
  layers = [np.asarray(params["embedding"]["embedding"], np.float64)]
  for _ in range(num_layers):
    layers.append(normalised @ layers[-1])
  u = np.mean(layers, axis=0)
  expected = np.tanh(u @ np.asarray(params["user_hash"]["kernel"]) + params["user_hash"]["bias"])
  for edge_chunk, row_chunk in ((1, 1), (7, 5), (10_000, 10_000)):
    z = encode.encode_nodes(model, params, graph, edge_chunk=edge_chunk, row_chunk=row_chunk)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregator,separate", [("sage", True), ("gcn", False),
                                                 ("lightgcn", False)])
def test_sharded_encoding_equals_whole_table_encoding(aggregator, separate):
  """Each owner encoding its block (rows 53 over 4 devices: L = 14, the last block padded) gives
  the whole-table codes to rounding, with windows of 1 edge, a few and all of an owner's."""
  num_users, num_items = 30, 23
  _, graph = _random_graph(1, num_users, num_items, draws=120)
  config = config_lib.default_config().model
  config.aggregator, config.embed_dim, config.hash_bits = aggregator, 8, 6
  config.hidden_dims = (8, 8) if aggregator == "lightgcn" else (5, 3)
  config.separate_hash_layers = separate
  model = model_lib.create_model(config, num_users, num_items)
  tree = graph_lib.sampled_tree_graph(np.zeros(3, np.int32), np.ones(2, bool), 1, (1, 1))
  params = model.init(jax.random.PRNGKey(3), tree, 1, (1, 1), degrees=np.ones(3))["params"]
  rows = tables.RowSharding(tuple(jax.local_devices()[:4]), graph.num_nodes)
  table, dense = state_lib.split_embedding(params)
  sharded = state_lib.join_embedding(rows.split(np.asarray(table)), dense)
  for edge_chunk in (1, 9, 50, 10_000):
    expected = encode.encode_nodes(model, params, graph, edge_chunk=edge_chunk)
    z = encode.encode_nodes_sharded(model, sharded, graph, rows, edge_chunk=edge_chunk)
    assert z.shape == expected.shape == (num_users + num_items, 6)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-7,
                               err_msg=f"edge_chunk={edge_chunk}")


def test_owner_windows_against_a_loop_over_edges():
  """Every edge of owner d's rows read once, in windows of edge_chunk / n, and the list
  capacity the most senders one window asks of one owner."""
  _, graph = _random_graph(2, 12, 9, draws=40)
  num_devices, block, chunk = 3, 7, 8  # Windows of 2 edges.
  senders, receivers, valid, capacity = encode._owner_windows(graph, num_devices, block, chunk)
  most = 0
  for owner in range(num_devices):
    got = sorted((int(receivers[owner][w, i]) + owner * block, int(senders[owner][w, i]))
                 for w, i in zip(*np.nonzero(valid[owner])))
    expected = sorted((int(r), int(s)) for r, s in zip(graph.edge_rows, graph.indices)
                      if owner * block <= r < (owner + 1) * block)
    assert got == expected
    assert (receivers[owner][~valid[owner]] == block).all()
    assert valid.shape[2] == chunk // num_devices
    for w in range(valid.shape[1]):
      counts = np.bincount(senders[owner][w][valid[owner][w]] // block, minlength=num_devices)
      most = max(most, int(counts.max()))
  assert capacity == most


@pytest.mark.parametrize("aggregator", ["gcn", "sage", "lightgcn"])
def test_encode_graph_equals_full_neighbour_encoding(aggregator):
  """The differentiable whole-graph layers ("full" sampler mode) against `encode_nodes`, which
  the tests above hold to NumPy; any node ids, repeats included, and the logits too."""
  num_users, num_items = 9, 7
  _, graph = _random_graph(3, num_users, num_items)
  config = config_lib.default_config().model
  config.aggregator, config.embed_dim, config.hash_bits = aggregator, 4, 6
  config.hidden_dims = (4, 4) if aggregator == "lightgcn" else (5, 3)
  model = model_lib.create_model(config, num_users, num_items)
  tree = graph_lib.sampled_tree_graph(np.zeros(3, np.int32), np.ones(2, bool), 1, (1, 1))
  params = model.init(jax.random.PRNGKey(2), tree, 1, (1, 1), degrees=np.ones(3))["params"]
  expected = encode.encode_nodes(model, params, graph, edge_chunk=7)
  device_graph = graph_lib.to_device(graph)
  node_ids = np.array([0, 15, 3, 3, 9, 12, 8], np.int32)
  args = (device_graph.indices, graph_lib.edge_receivers(device_graph),
          np.diff(graph.indptr), node_ids)
  z = model.apply({"params": params}, *args, method=model_lib.HashGNN.encode_graph)
  np.testing.assert_allclose(z, expected[node_ids], rtol=1e-5, atol=1e-6)
  logits = model.apply({"params": params}, *args, logits=True,
                       method=model_lib.HashGNN.encode_graph)
  np.testing.assert_allclose(np.tanh(logits), expected[node_ids], rtol=1e-5, atol=1e-6)
