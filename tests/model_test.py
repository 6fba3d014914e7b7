"""Model pieces against NumPy: STE sign, guidance mixing, both aggregators on a hand-made graph."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashgnn_jax import config_lib
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.model import network as model_lib
from hashgnn_jax.train import sampler


def test_ste_sign_forward_is_sign_with_zero_positive():
  z = jnp.array([-0.7, -0.0, 0.0, 1e-9, 0.3])
  np.testing.assert_array_equal(model_lib.ste_sign(z), [-1.0, 1.0, 1.0, 1.0, 1.0])


def test_ste_sign_gradient_is_identity():
  z = jnp.array([-0.7, 0.0, 0.4])
  weights = jnp.array([2.0, -3.0, 5.0])
  grad = jax.grad(lambda v: jnp.sum(model_lib.ste_sign(v) * weights))(z)
  np.testing.assert_array_equal(grad, weights)


def test_guided_codes_mix_and_gradient():
  z = jnp.array([[0.2, -0.4, 0.0], [-0.1, 0.5, 0.9]])
  keep = jnp.array([[True, False, False], [False, True, True]])
  expected = np.array([[0.2, -1.0, 1.0], [-1.0, 0.5, 0.9]])
  np.testing.assert_allclose(model_lib.guided_codes(z, keep), expected)
  # Both the continuous and the straight-through path pass the gradient unchanged.
  grad = jax.grad(lambda v: jnp.sum(model_lib.guided_codes(v, keep) * 3.0))(z)
  np.testing.assert_allclose(grad, np.full(z.shape, 3.0))


@pytest.mark.parametrize("granularity", ["element", "node"])
def test_guidance_mask_statistics(granularity):
  num_examples, num_negatives, bits, p = 4_000, 3, 16, 0.3
  width = bits if granularity == "element" else 1
  keep = np.asarray(sampler.draw_keep_continuous(
      jnp.uint32(3), jnp.arange(num_examples), jnp.float32(p), num_negatives=num_negatives,
      width=width, share_positive=False))
  assert keep.shape == (num_examples * (2 + num_negatives), width)
  n = keep.size
  assert abs(keep.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
  # Mixed codes: a node-level Q keeps whole rows continuous; an element-level one mixes inside rows.
  z = jnp.full((keep.shape[0], bits), 0.25)
  mixed = np.asarray(model_lib.guided_codes(z, keep))
  continuous_fraction = (mixed == 0.25).mean(axis=1)
  if granularity == "node":
    assert set(np.unique(continuous_fraction)) <= {0.0, 1.0}
  else:
    assert ((continuous_fraction > 0) & (continuous_fraction < 1)).mean() > 0.9
  assert abs(continuous_fraction.mean() - p) < 0.02


def test_shared_positive_draw():
  keep = np.asarray(sampler.draw_keep_continuous(jnp.uint32(0), jnp.arange(500), jnp.float32(0.5),
                                                 num_negatives=2, width=1, share_positive=True))
  np.testing.assert_array_equal(keep[:500], keep[500:1000])
  assert not np.array_equal(keep[:500], keep[1000:1500:2])


def test_guidance_draws_follow_global_positions_and_the_seed():
  # A device drawing examples 4..7 of the global batch gets their rows of the whole batch's mask.
  draw = functools.partial(sampler.draw_keep_continuous, p=jnp.float32(0.5), num_negatives=2,
                           width=8, share_positive=False)

  def per_example(keep, b):  # [users (b) | positives (b) | negatives (b·2)] -> [b, 4, width]
    return np.concatenate([keep[:b, None], keep[b:2 * b, None], keep[2 * b:].reshape(b, 2, -1)],
                          axis=1)

  whole = per_example(np.asarray(draw(jnp.uint32(7), jnp.arange(8))), 8)
  part = per_example(np.asarray(draw(jnp.uint32(7), jnp.arange(4, 8))), 4)
  np.testing.assert_array_equal(part, whole[4:])
  assert not np.array_equal(whole, per_example(np.asarray(draw(jnp.uint32(8), jnp.arange(8))), 8))
  # p = 1 keeps every code continuous and p = 0 none.
  assert np.asarray(draw(jnp.uint32(7), jnp.arange(8), p=jnp.float32(1.0))).all()
  assert not np.asarray(draw(jnp.uint32(7), jnp.arange(8), p=jnp.float32(0.0))).any()


def _hand_graph():
  """Targets 0 and 1; node 0 has neighbour slots 2, 3 (3 masked), node 1 has slots 4, 5."""
  node_ids = jnp.array([0, 1, 2, 3, 4, 5], jnp.int32)
  mask = jnp.array([True, False, True, True])
  return graph_lib.sampled_tree_graph(node_ids, mask, 2, (2,))


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_aggregators_match_numpy(kind):
  config = config_lib.default_config().model
  config.aggregator = kind
  config.embed_dim = 3
  config.hidden_dims = (4,)
  config.hash_bits = 5
  model = model_lib.create_model(config, num_users=2, num_items=4)
  graph = _hand_graph()
  params = model.init(jax.random.PRNGKey(0), graph, 2, (2,))["params"]
  z = np.asarray(model.apply({"params": params}, graph, 2, (2,)))

  emb = np.asarray(params["embedding"]["embedding"])
  w = np.asarray(params["layers_0"]["Dense_0"]["kernel"])
  b = np.asarray(params["layers_0"]["Dense_0"]["bias"])
  if kind == "gcn":
    h0 = (emb[0] + emb[2]) / 2  # The masked slot 3 is not a neighbour.
    h1 = (emb[1] + emb[4] + emb[5]) / 3
  else:
    h0 = np.concatenate([emb[0], emb[2]])
    h1 = np.concatenate([emb[1], (emb[4] + emb[5]) / 2])
  hidden = np.stack([h0, h1]) @ w + b
  hidden = np.where(hidden > 0, hidden, 0.2 * hidden)
  hw = np.asarray(params["user_hash"]["kernel"])
  hb = np.asarray(params["user_hash"]["bias"])
  np.testing.assert_allclose(z, np.tanh(hidden @ hw + hb), rtol=1e-5, atol=1e-6)


def _tiny_gcn_model():
  """A gcn HashGNN small enough to recompute by hand: 3 users, 5 items, widths 2 -> 3 -> 2 -> 4."""
  config = config_lib.default_config().model
  config.aggregator = "gcn"
  config.embed_dim = 2
  config.hidden_dims = (3, 2)
  config.hash_bits = 4
  return model_lib.create_model(config, num_users=3, num_items=5)


def test_two_layer_tree_matches_numpy():
  model = _tiny_gcn_model()
  # One target (node 0) with hop-1 slots [1, 2] and hop-2 slots [3, 4 | 5, 6]; all edges real.
  ids = jnp.array([0, 3, 4, 1, 2, 0, 2], jnp.int32)
  graph = graph_lib.sampled_tree_graph(ids, jnp.ones(6, bool), 1, (2, 2))
  params = model.init(jax.random.PRNGKey(1), graph, 1, (2, 2))["params"]
  z = np.asarray(model.apply({"params": params}, graph, 1, (2, 2)))

  emb = np.asarray(params["embedding"]["embedding"])[np.asarray(ids)]
  act = lambda v: np.where(v > 0, v, 0.2 * v)
  dense = lambda name, v: v @ np.asarray(params[name]["Dense_0"]["kernel"]) + np.asarray(
      params[name]["Dense_0"]["bias"])
  l1 = act(dense("layers_0", np.stack([
      (emb[0] + emb[1] + emb[2]) / 3, (emb[1] + emb[3] + emb[4]) / 3,
      (emb[2] + emb[5] + emb[6]) / 3])))
  l2 = act(dense("layers_1", ((l1[0] + l1[1] + l1[2]) / 3)[None]))
  expected = np.tanh(l2 @ np.asarray(params["user_hash"]["kernel"]) +
                     np.asarray(params["user_hash"]["bias"]))
  np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)


def test_separate_hash_layers_pick_by_node_type():
  config = config_lib.default_config().model
  config.embed_dim = 3
  config.hidden_dims = (4,)
  config.separate_hash_layers = True
  model = model_lib.create_model(config, num_users=2, num_items=4)
  params = model.init(jax.random.PRNGKey(0), _hand_graph(), 2, (2,))["params"]
  x = jnp.ones((2, 4))
  # Node 0 is a user, node 3 an item (users are nodes 0..1).
  z = model.apply({"params": params}, x, jnp.array([0, 3]), method=model_lib.HashGNN.hash)
  user = np.tanh(np.ones((1, 4)) @ params["user_hash"]["kernel"] + params["user_hash"]["bias"])
  item = np.tanh(np.ones((1, 4)) @ params["item_hash"]["kernel"] + params["item_hash"]["bias"])
  np.testing.assert_allclose(z, np.concatenate([user, item]), rtol=1e-6)


def test_gather_sum_value_and_gradient_match_autodiff():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
  neighbours = jnp.asarray(rng.integers(0, 7, size=(5, 4)), jnp.int32)
  mask = jnp.asarray(rng.random((5, 4)) < 0.7)
  naive = lambda x: jnp.einsum("sfd,sf->sd", x[neighbours], mask.astype(x.dtype))
  np.testing.assert_allclose(model_lib.gather_sum(7, x, neighbours, mask), naive(x),
                             rtol=1e-6)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))
  np.testing.assert_allclose(
      jax.grad(loss(lambda x: model_lib.gather_sum(7, x, neighbours, mask)))(x),
      jax.grad(loss(naive))(x), rtol=1e-5, atol=1e-6)


def test_materialize_is_the_identity_and_keeps_its_own_buffer():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.standard_normal((50, 8)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 50, 30), jnp.int32)
  neighbours = jnp.asarray(rng.integers(0, 30, (20, 3)), jnp.int32)
  mask = jnp.asarray(rng.random((20, 3)) < 0.7)
  weights = jnp.asarray(rng.standard_normal((20, 8)), jnp.float32)

  def loss(table, barrier):
    x = table[ids]
    x = model_lib.materialize(x) if barrier else x
    return jnp.sum(model_lib.gather_sum(30, x, neighbours, mask) * weights)

  for a, b in zip(jax.value_and_grad(loss)(table, True), jax.value_and_grad(loss)(table, False)):
    np.testing.assert_array_equal(a, b)
  x = table[ids]
  np.testing.assert_array_equal(model_lib.materialize(x), x)
  # The barrier is the scatter: if XLA ever folds it away, the speed-up is gone (results stay).
  compiled = lambda barrier: jax.jit(lambda t: loss(t, barrier)).lower(table).compile().as_text()
  assert "scatter" in compiled(True) and "scatter" not in compiled(False)


def _hand_blocks():
  """Set 0 = {4, 0}; set 1 adds 6; set 2 adds 1, then a padding slot (id 8 = num_nodes)."""
  return sampler.NodeBlocks(
      nodes=jnp.array([4, 0, 6, 1, 8], jnp.int32),
      valid=jnp.array([True, True, True, True, False]),
      # Hop 0 (set 0 -> set 1, fanout 2); node 0 has one real neighbour and one masked slot.
      neighbours=(jnp.array([[1, 2], [2, 0]], jnp.int32),
                  jnp.array([[3, 3], [2, 2], [0, 1]], jnp.int32)),
      masks=(jnp.array([[True, True], [True, False]]),
             jnp.array([[True, False], [True, True], [True, True]])),
      targets=jnp.array([1, 0, 0], jnp.int32), counts=jnp.array([2, 3, 4], jnp.int32),
      complete=jnp.array(True))


def test_encode_blocks_matches_numpy():
  model = _tiny_gcn_model()
  tree = graph_lib.sampled_tree_graph(jnp.zeros(7, jnp.int32), jnp.ones(6, bool), 1, (2, 2))
  params = model.init(jax.random.PRNGKey(1), tree, 1, (2, 2))["params"]
  blocks = _hand_blocks()
  z = np.asarray(model.apply({"params": params}, blocks, method=model_lib.HashGNN.encode_blocks))

  emb = np.asarray(params["embedding"]["embedding"])[np.array([4, 0, 6, 1])]
  act = lambda v: np.where(v > 0, v, 0.2 * v)
  dense = lambda name, v: v @ np.asarray(params[name]["Dense_0"]["kernel"]) + np.asarray(
      params[name]["Dense_0"]["bias"])
  # gcn: mean over self and the real (masked-in) neighbours.
  l1 = act(dense("layers_0", np.stack([
      (emb[0] + emb[3]) / 2, (emb[1] + 2 * emb[2]) / 3, (emb[2] + emb[0] + emb[1]) / 3])))
  l2 = act(dense("layers_1", np.stack([(l1[0] + l1[1] + l1[2]) / 3, (l1[1] + l1[2]) / 2])))
  z0 = np.tanh(l2 @ np.asarray(params["user_hash"]["kernel"]) +
               np.asarray(params["user_hash"]["bias"]))
  np.testing.assert_allclose(z, z0[np.array([1, 0, 0])], rtol=1e-5, atol=1e-6)


def _tiny_lightgcn_model(num_users=3, num_items=5, width=2):
  config = config_lib.default_config().model
  config.aggregator, config.embed_dim, config.hidden_dims = "lightgcn", width, (width, width)
  config.hash_bits = 4
  return model_lib.create_model(config, num_users=num_users, num_items=num_items)


def test_lightgcn_encode_blocks_matches_numpy():
  model = _tiny_lightgcn_model()
  tree = graph_lib.sampled_tree_graph(jnp.zeros(7, jnp.int32), jnp.ones(6, bool), 1, (2, 2))
  params = model.init(jax.random.PRNGKey(1), tree, 1, (2, 2),
                      degrees=jnp.ones(7))["params"]
  assert set(params) == {"embedding", "user_hash"}  # The propagation has no weights.
  blocks = _hand_blocks()
  # The nodes' degrees in the whole graph (the padding slot's 0).
  degrees = jnp.array([3, 2, 4, 1, 0], jnp.int32)
  z = np.asarray(model.apply({"params": params}, blocks, degrees=degrees,
                             method=model_lib.HashGNN.encode_blocks))

  emb = np.asarray(params["embedding"]["embedding"])[np.array([4, 0, 6, 1])]
  d = np.array([3.0, 2.0, 4.0, 1.0])
  # Layer l at node v: √d_v × the mean over its drawn neighbours u of x_u / √d_u.
  m0 = emb / np.sqrt(d)[:, None]
  l1 = np.stack([np.sqrt(3) * m0[3], np.sqrt(2) * (2 * m0[2]) / 2,
                 np.sqrt(4) * (m0[0] + m0[1]) / 2])
  m1 = l1 / np.sqrt(d[:3])[:, None]
  l2 = np.stack([np.sqrt(3) * (m1[1] + m1[2]) / 2, np.sqrt(2) * m1[2]])
  u = (emb[:2] + l1[:2] + l2) / 3  # The mean of layers 0, 1 and 2.
  z0 = np.tanh(u @ np.asarray(params["user_hash"]["kernel"]) +
               np.asarray(params["user_hash"]["bias"]))
  np.testing.assert_allclose(z, z0[np.array([1, 0, 0])], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="degrees"):
    model.apply({"params": params}, blocks, method=model_lib.HashGNN.encode_blocks)


def test_lightgcn_tree_matches_numpy():
  model = _tiny_lightgcn_model()
  # One target (node 0) with hop-1 slots [1, 2] and hop-2 slots [3, 4 | 5, 6]; slot 6 masked.
  ids = jnp.array([0, 3, 4, 1, 2, 0, 2], jnp.int32)
  graph = graph_lib.sampled_tree_graph(ids, jnp.array([True] * 5 + [False]), 1, (2, 2))
  degrees = jnp.array([2, 5, 1, 3, 4, 2, 4])
  params = model.init(jax.random.PRNGKey(1), graph, 1, (2, 2), degrees=degrees)["params"]
  z = np.asarray(model.apply({"params": params}, graph, 1, (2, 2), degrees=degrees))

  emb = np.asarray(params["embedding"]["embedding"])[np.asarray(ids)]
  d = np.asarray(degrees, np.float64)
  m = emb / np.sqrt(d)[:, None]
  l1 = np.stack([np.sqrt(d[0]) * (m[1] + m[2]) / 2, np.sqrt(d[1]) * (m[3] + m[4]) / 2,
                 np.sqrt(d[2]) * m[5]])  # Slot 2's second child is masked.
  m1 = l1 / np.sqrt(d[:3])[:, None]
  l2 = np.sqrt(d[0]) * (m1[1] + m1[2]) / 2
  u = (emb[0] + l1[0] + l2) / 3
  expected = np.tanh(u @ np.asarray(params["user_hash"]["kernel"]) +
                     np.asarray(params["user_hash"]["bias"]))
  np.testing.assert_allclose(z, expected[None], rtol=1e-5, atol=1e-6)


def test_lightgcn_sampled_layer_is_unbiased():
  """Averaged over many real samples, a sampled lightgcn layer is the full-graph one."""
  rng = np.random.default_rng(3)
  num_users, num_items, dim = 6, 5, 3
  pairs = np.array(sorted({(int(rng.integers(num_users)), int(rng.integers(num_items)))
                           for _ in range(20)}))
  host_graph = graph_lib.build_graph(pairs[:, 0], pairs[:, 1], num_users, num_items)
  graph = graph_lib.to_device(host_graph)
  n = host_graph.num_nodes
  x = rng.normal(size=(n, dim)).astype(np.float32)
  adjacency = np.zeros((n, n))
  for v in range(n):
    adjacency[v, host_graph.indices[host_graph.indptr[v]:host_graph.indptr[v + 1]]] = 1
  d = adjacency.sum(1)
  norm = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1)), 0)
  expected = (norm[:, None] * adjacency * norm[None, :]) @ x  # D^-½ A D^-½ X

  edges = jnp.arange(host_graph.num_edges, dtype=jnp.int32)

  @jax.jit
  def one_sample(key):  # Layer 1 of set 0 (the batch's targets): [S_0, D] and their ids.
    blocks, _ = sampler.sample_blocks(graph, edges, sampler.example_keys(key, edges), key,
                                      graph_lib.empty_marks(n), fanouts=(3,), num_negatives=1)
    degrees = graph_lib.node_degrees(graph, blocks.nodes).astype(jnp.float32)
    rows = jnp.asarray(x)[jnp.minimum(blocks.nodes, n - 1)]
    messages = model_lib.lightgcn_messages(rows, degrees)
    mask = blocks.masks[0]
    sums = model_lib.gather_sum(rows.shape[0], messages, blocks.neighbours[0], mask)
    out = model_lib.lightgcn_propagate(sums, mask.sum(1, dtype=jnp.float32),
                                       degrees[:mask.shape[0]])
    return out, blocks.nodes[:mask.shape[0]], jnp.arange(mask.shape[0]) < blocks.counts[0]

  total, seen = np.zeros((n, dim)), np.zeros(n)
  for out, ids, valid in zip(*jax.vmap(one_sample)(jax.random.split(jax.random.PRNGKey(0),
                                                                    4000))):
    ids, valid = np.asarray(ids)[np.asarray(valid)], np.asarray(valid)
    np.add.at(total, ids, np.asarray(out)[valid])
    np.add.at(seen, ids, 1)
  # Every node with an edge is a target of every batch (the batch is all the edges).
  assert (seen[d > 0] == 4000).all()
  np.testing.assert_allclose(total[d > 0] / 4000, expected[d > 0], atol=0.05)
