"""Deterministic encoding of every user and item with full-neighbour means.

Training samples neighbours; serving uses all of them, GraphSAGE-style. The neighbour sums run over
fixed-size edge chunks inside one jitted loop, so memory stays at O(nodes × width + chunk × width)
however many edges the graph has, and one shape compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.model import network as model_lib
from hashgnn_jax.train import state as state_lib
from hashgnn_jax.train import tables


@functools.partial(jax.jit, static_argnames=("num_nodes", "edge_chunk"))
def _chunked_neighbour_sums(x, senders, receivers, *, num_nodes, edge_chunk):
  """Full-graph `model.neighbour_sums` over the CSR's edges [2E], one edge chunk at a time.

  The arrays are the graph's own (`indices`, `edge_rows`), not padded copies: the last chunk ends
  at the last edge and gives weight 0 to the edges of the one before that it reads again.
  """
  num_edges = senders.shape[0]
  sums = jnp.zeros((num_nodes, x.shape[1]), x.dtype)
  degree = jnp.zeros((num_nodes,), x.dtype)
  if num_edges == 0:
    return sums, degree
  chunk = min(edge_chunk, num_edges)
  offsets = jnp.arange(chunk, dtype=jnp.int32)

  def body(i, carry):
    first = i * chunk
    start = jnp.minimum(first, num_edges - chunk)
    window = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk)
    weights = (start + offsets >= first).astype(x.dtype)  # 0 on edges already summed.
    s, d = model_lib.neighbour_sums(x, window(senders), window(receivers), weights, num_nodes)
    return carry[0] + s, carry[1] + d

  return jax.lax.fori_loop(0, -(-num_edges // chunk), body, (sums, degree))


@functools.partial(jax.jit, static_argnames=("model", "method", "layer", "row_chunk"))
def _apply_by_rows(model: model_lib.HashGNN, params, *rows, method: str, layer: int | None,
                   row_chunk: int):
  """HashGNN.<method> over chunks of `row_chunk` rows of its [N, ...] arguments: [N, F].

  Row by row the layers are independent, so only chunk-sized intermediates exist: whole, the
  mean and the Dense's input were each another [N, width] array (2.4 GB at Alibaba size).
  """
  fn = getattr(model_lib.HashGNN, method)
  extra = () if layer is None else (layer,)
  apply = lambda *window: model.apply({"params": params}, *extra, *window, method=fn)
  num_rows = rows[0].shape[0]
  size = min(row_chunk, num_rows)
  out = jax.eval_shape(apply, *(jax.ShapeDtypeStruct((size,) + a.shape[1:], a.dtype)
                                for a in rows))
  out = jnp.zeros((num_rows,) + out.shape[1:], out.dtype)

  def chunk(start, size, out):
    window = (jax.lax.dynamic_slice_in_dim(a, start, size) for a in rows)
    return jax.lax.dynamic_update_slice_in_dim(out, apply(*window), start, 0)

  num_full = num_rows // size
  out = jax.lax.fori_loop(0, num_full, lambda i, out: chunk(i * size, size, out), out)
  if num_rows % size:  # The last, shorter chunk has a shape of its own.
    out = chunk(num_full * size, num_rows % size, out)
  return out


def encode_nodes(model: model_lib.HashGNN, params, graph: graph_lib.BipartiteGraph, *,
                 edge_chunk: int, row_chunk: int = 1 << 16) -> np.ndarray:
  """Continuous codes z of all nodes (users first, then items): [N, K] float32."""
  num_nodes = graph.num_nodes
  if len(graph.indices) >= 2**31:
    raise ValueError("More than 2**31 directed edges do not fit int32 indices.")
  senders = jnp.asarray(graph.indices)  # [2E]
  receivers = jnp.asarray(graph.edge_rows)  # [2E]

  by_rows = functools.partial(_apply_by_rows, model, params, row_chunk=row_chunk)
  x = model.apply({"params": params}, method=model_lib.HashGNN.embed_all)  # [N, D]
  # lightgcn's senders scale by degree before the sums; its mean over layers is kept as a
  # running sum (a list would hold L + 1 tables).
  lightgcn = model.lightgcn_layers
  degree = jnp.asarray(np.diff(graph.indptr), jnp.float32) if lightgcn else None  # [N]
  total = x if lightgcn else None
  for layer in range(model.num_layers):
    # Only lightgcn's messages differ from x: another [N, D] pass and buffer otherwise.
    messages = by_rows(x, degree, method="messages", layer=None) if lightgcn else x
    sums, count = _chunked_neighbour_sums(messages, senders, receivers, num_nodes=num_nodes,
                                          edge_chunk=edge_chunk)
    del messages
    # Every neighbour is summed once, so the count is each node's degree in the graph.
    x = by_rows(x, sums, count, count, method="aggregate", layer=layer)
    del sums, count  # Before the next layer's sums exist: 1.2-2.4 GB each at Alibaba size.
    if total is not None:
      total = total + x
  if total is not None:
    x = model.apply({"params": params}, total, x, method=model_lib.HashGNN.readout)
    del total
  z = by_rows(x, jnp.arange(num_nodes, dtype=jnp.int32), method="hash", layer=None)
  return np.asarray(z, np.float32)


def encode_nodes_sharded(model: model_lib.HashGNN, params, graph: graph_lib.BipartiteGraph,
                         rows: tables.RowSharding, *, edge_chunk: int,
                         row_chunk: int = 1 << 16) -> np.ndarray:
  """`encode_nodes` of the sharded layout: params' table is its [n, L, E] blocks on their
  owners (`tables.RowSharding`), and each owner encodes its own rows, every layer's features
  staying in blocks; nothing whole but the returned z [N, K] exists.

  Each owner sums its rows' incoming edges over the same global edge chunks `encode_nodes`
  uses, asking the senders' owners for their rows chunk by chunk (`tables.lookup`, lists of
  the most any chunk asks of one owner, counted here), so a row's sum adds the same values in
  the same order. The codes equal `encode_nodes`' to rounding: mostly to the last bit, but the
  layers' matrix products and fusions run on blocks of L rows, not N, which XLA may order
  differently (1 ulp seen on the CPU).
  Memory per device: its blocks of each layer and [n, C, D] rows a chunk, C <= edge_chunk.
  """
  num_devices, block = rows.num_shards, rows.rows_per_device
  windows = _owner_windows(graph, num_devices, block, edge_chunk)
  senders, receivers, valid, capacity = windows
  place = lambda a: jax.make_array_from_callback(
      a.shape, rows.sharding, lambda index: a[index])  # [n, ...], each row on its owner
  degree = np.zeros((num_devices * block,), np.float32)
  degree[:graph.num_nodes] = np.diff(graph.indptr)
  table, dense = state_lib.split_embedding(params)

  def encode_block(dense, table, senders, receivers, valid, degree):
    # table [L, E]; senders, receivers, valid [W, edge chunk]; degree [L].
    params = state_lib.join_embedding(table, dense)
    by_rows = functools.partial(_apply_by_rows, model, params, row_chunk=row_chunk)
    lightgcn = model.lightgcn_layers
    # From the block as rows: the embedding module itself would insist on the whole table.
    x = model.apply({"params": params}, table, method=model_lib.HashGNN.features)  # [L, D]
    total = x if lightgcn else None
    for layer in range(model.num_layers):
      messages = by_rows(x, degree, method="messages", layer=None) if lightgcn else x

      def chunk(carry, window, messages=messages):
        sent, received, mask = window
        looked, _, _ = tables.lookup(messages, sent, mask, _AXIS, capacity)  # [chunk, D]
        s, d = model_lib.neighbour_sums(looked, jnp.arange(sent.shape[0]), received,
                                        mask.astype(looked.dtype), block)
        return (carry[0] + s, carry[1] + d), None

      start = (jnp.zeros((block, messages.shape[1]), messages.dtype),
               jnp.zeros((block,), messages.dtype))
      (sums, count), _ = jax.lax.scan(chunk, start, (senders, receivers, valid))
      x = by_rows(x, sums, count, count, method="aggregate", layer=layer)
      if total is not None:
        total = total + x
    if total is not None:
      x = model.apply({"params": params}, total, x, method=model_lib.HashGNN.readout)
    node_ids = jax.lax.axis_index(_AXIS) * block + jnp.arange(block, dtype=jnp.int32)
    return by_rows(x, node_ids, method="hash", layer=None)  # [L, K]

  encode = jax.pmap(encode_block, axis_name=_AXIS, in_axes=(None, 0, 0, 0, 0, 0),
                    devices=rows.devices)
  z = encode(dense, table, place(senders), place(receivers), place(valid),
             place(degree.reshape(num_devices, block)))
  return rows.gather(z).astype(np.float32)


_AXIS = "rows"


def _owner_windows(graph: graph_lib.BipartiteGraph, num_devices: int, block: int,
                   edge_chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Each owner's share of `_chunked_neighbour_sums`' edge chunks, for `encode_nodes_sharded`:
  (senders [n, W, chunk] global ids, receivers [n, W, chunk] in the owner's block, valid
  [n, W, chunk], the most senders one chunk of one owner has on one owner).

  Owner d reads the chunks that hold its rows' edges (rows are CSR-sorted, so a run of them)
  at the same windows `_chunked_neighbour_sums` reads, valid where the edge is its rows' and
  not one a shifted last window reads again; W is the most chunks any owner reads.
  """
  indptr, all_senders, all_receivers = graph.indptr, graph.indices, graph.edge_rows
  num_edges = all_senders.shape[0]
  chunk = max(min(edge_chunk, num_edges), 1)
  spans = []
  for owner in range(num_devices):
    first_row = min(owner * block, graph.num_nodes)
    last_row = min((owner + 1) * block, graph.num_nodes)
    begin, end = int(indptr[first_row]), int(indptr[last_row])
    spans.append((first_row, begin, end,
                  np.arange(begin // chunk, -(-end // chunk)) if end > begin else np.arange(0)))
  num_windows = max(1, max(len(span[3]) for span in spans))
  shape = (num_devices, num_windows, chunk)
  senders, receivers = np.zeros(shape, np.int32), np.full(shape, block, np.int32)
  valid = np.zeros(shape, bool)
  capacity = 1
  for owner, (first_row, begin, end, chunks) in enumerate(spans):
    if not len(chunks):
      continue
    firsts = chunks[:, None] * chunk
    edges = np.minimum(firsts, num_edges - chunk) + np.arange(chunk)  # [w, chunk]
    mine = (edges >= firsts) & (edges >= begin) & (edges < end)
    senders[owner, :len(chunks)] = all_senders[edges]
    receivers[owner, :len(chunks)] = np.where(mine, all_receivers[edges] - first_row, block)
    valid[owner, :len(chunks)] = mine
    # Per window, the senders asked of each owner.
    keys = np.arange(len(chunks))[:, None] * num_devices + all_senders[edges] // block
    capacity = max(capacity, int(np.bincount(keys[mine]).max()))
  return senders, receivers, valid, capacity
