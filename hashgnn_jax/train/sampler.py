"""On-device sampling of training batches: positive edges, exact negatives and neighbour trees.

Everything here runs inside the jitted train step from device-resident CSR arrays, so a step
needs no host work. Randomness is keyed by each example's position in the global batch rather
than by device, so a batch samples the same subgraphs whatever the device count.

A batch of b positive edges (u, i), each with T negative items n_1..n_T, has b·(2+T) targets laid
out as [users (b) | positive items (b) | negatives (b·T, example-major)]. Two ways to sample their
neighbourhoods (`config.sampler.mode`):

- "tree" (the authors' code): every target roots its own computation tree, neighbours drawn with
  replacement per hop, so a node reached twice gets two independent samples and is computed twice.
  Cost grows as b·(2+T)·Π(1+fanout) node rows.
- "node" (GraphSAGE minibatch style): the targets are de-duplicated, each distinct node draws one
  set of neighbours per hop (fanouts[0] for the targets, fanouts[1] for the nodes those reach,
  ...), and every layer runs once per distinct node. The draws are a hash of (step, hop, node id),
  so a node samples the same neighbours on every device and the step does not depend on the
  device count. On a catalogue that the batch covers many times over (Gowalla at batch 4096) this
  computes several times fewer rows; on a huge one (Alibaba) it approaches the tree's count.
- "full": no sampling; every layer runs on the whole graph with every neighbour, as evaluation
  encodes (`batch_targets` draws only the targets). O(E · D) a step, whatever the batch.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hashgnn_jax.data import graph as graph_lib


def epoch_order(key: jax.Array, epoch: int | jax.Array, num_edges: int) -> jax.Array:
  """The per-epoch shuffle of training edge ids: [E] int32."""
  return jax.random.permutation(jax.random.fold_in(key, epoch), num_edges).astype(jnp.int32)


def edge_endpoints(graph: graph_lib.DeviceGraph, edge_ids: jax.Array) -> tuple[jax.Array, ...]:
  """(user node id, item node id) of training edges; user rows fill the CSR's first E slots.

  Item rows start at E or later, so a search over the whole indptr lands in a user row; slicing
  indptr to the user rows instead made XLA copy the slice every step.
  """
  items = graph.indices[edge_ids]
  users = jnp.searchsorted(graph.indptr, edge_ids, side="right") - 1
  return users.astype(jnp.int32), items


def sample_neighbours(graph: graph_lib.DeviceGraph, nodes: jax.Array, fanout: int,
                      key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Neighbours of each node drawn uniformly with replacement: [n] -> ([n, fanout], mask).

  A node without neighbours gets itself with mask 0, so aggregation ignores the slot.
  """
  start = graph.indptr[nodes]
  degree = graph.indptr[nodes + 1] - start  # [n]
  offset = jax.random.randint(key, (nodes.shape[0], fanout), 0, jnp.maximum(degree, 1)[:, None])
  neighbours = graph.indices[start[:, None] + offset]
  has_neighbours = (degree > 0)[:, None]
  neighbours = jnp.where(has_neighbours, neighbours, nodes[:, None])
  return neighbours, jnp.broadcast_to(has_neighbours, neighbours.shape)


def sample_negative_items(graph: graph_lib.DeviceGraph, users: jax.Array, num_negatives: int,
                          key: jax.Array) -> jax.Array:
  """Items each user has no training edge with, uniformly and exactly: [b] -> [b, T] node ids.

  Draw r uniformly from [0, I − deg(u)) and return the r-th item missing from u's sorted row.
  With the row's item ids a_0 < a_1 < ..., that item is r + k where k = #{j : a_j − j <= r}; the
  left side is non-decreasing in j, so k comes from a binary search, with no rejection loop.
  A user linked to every item has no negative; it then gets item I−1, a false negative.
  """
  start = graph.indptr[users][:, None]  # [b, 1]
  degree = graph.indptr[users + 1][:, None] - start
  free = jnp.maximum(graph.num_items - degree, 1)
  r = jax.random.randint(key, (users.shape[0], num_negatives), 0, free)  # [b, T]
  lo = jnp.zeros_like(r)
  hi = jnp.broadcast_to(degree, r.shape)

  def search_step(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    active = lo < hi
    item = graph.indices[jnp.where(active, start + mid, 0)] - graph.num_users
    below = active & (item - mid <= r)
    return jnp.where(below, mid + 1, lo), jnp.where(active & ~below, mid, hi)

  lo, _ = jax.lax.fori_loop(0, graph.search_steps, search_step, (lo, hi))
  return jnp.minimum(r + lo, graph.num_items - 1) + graph.num_users


def _targets_major(per_example: jax.Array) -> jax.Array:
  """[b, 2+T, ...] per example -> [b·(2+T), ...] in the [users | positives | negatives] layout."""
  negatives = per_example[:, 2:].reshape((-1,) + per_example.shape[2:])
  return jnp.concatenate([per_example[:, 0], per_example[:, 1], negatives], axis=0)


def example_keys(step_key: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per example from its position in the global batch: [b] -> [b] keys."""
  return jax.vmap(lambda p: jax.random.fold_in(step_key, p))(positions)


def batch_roots(graph: graph_lib.DeviceGraph, edge_ids: jax.Array, keys: jax.Array,
                num_negatives: int) -> tuple[jax.Array, jax.Array]:
  """Each example's (user, positive item, T negatives) and a key left for its neighbours.

  edge_ids [b], keys [b] -> (roots [b, 2+T] node ids, keys [b]).
  """
  users, items = edge_endpoints(graph, edge_ids)
  neg_keys, tree_keys = jnp.split(jax.vmap(lambda k: jax.random.split(k, 2))(keys), 2, axis=1)
  negatives = jax.vmap(
      lambda u, k: sample_negative_items(graph, u[None], num_negatives, k)[0])(users,
                                                                                neg_keys[:, 0])
  roots = jnp.concatenate([users[:, None], items[:, None], negatives], axis=1)  # [b, 2+T]
  return roots, tree_keys[:, 0]


def batch_targets(graph: graph_lib.DeviceGraph, edge_ids: jax.Array, keys: jax.Array,
                  num_negatives: int) -> jax.Array:
  """The targets alone, with no neighbours drawn ("full" mode: the step reads the whole graph).

  edge_ids [b], keys [b] -> [b·(2+T)] node ids in the [users | positives | negatives] layout.
  """
  return _targets_major(batch_roots(graph, edge_ids, keys, num_negatives)[0])


def sample_batch(graph: graph_lib.DeviceGraph, edge_ids: jax.Array, keys: jax.Array, *,
                 fanouts: tuple[int, ...], num_negatives: int) -> graph_lib.GraphsTuple:
  """Samples the computation trees of b positive edges and their negatives ("tree" mode).

  edge_ids [b] and per-example keys [b] -> a `sampled_tree_graph` over b·(2+T) targets, whose
  `nodes` are node ids and `edges` the neighbour masks.
  """
  roots, tree_keys = batch_roots(graph, edge_ids, keys, num_negatives)

  # Each example draws its own trees so the draws do not depend on how the batch is split.
  def draw_tree(root_ids, key):
    hop, ids, masks = root_ids, [root_ids], []
    for depth, fanout in enumerate(fanouts):
      nbrs, mask = sample_neighbours(graph, hop.reshape(-1), fanout,
                                     jax.random.fold_in(key, depth))
      hop = nbrs.reshape(hop.shape + (fanout,))
      ids.append(hop)
      masks.append(mask.reshape(hop.shape))
    return ids, masks

  ids, masks = jax.vmap(draw_tree)(roots, tree_keys)  # per hop: [b, 2+T, f1, ..., fh]
  node_ids = jnp.concatenate([_targets_major(x).reshape(-1) for x in ids])
  edge_mask = jnp.concatenate([_targets_major(m).reshape(-1) for m in masks])
  return graph_lib.sampled_tree_graph(node_ids, edge_mask, roots.size, tuple(fanouts))


class NodeBlocks(NamedTuple):
  """A "node"-mode sample: nested sets of distinct nodes and their sampled neighbours.

  Set 0 holds the distinct targets, set h+1 holds set h followed by the new nodes its hop-h
  neighbours reach, so every set is a prefix of the next. Sets are padded to static sizes; padding
  slots have id num_nodes and valid False.
  """

  nodes: jax.Array  # [S_H] int32: the deepest set, whose embeddings feed the first layer.
  valid: jax.Array  # [S_H] bool.
  neighbours: tuple[jax.Array, ...]  # Per hop h: [S_h, fanouts[h]] slots in set h+1.
  masks: tuple[jax.Array, ...]  # Per hop h: [S_h, fanouts[h]] bool; False for no neighbour.
  targets: jax.Array  # [b·(2+T)] slot of each target in set 0, in the targets-major layout.
  counts: jax.Array  # [H+1] int32: the valid slots of sets 0..H, which come first in each.
  # bool scalar: every set held all its distinct nodes. Always true unless `sample_blocks` was
  # given sizes; when false, the nodes past a set's size are missing and the sample is unusable.
  complete: jax.Array


def _mix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit over the output."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _counter_hash(counter: jax.Array, seed: jax.Array) -> jax.Array:
  """32 random-looking bits per uint32 counter, for a uint32 seed: the draws of a step."""
  return _mix32(_mix32(counter ^ seed))


def hashed_neighbours(graph: graph_lib.DeviceGraph, nodes: jax.Array, valid: jax.Array,
                      fanout: int, seed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`fanout` neighbours per node with replacement, a function of (seed, node id, slot) only.

  nodes, valid [n], seed uint32 scalar -> (neighbour ids [n, fanout], mask [n, fanout]). A
  counter hash instead of a key per node: vmapped threefry keys took 225 ms for the offsets of
  300k nodes x 5 on CPU, against 34 ms for this whole draw.
  The modulo's bias is below degree / 2**32.
  """
  nodes = jnp.where(valid, nodes, 0)
  start = graph.indptr[nodes]
  degree = graph.indptr[nodes + 1] - start  # [n]
  slot = jnp.arange(fanout, dtype=jnp.uint32)
  x = nodes.astype(jnp.uint32)[:, None] * jnp.uint32(0x9E3779B1) + slot * jnp.uint32(0x632BE5AB)
  r = _counter_hash(x, seed)  # [n, fanout]
  offset = (r % jnp.maximum(degree, 1).astype(jnp.uint32)[:, None]).astype(jnp.int32)
  neighbours = graph.indices[start[:, None] + offset]
  mask = ((degree > 0) & valid)[:, None]
  neighbours = jnp.where(mask, neighbours, nodes[:, None])
  return neighbours, jnp.broadcast_to(mask, neighbours.shape)


def sample_blocks(graph: graph_lib.DeviceGraph, edge_ids: jax.Array, keys: jax.Array,
                  step_key: jax.Array, marks: jax.Array, *, fanouts: tuple[int, ...],
                  num_negatives: int, sizes: tuple[int, ...] | None = None
                  ) -> tuple[NodeBlocks, jax.Array]:
  """Samples b positive edges, their negatives and the nodes' neighbourhoods ("node" mode).

  edge_ids [b], per-example keys [b] (for negatives), the step's key (for neighbours, shared by
  all devices) and `graph_lib.unique_nodes` marks -> (NodeBlocks, marks). Set sizes are bounded
  by the graph's node count, so a catalogue smaller than the batch's reach costs no more than
  the catalogue. `sizes` (one per set, from `fit_set_sizes`) bounds them further; a batch whose
  sets do not fit comes back with `complete` false.
  """
  roots, _ = batch_roots(graph, edge_ids, keys, num_negatives)
  targets = _targets_major(roots)  # [b·(2+T)]
  num_nodes = graph.num_nodes
  bounds = sizes or _untrimmed_sizes(targets.shape[0], fanouts, num_nodes)

  def distinct(ids, valid, bound, marks):
    size = min(ids.shape[0], num_nodes, bound)
    unique, unique_valid, slots, new_marks = graph_lib.unique_nodes(ids, valid, size, marks)
    # A node past the size has a slot past it too.
    fits = jnp.all(jnp.where(valid, slots < size, True))
    return unique, unique_valid, slots, new_marks, fits

  nodes, valid, target_slots, marks, complete = distinct(
      targets, jnp.ones(targets.shape, bool), bounds[0], marks)
  neighbours, masks, counts = [], [], [jnp.sum(valid, dtype=jnp.int32)]
  for hop, fanout in enumerate(fanouts):
    seed = jax.random.bits(jax.random.fold_in(step_key, hop), (), jnp.uint32)
    hop_nodes, mask = hashed_neighbours(graph, nodes, valid, fanout, seed)  # [S_h, f]
    size = nodes.shape[0]
    candidates = jnp.concatenate([nodes, hop_nodes.reshape(-1)])
    # Set h keeps its slots: its valid ids come first and are distinct.
    nodes, valid, slots, marks, fits = distinct(
        candidates, jnp.concatenate([valid, mask.reshape(-1)]), bounds[hop + 1], marks)
    complete &= fits
    neighbours.append(slots[size:].reshape(size, fanout))
    masks.append(mask)
    counts.append(jnp.sum(valid, dtype=jnp.int32))
  blocks = NodeBlocks(nodes=nodes, valid=valid, neighbours=tuple(neighbours),
                      masks=tuple(masks), targets=target_slots, counts=jnp.stack(counts),
                      complete=complete)
  return blocks, marks


# Fitted set sizes: the largest count seen while fitting, times this, rounded up to a multiple of
# _SET_SIZE_ALIGN. Counts vary little between batches (Gowalla-size graph, batch 4096: the
# targets' distinct count was 21,206-21,244 over three batches), and a batch that does not fit
# costs one more step, untrimmed (`train.step.make_stepper`).
_SET_SIZE_MARGIN = 1.03
_SET_SIZE_ALIGN = 128
# Trimming costs a fit (~5 s on the 2-core CPU, mostly compiling the sampler) and a host wait per
# step (`train.step.make_stepper`), so it is kept for steps big enough to repay that: at least this
# saving in summed set sizes, from sets of at least this many slots. The default job (11,792
# slots, a 12% saving) trained in 73-78 s trimmed against 53 s untrimmed; at MovieLens size (the
# benchmark configuration; 21,284 and 29,238 slots, savings of 25% and 17%) trimmed steps took
# 14.5 / 36.6 ms against 17.3 / 43.8 at batch 256 / 4096, in the same process.
_MIN_TRIM_SAVING = 0.1
_MIN_TRIM_SLOTS = 1 << 14
_FIT_BATCHES = 4


def _untrimmed_sizes(num_targets: int, fanouts: tuple[int, ...], num_nodes: int) -> list[int]:
  """`sample_blocks`'s set sizes without `sizes`: each set's candidates, at most num_nodes."""
  sizes = [min(num_targets, num_nodes)]
  for fanout in fanouts:
    sizes.append(min(sizes[-1] * (1 + fanout), num_nodes))
  return sizes


def fit_samples(graph: graph_lib.DeviceGraph, batch_size: int, *, fanouts: tuple[int, ...],
                num_negatives: int, seed: int) -> list[NodeBlocks]:
  """A few untrimmed `sample_blocks` samples of `batch_size` uniformly drawn edges (seeded, on
  the graph's first device), as host arrays: what static sizes are fitted on."""
  graph = jax.tree.map(lambda a: a.addressable_data(0), graph)  # One copy, not one per device.
  # The graph as an argument: closed over, its arrays would be compiled in as constants.
  sample = jax.jit(lambda graph, edge_ids, key, marks: sample_blocks(
      graph, edge_ids, example_keys(key, jnp.arange(batch_size)), key, marks, fanouts=fanouts,
      num_negatives=num_negatives))
  marks = graph_lib.empty_marks(graph.num_nodes)
  samples = []
  for key in jax.random.split(jax.random.PRNGKey(seed), _FIT_BATCHES):
    edge_ids = jax.random.randint(jax.random.fold_in(key, 0), (batch_size,), 0,
                                  graph.indices.shape[0] // 2)
    blocks, marks = sample(graph, edge_ids, key, marks)
    samples.append(jax.device_get(blocks))
  return samples


def untrimmed_rows(batch_size: int, *, fanouts: tuple[int, ...], num_negatives: int,
                   num_nodes: int) -> int:
  """The embedding rows an untrimmed `sample_blocks` sample of `batch_size` edges reads (its
  deepest set's size)."""
  return _untrimmed_sizes(batch_size * (2 + num_negatives), fanouts, num_nodes)[-1]


def fit_set_sizes(graph: graph_lib.DeviceGraph, batch_size: int, *, fanouts: tuple[int, ...],
                  num_negatives: int, seed: int, draw=None) -> tuple[int, ...] | None:
  """Static `sample_blocks` sizes that hold the sets of typical batches of `batch_size` edges.

  Keeps, per set, the largest count over `fit_samples` plus a margin, non-decreasing and at
  most the untrimmed size. None when that saves under `_MIN_TRIM_SAVING` of the summed set
  sizes (the catalogue is about as small as a batch's reach, so the sets are full anyway), or,
  without sampling, when the untrimmed sets hold under `_MIN_TRIM_SLOTS` slots. draw: a
  function returning those samples, for a caller that fits other sizes on the same ones.
  """
  full = _untrimmed_sizes(batch_size * (2 + num_negatives), fanouts, graph.num_nodes)
  if sum(full) < _MIN_TRIM_SLOTS:
    return None
  samples = draw() if draw else fit_samples(graph, batch_size, fanouts=fanouts,
                                            num_negatives=num_negatives, seed=seed)
  most = np.max([np.asarray(blocks.counts) for blocks in samples], axis=0)
  sizes = np.ceil(most * _SET_SIZE_MARGIN / _SET_SIZE_ALIGN).astype(int) * _SET_SIZE_ALIGN
  sizes = np.minimum(np.maximum.accumulate(sizes), full)
  if sizes.sum() > (1 - _MIN_TRIM_SAVING) * sum(full):
    return None
  return tuple(int(size) for size in sizes)


def draw_keep_continuous(seed: jax.Array, positions: jax.Array, p: jax.Array, *,
                         num_negatives: int, width: int, share_positive: bool) -> jax.Array:
  """Guidance mask Q ~ Bernoulli(p) per target: positions [b] -> bool [b·(2+T), width].

  width is K (one draw per bit) or 1 (one per node). With `share_positive` a user and its
  positive item use one draw, as the authors' code does. Each draw hashes (seed uint32 scalar,
  the example's position in the global batch, target, bit), as `hashed_neighbours` does, so it
  does not depend on the device count; vmapped threefry keys took 6-9 ms for the 917k draws of
  batch 4096 at K = 32 on CPU, this 0.6 ms. p resolves to 2**-24.
  """
  q = _example_uniforms(seed, positions, num_negatives=num_negatives, width=width) < p
  if share_positive:
    q = q.at[:, 1].set(q[:, 0])
  return _targets_major(q)


def _example_uniforms(seed: jax.Array, positions: jax.Array, *, num_negatives: int,
                      width: int) -> jax.Array:
  """Uniforms in [0, 1) on a 2**-24 grid per (example, target, slot): [b, 2+T, width]."""
  rows = 2 + num_negatives
  counter = (positions.astype(jnp.uint32)[:, None, None] * jnp.uint32(rows * width)
             + jnp.arange(rows, dtype=jnp.uint32)[:, None] * jnp.uint32(width)
             + jnp.arange(width, dtype=jnp.uint32))  # [b, 2+T, width], distinct below 2**32
  return (_counter_hash(counter, seed) >> 8).astype(jnp.float32) * 2.0**-24


def target_uniforms(seed: jax.Array, positions: jax.Array, *, num_negatives: int,
                    width: int) -> jax.Array:
  """Uniform draws in [0, 1) for every target row of a batch: positions [b] ->
  [b·(2+T), width], hashed from (seed, position in the global batch, target, slot) as the
  guidance mask is, so they do not depend on the device count."""
  return _targets_major(
      _example_uniforms(seed, positions, num_negatives=num_negatives, width=width))
