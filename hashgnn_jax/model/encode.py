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

  degree = jnp.asarray(np.diff(graph.indptr), jnp.float32) if model.lightgcn_layers else None
  sums = functools.partial(_chunked_neighbour_sums, senders=senders, receivers=receivers,
                           num_nodes=num_nodes, edge_chunk=edge_chunk)
  # The features [N, D] go in unnamed, so that nothing here keeps them past the first layer.
  z = _encode_from_features(
      model, params, model.apply({"params": params}, method=model_lib.HashGNN.embed_all),
      degree, jnp.arange(num_nodes, dtype=jnp.int32), sums, row_chunk=row_chunk)
  return np.asarray(z, np.float32)


def _encode_from_features(model: model_lib.HashGNN, params, x, degree, node_ids,
                          neighbour_sums, *, row_chunk: int):
  """z [R, K] of R nodes from their layer-0 features x [R, D], their degrees [R] (lightgcn
  only; None otherwise) and ids [R]: the layers, each over neighbour_sums(messages [R, D]) ->
  (sums [R, D], counts [R]) of every neighbour once, then the hash layer. The whole graph's
  rows (`encode_nodes`) or one owner's block (`encode_nodes_sharded`)."""
  by_rows = functools.partial(_apply_by_rows, model, params, row_chunk=row_chunk)
  # lightgcn's senders scale by degree before the sums; its mean over layers is kept as a
  # running sum (a list would hold L + 1 tables).
  total = x if model.lightgcn_layers else None
  for layer in range(model.num_layers):
    # Only lightgcn's messages differ from x: another [R, D] pass and buffer otherwise.
    messages = by_rows(x, degree, method="messages", layer=None) if degree is not None else x
    sums, count = neighbour_sums(messages)
    del messages
    # Every neighbour is summed once, so the count is each node's degree in the graph.
    x = by_rows(x, sums, count, count, method="aggregate", layer=layer)
    del sums, count  # Before the next layer's sums exist: 1.2-2.4 GB each at Alibaba size.
    if total is not None:
      total = total + x
  if total is not None:
    x = model.apply({"params": params}, total, x, method=model_lib.HashGNN.readout)
    del total
  return by_rows(x, node_ids, method="hash", layer=None)


def encode_nodes_sharded(model: model_lib.HashGNN, params, graph: graph_lib.BipartiteGraph,
                         rows: tables.RowSharding, *, edge_chunk: int,
                         row_chunk: int = 1 << 16) -> np.ndarray:
  """`encode_nodes` of the sharded layout: params' table is its [n, L, E] blocks on their
  owners (`tables.RowSharding`), and each owner encodes its own rows, every layer's features
  staying in blocks; nothing whole but the returned z [N, K] exists.

  Each owner sums its rows' incoming edges in windows of edge_chunk / n edges, asking the
  senders' owners for their rows window by window (`tables.lookup`, lists as long as the most
  one window asks of one owner, counted here, so they cannot overflow). The codes equal
  `encode_nodes`' to rounding (the sums are grouped by other chunks, and the layers' products
  run on L rows rather than N). Memory per device: its blocks of each layer's features and the
  [n, C, D] rows of one window, n·C <= edge_chunk.
  """
  encode, graph_inputs = sharded_encoder(model, graph, rows, edge_chunk=edge_chunk,
                                         row_chunk=row_chunk)
  table, dense = state_lib.split_embedding(params)
  return rows.gather(encode(dense, table, *graph_inputs)).astype(np.float32)


def sharded_encoder(model: model_lib.HashGNN, graph: graph_lib.BipartiteGraph,
                    rows: tables.RowSharding, *, edge_chunk: int, row_chunk: int = 1 << 16):
  """(the pmapped encoder, the graph's inputs to it placed on their owners) behind
  `encode_nodes_sharded`: encode(dense params, table blocks [n, L, E], *graph inputs) -> z
  blocks [n, L, K]. Apart for `bench/sharded_eval.py`, which reads its compiled memory."""
  num_devices, block = rows.num_shards, rows.rows_per_device
  senders, receivers, valid, capacity = _owner_windows(graph, num_devices, block, edge_chunk)
  place = lambda a: jax.make_array_from_callback(
      a.shape, rows.sharding, lambda index: a[index])  # [n, ...], each row on its owner
  degree = np.zeros((num_devices * block,), np.float32)
  degree[:graph.num_nodes] = np.diff(graph.indptr)

  def encode_block(dense, table, senders, receivers, valid, degree):
    # table [L, E]; senders, receivers, valid [W, c]; degree [L].
    params = state_lib.join_embedding(table, dense)

    def neighbour_sums(messages):  # [L, D] -> [L, D], [L]: window by window
      def window(carry, edges):
        sent, received, mask = edges
        looked, _, _ = tables.lookup(messages, sent, mask, _AXIS, capacity)  # [c, D]
        s, d = model_lib.neighbour_sums(looked, jnp.arange(sent.shape[0]), received,
                                        mask.astype(looked.dtype), block)
        return (carry[0] + s, carry[1] + d), None

      start = (jnp.zeros((block, messages.shape[1]), messages.dtype),
               jnp.zeros((block,), messages.dtype))
      return jax.lax.scan(window, start, (senders, receivers, valid))[0]

    # From the block as rows: the embedding module itself would insist on the whole table.
    x = model.apply({"params": params}, table, method=model_lib.HashGNN.features)  # [L, D]
    node_ids = jax.lax.axis_index(_AXIS) * block + jnp.arange(block, dtype=jnp.int32)
    return _encode_from_features(model, params, x, degree if model.lightgcn_layers else None,
                                 node_ids, neighbour_sums, row_chunk=row_chunk)  # [L, K]

  encode = jax.pmap(encode_block, axis_name=_AXIS, in_axes=(None, 0, 0, 0, 0, 0),
                    devices=rows.devices)
  return encode, (place(senders), place(receivers), place(valid),
                  place(degree.reshape(num_devices, block)))


_AXIS = "rows"


def _owner_windows(graph: graph_lib.BipartiteGraph, num_devices: int, block: int,
                   edge_chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Each owner's incoming edges in windows, for `encode_nodes_sharded`: (senders [n, W, c]
  global ids, receivers [n, W, c] in the owner's block (L where unused), valid [n, W, c], the
  most senders one window of one owner has on one owner).

  Owner d's rows are a run of the CSR, so their edges are one run too, cut into windows of
  c = edge_chunk / n: a window's lists to the n owners then hold at most edge_chunk rows in
  all, the buffer `encode_nodes` has per chunk. W is the most windows any owner has.
  """
  indptr, all_senders, all_receivers = graph.indptr, graph.indices, graph.edge_rows
  chunk = max(edge_chunk // num_devices, 1)
  spans = [(int(indptr[min(owner * block, graph.num_nodes)]),
            int(indptr[min((owner + 1) * block, graph.num_nodes)]))
           for owner in range(num_devices)]
  num_windows = max(1, max(-(-(end - begin) // chunk) for begin, end in spans))
  shape = (num_devices, num_windows, chunk)
  senders, receivers = np.zeros(shape, np.int32), np.full(shape, block, np.int32)
  valid = np.zeros(shape, bool)
  capacity = 1
  for owner, (begin, end) in enumerate(spans):
    if end == begin:
      continue
    edges = begin + np.arange(num_windows * chunk).reshape(num_windows, chunk)  # [W, c]
    mine = edges < end
    edges = np.minimum(edges, end - 1)
    senders[owner] = np.where(mine, all_senders[edges], 0)
    receivers[owner] = np.where(mine, all_receivers[edges] - owner * block, block)
    valid[owner] = mine
    # Per window, the senders asked of each owner.
    keys = np.arange(num_windows)[:, None] * num_devices + all_senders[edges] // block
    capacity = max(capacity, int(np.bincount(keys[mine]).max()))
  return senders, receivers, valid, capacity
