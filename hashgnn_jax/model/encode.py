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
