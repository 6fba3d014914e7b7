"""Sampler invariants against the host CSR: real neighbours, exact negatives, static shapes."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.train import sampler


def _random_graph(num_users=40, num_items=25, num_pairs=300, seed=0):
  rng = np.random.default_rng(seed)
  pairs = {(int(rng.integers(num_users)), int(rng.integers(num_items))) for _ in range(num_pairs)}
  pairs = np.array(sorted(pairs))
  return graph_lib.build_graph(pairs[:, 0], pairs[:, 1], num_users, num_items), pairs


def _neighbour_sets(graph):
  return [set(graph.indices[graph.indptr[v]:graph.indptr[v + 1]].tolist())
          for v in range(graph.num_nodes)]


def test_build_graph_csr():
  graph = graph_lib.build_graph(np.array([0, 0, 1]), np.array([1, 0, 1]), 2, 2)
  # Users 0, 1; items are nodes 2, 3.
  np.testing.assert_array_equal(graph.indptr, [0, 2, 3, 4, 6])
  np.testing.assert_array_equal(graph.indices, [2, 3, 3, 0, 0, 1])
  np.testing.assert_array_equal(graph.padded_user_items(np.array([1, 0])), [[1, -1], [0, 1]])
  with pytest.raises(ValueError, match="unique"):
    graph_lib.build_graph(np.array([0, 0]), np.array([1, 1]), 2, 2)
  with pytest.raises(ValueError, match="item ids"):
    graph_lib.build_graph(np.array([0]), np.array([2]), 2, 2)


def test_degrees_and_edge_rows_are_computed_once_and_read_only(monkeypatch):
  graph = graph_lib.build_graph(np.array([0, 0, 1]), np.array([1, 0, 1]), 2, 2)
  calls = []
  diff = np.diff
  monkeypatch.setattr(graph_lib.np, "diff", lambda a: calls.append(1) or diff(a))
  for _ in range(3):
    np.testing.assert_array_equal(graph.degrees, [2, 1, 1, 2])
    graph.padded_user_items(np.array([0, 1]))
  assert len(calls) == 1 and graph.max_user_degree == 2
  with pytest.raises(ValueError, match="read-only"):
    graph.degrees[0] = 5
  # The receiving row of each CSR entry, as encoding reads it.
  np.testing.assert_array_equal(graph.edge_rows, [0, 0, 1, 2, 3, 3])
  assert graph.edge_rows is graph.edge_rows and graph.edge_rows.dtype == np.int32


def test_layer_sizes_prefixes():
  # Targets 2, fanouts (3, 2): hops of 2, 6, 12 slots.
  assert graph_lib.layer_sizes(2, (3, 2)) == [(8, 18), (2, 6)]


def test_edge_endpoints_recover_pairs():
  graph, pairs = _random_graph()
  users, items = sampler.edge_endpoints(graph_lib.to_device(graph),
                                        jnp.arange(graph.num_edges, dtype=jnp.int32))
  got = np.stack([np.asarray(users), np.asarray(items) - graph.num_users], axis=1)
  np.testing.assert_array_equal(got, pairs)


def _small_batch(b=16):
  """A 40-user, 25-item graph (host, device, neighbour sets) and b edge ids with their keys."""
  graph, _ = _random_graph(num_users=40, num_items=25, num_pairs=120)
  edge_ids = jnp.arange(b, dtype=jnp.int32) * 3
  keys = sampler.example_keys(jax.random.PRNGKey(0), jnp.arange(b))
  return graph, graph_lib.to_device(graph), _neighbour_sets(graph), edge_ids, keys


def test_batch_targets_are_the_trees_roots():
  """"full" mode's targets: the users, positives and negatives a batch roots its trees at."""
  _, device_graph, _, edge_ids, keys = _small_batch()
  targets = sampler.batch_targets(device_graph, edge_ids, keys, num_negatives=5)
  trees = sampler.sample_batch(device_graph, edge_ids, keys, fanouts=(2,), num_negatives=5)
  assert targets.shape == (16 * 7,)
  np.testing.assert_array_equal(targets, np.asarray(trees.nodes)[:16 * 7])


def test_edge_receivers_are_the_csr_rows():
  graph, _ = _random_graph()
  got = graph_lib.edge_receivers(graph_lib.to_device(graph))
  np.testing.assert_array_equal(got, np.repeat(np.arange(graph.num_nodes), np.diff(graph.indptr)))


def test_sampled_trees_use_real_neighbours_and_static_shapes():
  graph, device_graph, neighbours, edge_ids, keys = _small_batch()
  fanouts, num_negatives, b = (4, 3), 5, 16
  trees = sampler.sample_batch(device_graph, edge_ids, keys, fanouts=fanouts,
                               num_negatives=num_negatives)
  targets = b * (2 + num_negatives)
  assert trees.nodes.shape == (targets * (1 + 4 + 12),)
  assert trees.edges.shape == trees.senders.shape == (targets * (4 + 12),)
  nodes = np.asarray(trees.nodes)
  mask = np.asarray(trees.edges)
  for s, r, m in zip(np.asarray(trees.senders), np.asarray(trees.receivers), mask):
    child, parent = nodes[s], nodes[r]
    if m:
      assert child in neighbours[parent]
    else:
      assert not neighbours[parent] and child == parent
  # Layout: users, their positive items, then negatives.
  users, items = nodes[:b], nodes[b:2 * b] - graph.num_users
  for u, i in zip(users, items):
    assert i + graph.num_users in neighbours[u]
  # The shapes do not depend on the draw: a second key compiles to the same structure.
  other = sampler.sample_batch(device_graph, edge_ids, keys + 1, fanouts=fanouts,
                               num_negatives=num_negatives)
  assert jax.tree.map(jnp.shape, other) == jax.tree.map(jnp.shape, trees)


def test_negatives_exclude_training_items_exactly_and_uniformly():
  graph, _ = _random_graph(num_users=6, num_items=12, num_pairs=40, seed=3)
  device_graph = graph_lib.to_device(graph)
  users = jnp.repeat(jnp.arange(6, dtype=jnp.int32), 1)
  negatives = np.asarray(sampler.sample_negative_items(device_graph, users, 6_000,
                                                       jax.random.PRNGKey(1)))
  for u in range(6):
    positives = set(graph.user_items(u).tolist())
    drawn = negatives[u] - graph.num_users
    allowed = sorted(set(range(12)) - positives)
    counts = collections.Counter(drawn.tolist())
    assert set(counts) == set(allowed)  # Never a training item, every other item reachable.
    expected = 6_000 / len(allowed)
    assert max(abs(c - expected) for c in counts.values()) < 5 * np.sqrt(expected)


def test_negatives_for_long_rows():
  # One user linked to every item but three: only those three may come back.
  num_items = 300
  items = np.array([i for i in range(num_items) if i not in (0, 150, 299)])
  graph = graph_lib.build_graph(np.zeros_like(items), items, 1, num_items)
  negatives = sampler.sample_negative_items(graph_lib.to_device(graph), jnp.zeros(1, jnp.int32),
                                            500, jax.random.PRNGKey(0))
  assert set((np.asarray(negatives) - 1).ravel().tolist()) == {0, 150, 299}


def test_epoch_order_is_a_permutation_that_changes_by_epoch():
  key = jax.random.PRNGKey(0)
  first = np.asarray(sampler.epoch_order(key, 0, 50))
  np.testing.assert_array_equal(np.sort(first), np.arange(50))
  assert not np.array_equal(first, np.asarray(sampler.epoch_order(key, 1, 50)))
  np.testing.assert_array_equal(first, np.asarray(sampler.epoch_order(key, 0, 50)))


def test_hashed_neighbours_are_real_and_depend_only_on_node_and_seed():
  graph, _ = _random_graph(num_users=30, num_items=20, num_pairs=80, seed=3)
  device_graph = graph_lib.to_device(graph)
  neighbours = _neighbour_sets(graph)
  nodes = jnp.arange(graph.num_nodes, dtype=jnp.int32)
  valid = jnp.ones(nodes.shape, bool)
  seed = jnp.uint32(12345)
  drawn, mask = sampler.hashed_neighbours(device_graph, nodes, valid, 6, seed)
  for v, row, row_mask in zip(np.asarray(nodes), np.asarray(drawn), np.asarray(mask)):
    if neighbours[v]:
      assert row_mask.all() and set(row.tolist()) <= neighbours[v]
    else:
      assert not row_mask.any() and (row == v).all()
  # The same node draws the same neighbours wherever it sits in the batch.
  shuffled = jnp.asarray(np.random.default_rng(0).permutation(graph.num_nodes), jnp.int32)
  again, _ = sampler.hashed_neighbours(device_graph, shuffled, valid, 6, seed)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(drawn)[np.asarray(shuffled)])
  other, _ = sampler.hashed_neighbours(device_graph, nodes, valid, 6, jnp.uint32(7))
  assert (np.asarray(other) != np.asarray(drawn)).any()


def test_hashed_neighbours_are_uniform():
  # A user linked to all 20 items (nodes 1..20), drawn 20 at a time under 1000 seeds.
  graph = graph_lib.to_device(graph_lib.build_graph(np.zeros(20, np.int64), np.arange(20), 1, 20))
  draw = jax.vmap(lambda seed: sampler.hashed_neighbours(
      graph, jnp.zeros(1, jnp.int32), jnp.ones(1, bool), 20, seed)[0][0])
  rows = np.asarray(draw(jnp.arange(1000, dtype=jnp.uint32)))  # [1000, 20]
  freq = np.bincount(rows.ravel() - 1, minlength=20) / rows.size
  np.testing.assert_allclose(freq, 1 / 20, atol=0.01)  # ~6 standard deviations.


def test_sample_blocks_nest_sets_and_point_at_real_neighbours():
  graph, device_graph, neighbours, edge_ids, keys = _small_batch()
  fanouts, num_negatives, b = (4, 3), 5, 16
  blocks, marks = sampler.sample_blocks(device_graph, edge_ids, keys, jax.random.PRNGKey(5),
                                        graph_lib.empty_marks(graph.num_nodes),
                                        fanouts=fanouts, num_negatives=num_negatives)
  np.testing.assert_array_equal(marks, graph_lib.empty_marks(graph.num_nodes))
  trees = sampler.sample_batch(device_graph, edge_ids, keys, fanouts=fanouts,
                               num_negatives=num_negatives)
  nodes, valid = np.asarray(blocks.nodes), np.asarray(blocks.valid)
  num_valid = int(valid.sum())
  assert valid[:num_valid].all() and not valid[num_valid:].any()
  assert len(set(nodes[:num_valid].tolist())) == num_valid  # Distinct.
  assert (nodes[num_valid:] == graph.num_nodes).all()
  # Targets: the same roots as the tree sampler, in the same layout.
  targets = b * (2 + num_negatives)
  np.testing.assert_array_equal(nodes[np.asarray(blocks.targets)],
                                np.asarray(trees.nodes)[:targets])
  # Each hop's neighbour slots name real neighbours of the set's nodes; sets are prefixes.
  for hop_neighbours, hop_mask in zip(blocks.neighbours, blocks.masks):
    hop_neighbours, hop_mask = np.asarray(hop_neighbours), np.asarray(hop_mask)
    set_size = hop_neighbours.shape[0]
    for v, slots, m in zip(nodes[:set_size], hop_neighbours, hop_mask):
      if v == graph.num_nodes:
        assert not m.any()
        continue
      for slot, ok in zip(slots, m):
        assert not ok or nodes[slot] in neighbours[v]


def test_sample_blocks_within_sizes_equal_the_unbounded_sample():
  graph, device_graph, _, edge_ids, keys = _small_batch()
  kwargs = dict(fanouts=(4, 3), num_negatives=5)
  sample = lambda sizes: sampler.sample_blocks(
      device_graph, edge_ids, keys, jax.random.PRNGKey(5), graph_lib.empty_marks(graph.num_nodes),
      sizes=sizes, **kwargs)
  full, _ = sample(None)
  counts = tuple(int(c) for c in full.counts)
  # Set sizes [S_0, S_1, S_2], and each set's valid slots counted from its own prefix.
  full_sizes = [m.shape[0] for m in full.masks] + [full.nodes.shape[0]]
  assert counts[-1] == int(np.sum(full.valid))
  assert all(c <= s for c, s in zip(counts, full_sizes)) and counts[0] < full_sizes[0]
  assert bool(full.complete)

  exact, marks = sample(counts)  # As small as the sets allow.
  assert bool(exact.complete)
  np.testing.assert_array_equal(marks, graph_lib.empty_marks(graph.num_nodes))
  np.testing.assert_array_equal(exact.nodes, full.nodes[:counts[-1]])
  np.testing.assert_array_equal(exact.valid, full.valid[:counts[-1]])
  np.testing.assert_array_equal(exact.targets, full.targets)
  np.testing.assert_array_equal(exact.counts, full.counts)
  for hop, size in enumerate(counts[:-1]):
    np.testing.assert_array_equal(exact.neighbours[hop], full.neighbours[hop][:size])
    np.testing.assert_array_equal(exact.masks[hop], full.masks[hop][:size])

  for hop in range(3):  # One slot short in any set: reported, and the marks still cleared.
    short = tuple(c - (h == hop) for h, c in enumerate(counts))
    short = tuple(max(short[:h + 1]) for h in range(3))  # Sets stay non-decreasing.
    if short == counts:
      continue
    cut, marks = sample(short)
    assert not bool(cut.complete), hop
    np.testing.assert_array_equal(marks, graph_lib.empty_marks(graph.num_nodes))


def test_fit_set_sizes_hold_fresh_batches_and_stay_off_when_sets_are_full():
  graph, _ = _random_graph(num_users=12000, num_items=8000, num_pairs=60000, seed=3)
  device_graph = graph_lib.to_device(graph)
  kwargs = dict(fanouts=(4, 3), num_negatives=5)
  batch = 256  # Untrimmed sets of 1,792 + 8,960 + 20,000 slots.
  sizes = sampler.fit_set_sizes(device_graph, batch, seed=0, **kwargs)
  assert sizes is not None and list(sizes) == sorted(sizes)
  for seed in range(5):  # Batches the fit did not see, drawn as an epoch's shuffle draws them.
    key = jax.random.PRNGKey(100 + seed)
    edge_ids = jax.random.permutation(key, graph.num_edges)[:batch]
    blocks, _ = sampler.sample_blocks(
        device_graph, edge_ids, sampler.example_keys(key, jnp.arange(batch)), key,
        graph_lib.empty_marks(graph.num_nodes), **kwargs)
    full_sizes = [m.shape[0] for m in blocks.masks] + [blocks.nodes.shape[0]]
    assert all(int(c) <= s <= f for c, s, f in zip(blocks.counts, sizes, full_sizes))
  # Aligned where trimmed, and a real saving (S_0 may stay full: most of a batch's targets differ).
  assert all(s % 128 == 0 or s == f for s, f in zip(sizes, full_sizes))
  assert sum(sizes) < 0.9 * sum(full_sizes)
  # Sets too small to repay the fit and a wait per step: not even sampled.
  small, _ = _random_graph()
  assert sampler.fit_set_sizes(graph_lib.to_device(small), batch, seed=0, **kwargs) is None
  # Sets big enough (6,000 + 6,000 + 6,000 slots) but nearly full: a batch of 2,048 edges reaches
  # almost every node of a 6,000-node graph.
  dense, _ = _random_graph(num_users=3500, num_items=2500, num_pairs=40000, seed=3)
  assert sampler.fit_set_sizes(graph_lib.to_device(dense), 2048, seed=0, **kwargs) is None
