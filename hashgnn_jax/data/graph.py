"""The bipartite interaction graph in CSR form, and the one place that imports jraph.

Node ids: users are 0..U-1 and items are U..U+I-1, so one embedding table and one CSR cover both
sides. jraph is frozen upstream (last release 2022); keeping every use of it in this module means a
later swap touches one file.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import jraph
import numpy as np

GraphsTuple = jraph.GraphsTuple
segment_sum = jraph.segment_sum


@dataclasses.dataclass(frozen=True)
class BipartiteGraph:
  """Host-side CSR adjacency of the training edges, both directions, rows sorted."""

  num_users: int
  num_items: int
  indptr: np.ndarray  # [N + 1] int64 offsets into `indices`.
  indices: np.ndarray  # [2E] int32 neighbour node ids, ascending within each row.

  @property
  def num_nodes(self) -> int:
    return self.num_users + self.num_items

  @property
  def num_edges(self) -> int:
    """Undirected training edges (each appears twice in `indices`)."""
    return len(self.indices) // 2

  @functools.cached_property
  def degrees(self) -> np.ndarray:
    """Neighbours per node [N] int64, computed once: every evaluation chunk reads them."""
    degrees = np.diff(self.indptr)
    degrees.flags.writeable = False  # Shared by every caller.
    return degrees

  @functools.cached_property
  def edge_rows(self) -> np.ndarray:
    """The row (receiving node) of each entry of `indices`: [2E] int32, sorted.

    Built once per graph, since full-graph encoding reads it at every evaluation (57M entries at
    Alibaba size); finding rows by binary search in `indptr` on the device instead cost 35% more
    encoding time on the CPU.
    """
    rows = np.repeat(np.arange(self.num_nodes, dtype=np.int32), self.degrees)
    rows.flags.writeable = False
    return rows

  @functools.cached_property
  def max_user_degree(self) -> int:
    """The most training items any user has (0 without users)."""
    return int(self.degrees[:self.num_users].max(initial=0))

  def item_degrees(self) -> np.ndarray:
    """Training interactions per item: the popularity baseline's score."""
    return self.degrees[self.num_users:]

  def user_items(self, user: int) -> np.ndarray:
    """Training item ids (0-based item ids, not node ids) of one user."""
    return self.indices[self.indptr[user]:self.indptr[user + 1]] - self.num_users

  def padded_user_items(self, users: np.ndarray) -> np.ndarray:
    """Training item ids of `users` as one [len(users), max user degree] array, -1 padded."""
    width = max(self.max_user_degree, 1)
    starts, ends = self.indptr[users], self.indptr[users + 1]
    offsets = np.arange(width)
    positions = starts[:, None] + offsets[None, :]  # [C, width]
    valid = positions < ends[:, None]
    positions = np.where(valid, positions, 0)
    return np.where(valid, self.indices[positions] - self.num_users, -1)


def build_graph(users: np.ndarray, items: np.ndarray, num_users: int,
                num_items: int) -> BipartiteGraph:
  """CSR of unique (user, item) training pairs, users linked to items and back."""
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  if users.shape != items.shape:
    raise ValueError(f"users {users.shape} and items {items.shape} must have one shape.")
  if len(users) and (users.min() < 0 or users.max() >= num_users):
    raise ValueError(f"user ids must lie in [0, {num_users}).")
  if len(items) and (items.min() < 0 or items.max() >= num_items):
    raise ValueError(f"item ids must lie in [0, {num_items}).")
  num_nodes = num_users + num_items
  src = np.concatenate([users, items + num_users])
  dst = np.concatenate([items + num_users, users])
  order = np.lexsort((dst, src))
  src, dst = src[order], dst[order]
  if len(src) > 1 and np.any((src[1:] == src[:-1]) & (dst[1:] == dst[:-1])):
    raise ValueError("Training pairs must be unique; found a repeated (user, item) pair.")
  indptr = np.zeros(num_nodes + 1, np.int64)
  np.cumsum(np.bincount(src, minlength=num_nodes), out=indptr[1:])
  return BipartiteGraph(num_users, num_items, indptr, dst.astype(np.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceGraph:
  """The CSR as device arrays, plus the static facts the jitted sampler needs."""

  indptr: jax.Array  # [N + 1] int32.
  indices: jax.Array  # [2E] int32.
  num_users: int = dataclasses.field(metadata=dict(static=True))
  num_items: int = dataclasses.field(metadata=dict(static=True))
  # Binary-search depth for the negative sampler: enough for the largest user row.
  search_steps: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_nodes(self) -> int:
    return self.num_users + self.num_items


def node_degrees(graph: DeviceGraph, nodes: jax.Array) -> jax.Array:
  """Degrees in the graph of node ids [n], padding ids (num_nodes) giving 0: [n] int32."""
  last = graph.num_nodes
  return graph.indptr[jnp.minimum(nodes + 1, last)] - graph.indptr[jnp.minimum(nodes, last)]


def edge_receivers(graph: DeviceGraph) -> jax.Array:
  """The row (receiving node) of each CSR entry, ascending: [2E] int32."""
  return jnp.repeat(jnp.arange(graph.num_nodes, dtype=jnp.int32), jnp.diff(graph.indptr),
                    total_repeat_length=graph.indices.shape[0])


def to_device(graph: BipartiteGraph, sharding: jax.sharding.Sharding | None = None) -> DeviceGraph:
  """Places the CSR on device(s) once; the train step reads it without host work."""
  if len(graph.indices) >= 2**31:
    raise ValueError("More than 2**31 directed edges do not fit int32 indices.")
  return DeviceGraph(
      indptr=jax.device_put(graph.indptr.astype(np.int32), sharding),
      indices=jax.device_put(graph.indices, sharding),
      num_users=graph.num_users,
      num_items=graph.num_items,
      search_steps=max(1, int(np.ceil(np.log2(graph.max_user_degree + 1)))),
  )


def sampled_tree_graph(node_ids: jax.Array, edge_mask: jax.Array, num_targets: int,
                       fanouts: tuple[int, ...]) -> GraphsTuple:
  """Wraps sampled computation trees as one GraphsTuple with a fixed, receiver-sorted layout.

  Node slots are [targets | hop-1 | hop-2 | ...], hop h holding num_targets × Π fanouts[:h]
  slots, each a sampled neighbour of its parent slot in hop h-1. Edges run child → parent and are
  ordered by parent, so the edges a layer needs are always a prefix (see `layer_sizes`).
  Masked edges (edge_mask 0) stand for neighbours of a node without any.
  """
  senders, receivers = [], []
  parents = num_targets
  first_parent = 0
  for fanout in fanouts:
    children = parents * fanout
    first_child = first_parent + parents
    senders.append(np.arange(first_child, first_child + children))
    receivers.append(np.repeat(np.arange(first_parent, first_parent + parents), fanout))
    first_parent, parents = first_child, children
  senders = np.concatenate(senders).astype(np.int32)
  receivers = np.concatenate(receivers).astype(np.int32)
  return GraphsTuple(
      nodes=node_ids,
      edges=edge_mask,
      senders=jnp.asarray(senders),
      receivers=jnp.asarray(receivers),
      n_node=jnp.asarray([node_ids.shape[0]], jnp.int32),
      n_edge=jnp.asarray([len(senders)], jnp.int32),
      globals=None,
  )


def layer_sizes(num_targets: int, fanouts: tuple[int, ...]) -> list[tuple[int, int]]:
  """(output nodes, input edges) for each GNN layer over a `sampled_tree_graph`.

  With L layers, layer l (0-based) must produce outputs for hops 0..L-1-l; its input edges are
  those whose receiver is one of them, a prefix of the edge list.
  """
  hop_sizes = [num_targets]
  for fanout in fanouts:
    hop_sizes.append(hop_sizes[-1] * fanout)
  sizes = []
  for layer in range(len(fanouts)):
    kept_hops = len(fanouts) - layer
    sizes.append((sum(hop_sizes[:kept_hops]), sum(hop_sizes[1:kept_hops + 1])))
  return sizes


# An empty slot of the marks array `unique_nodes` keeps between calls.
EMPTY_MARK = np.iinfo(np.int32).max


def empty_marks(num_nodes: int) -> jax.Array:
  """The scratch array of `unique_nodes` for node ids in [0, num_nodes): [num_nodes + 1]."""
  return jnp.full((num_nodes + 1,), EMPTY_MARK, jnp.int32)


def unique_nodes(ids: jax.Array, valid: jax.Array, size: int,
                 marks: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The distinct valid ids in first-occurrence order, padded to a static size.

  ids, valid [n]; marks [N + 1] all `EMPTY_MARK` (see `empty_marks`) -> (unique ids [size],
  padded with N; unique_valid [size]; inverse [n], the slot of each valid id in the unique list,
  0 for invalid entries; marks, all empty again). Every distinct valid id gets a slot when size
  >= their number (min(n, N) always suffices); with a smaller size, those past it get none (their
  inverse is >= size) and the marks are still cleared.

  A scatter-min of positions into the marks finds first occurrences, where a sort of the ids
  (jnp.unique) ran 15x slower on CPU at 300k ids. Only this call's entries are written and then
  cleared, so a caller that keeps `marks` across steps (the train state does) pays O(n), not a
  fresh O(N) array: at Alibaba size, allocating and filling one cost ~40 ms a call on CPU.
  """
  num_nodes = marks.shape[0] - 1
  n = ids.shape[0]
  positions = jnp.arange(n, dtype=jnp.int32)
  keys = jnp.where(valid, ids, num_nodes)  # Invalid entries share the spare slot num_nodes.
  first = marks.at[keys].min(positions)  # [N + 1]
  representative = first[keys]  # [n] position of each id's first occurrence
  is_first = (representative == positions) & valid
  rank = jnp.cumsum(is_first.astype(jnp.int32)) - 1  # [n] slot of each first occurrence
  inverse = jnp.where(valid, rank[representative], 0)
  slots = jnp.where(is_first, rank, size)  # Out of range: dropped.
  unique = jnp.full((size,), num_nodes, jnp.int32).at[slots].set(ids, mode="drop")
  count = jnp.sum(is_first)
  return unique, jnp.arange(size) < count, inverse, first.at[keys].set(EMPTY_MARK)
