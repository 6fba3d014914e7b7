"""Deterministic encoding of every user and item with full-neighbour means.

Training samples neighbours; serving uses all of them, GraphSAGE-style. The neighbour sums run over
fixed-size edge chunks inside one jitted loop, so memory stays at O(nodes × width + chunk × width)
however many edges the graph has, and one shape compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hashgnn_jax import graph as graph_lib
from hashgnn_jax import model as model_lib


@functools.partial(jax.jit, static_argnames=("edge_chunk", "num_nodes"))
def _chunked_neighbour_sums(x, senders, receivers, weights, *, edge_chunk, num_nodes):
  """Full-graph `model.neighbour_sums` over padded edge arrays, one chunk at a time."""
  num_chunks = senders.shape[0] // edge_chunk

  def body(i, carry):
    sums, degree = carry
    window = lambda a: jax.lax.dynamic_slice_in_dim(a, i * edge_chunk, edge_chunk)
    s, d = model_lib.neighbour_sums(x, window(senders), window(receivers), window(weights),
                                    num_nodes)
    return sums + s, degree + d

  init = (jnp.zeros((num_nodes, x.shape[1]), x.dtype), jnp.zeros((num_nodes,), x.dtype))
  return jax.lax.fori_loop(0, num_chunks, body, init)


def encode_nodes(model: model_lib.HashGNN, params, graph: graph_lib.BipartiteGraph, *,
                 edge_chunk: int) -> np.ndarray:
  """Continuous codes z of all nodes (users first, then items): [N, K] float32."""
  num_nodes = graph.num_nodes
  num_directed = len(graph.indices)
  padded = max(edge_chunk, -(-num_directed // edge_chunk) * edge_chunk)
  # Padding edges carry weight 0 and point at node 0, so they change nothing.
  senders = np.zeros(padded, np.int32)
  receivers = np.zeros(padded, np.int32)
  weights = np.zeros(padded, np.float32)
  senders[:num_directed] = graph.indices
  receivers[:num_directed] = np.repeat(np.arange(num_nodes, dtype=np.int32), graph.degrees)
  weights[:num_directed] = 1.0
  senders, receivers, weights = map(jnp.asarray, (senders, receivers, weights))

  variables = {"params": params}
  node_ids = jnp.arange(num_nodes, dtype=jnp.int32)
  x = model.apply(variables, node_ids, method=model_lib.HashGNN.embed)
  for layer in range(len(model.hidden_dims)):
    sums, degree = _chunked_neighbour_sums(x, senders, receivers, weights,
                                           edge_chunk=edge_chunk, num_nodes=num_nodes)
    x = model.apply(variables, layer, x, sums, degree, method=model_lib.HashGNN.aggregate)
  z = model.apply(variables, x, node_ids, method=model_lib.HashGNN.hash)
  return np.asarray(z, np.float32)
