"""HashGNN: ID embeddings, neighbour-mean GNN layers and a hash layer, in Flax Linen.

Linen rather than NNX: the train step is a pure function of (params, opt_state, step) under pmap,
and Linen's params-as-pytree fits that and Orbax's StandardSave with no split/merge round trips.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hashgnn_jax.data import graph as graph_lib


@jax.custom_vjp
def ste_sign(z: jax.Array) -> jax.Array:
  """sign(z) with sign(0) = +1, and an identity (straight-through) gradient."""
  return jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


def _ste_sign_fwd(z):
  return ste_sign(z), None


def _ste_sign_bwd(_, g):
  # The true derivative is zero almost everywhere; passing g through lets the binary code train
  # the continuous one behind it (the paper's straight-through estimator).
  return (g,)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def guided_codes(z: jax.Array, keep_continuous: jax.Array) -> jax.Array:
  """Guidance mix ĥ = Q⊙z + (1−Q)⊙sign(z); Q broadcasts from [T, 1] (node) or [T, K] (element)."""
  q = keep_continuous.astype(z.dtype)
  return q * z + (1.0 - q) * ste_sign(z)


def continuation_codes(logits: jax.Array, beta: jax.Array) -> jax.Array:
  """HashNet's tanh(β a): smooth for β = 1, and sign(a) in the limit of large β."""
  return jnp.tanh(beta * logits)


def gumbel_codes(logits: jax.Array, uniform: jax.Array, tau: jax.Array) -> jax.Array:
  """Relaxed two-way Gumbel-softmax bits over {−1, +1}, E[·] in (−1, 1): [N, K].

  With class logits (a, 0) for (+1, −1), the relaxed sample softmax((a + g₊, g₋)/τ) · (+1, −1)
  equals tanh((a + g₊ − g₋) / 2τ), and g₊ − g₋ of two standard Gumbels is a standard logistic
  draw, log(u) − log(1 − u) for u uniform in (0, 1): one draw per bit, not two. Its hard sample
  is +1 with probability σ(a) at every τ; evaluation takes the most probable bit, sign(a).
  """
  noise = jnp.log(uniform) - jnp.log1p(-uniform)
  return jnp.tanh((logits + noise) / (2.0 * tau))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gather_sum(num_rows: int, x: jax.Array, neighbours: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ_j x[neighbours[s, j]] over the slots with mask[s, j]: x [num_rows, D], [S, f] -> [S, D].

  One 1-D gather per slot j, and in the backward pass one accumulator that every slot
  scatter-adds into: XLA's CPU gather with a 2-D index array ran 15x slower than the f 1-D ones
  at 70k x 5 x 64, and autodiff's f separate scatters plus their sum 3x slower than chaining.
  """
  del num_rows
  return sum(jnp.where(mask[:, j, None], x[neighbours[:, j]], 0) for j in range(mask.shape[1]))


def _gather_sum_fwd(num_rows, x, neighbours, mask):
  return gather_sum(num_rows, x, neighbours, mask), (neighbours, mask)


def _gather_sum_bwd(num_rows, residuals, g):
  neighbours, mask = residuals
  # Masked slots scatter to an out-of-range row, which is dropped, so every slot adds g itself:
  # a scatter whose updates are computed (g times a 0/1 weight) ran 3-4x slower on CPU.
  targets = jnp.where(mask, neighbours, num_rows)  # [S, f]
  dx = jnp.zeros((num_rows, g.shape[1]), g.dtype)
  for j in range(targets.shape[1]):
    dx = dx.at[targets[:, j]].add(g, mode="drop")
  # Neighbour slots and masks are sampled, not learned: no cotangents.
  return dx, None, None


gather_sum.defvjp(_gather_sum_fwd, _gather_sum_bwd)


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
  """x itself, written to a buffer of its own: [N, D] -> [N, D].

  XLA:CPU fuses the gather that produces layer-0 rows (table[ids]) into the neighbour sums that
  read them, and so recomputes table[ids[neighbours[s, j]]] for each of the D columns; it strips
  `optimization_barrier`, but does not fuse a scatter into its consumers. An identity scatter
  keeps the rows in their own buffer: the Gowalla/4096 step 15-20% faster on the 2-core CPU,
  results the same bit for bit.
  """
  slots = jnp.arange(x.shape[0], dtype=jnp.int32)
  return jnp.zeros_like(x).at[slots].set(x, unique_indices=True, indices_are_sorted=True)


# The identity's cotangent is g itself; the scatter's own VJP would gather it, a pass for nothing.
materialize.defvjp(lambda x: (materialize(x), None), lambda _, g: (g,))


def neighbour_sums(x_src: jax.Array, senders: jax.Array, receivers: jax.Array,
                   weights: jax.Array, num_dst: int) -> tuple[jax.Array, jax.Array]:
  """Weighted sum of incoming neighbour features and the weighted in-degree of each node.

  x_src [S, D]; senders, receivers, weights [E]; returns ([num_dst, D], [num_dst]).
  """
  messages = x_src[senders] * weights[:, None].astype(x_src.dtype)  # [E, D]
  sums = graph_lib.segment_sum(messages, receivers, num_segments=num_dst)
  degree = graph_lib.segment_sum(weights.astype(x_src.dtype), receivers, num_segments=num_dst)
  return sums, degree


def tree_neighbour_sums(x_src: jax.Array, edge_mask: jax.Array, num_targets: int,
                        fanouts: tuple[int, ...], num_dst: int) -> tuple[jax.Array, jax.Array]:
  """`neighbour_sums` specialised to the fixed layout of `graph_lib.sampled_tree_graph`.

  There the children of each parent slot are the next `fanout` slots of the following hop and
  edge e has sender num_targets + e, so a reshape and a sum replace the gather and scatter-add
  (which XLA runs serially on CPU: 7x slower here at batch 256).
  x_src [S, D]; edge_mask [num_edges] -> ([num_dst, D], [num_dst]).
  """
  sums, degrees = [], []
  parents, first_parent = num_targets, 0
  for fanout in fanouts:
    if first_parent >= num_dst:
      break
    first_child = first_parent + parents
    children = slice(first_child - num_targets, first_child - num_targets + parents * fanout)
    w = edge_mask[children].astype(x_src.dtype).reshape(parents, fanout)
    x = x_src[first_child:first_child + parents * fanout].reshape(parents, fanout, -1)
    sums.append(jnp.sum(x * w[:, :, None], axis=1))
    degrees.append(w.sum(axis=1))
    first_parent, parents = first_child, parents * fanout
  return jnp.concatenate(sums), jnp.concatenate(degrees)


def _kernel_init(init: str):
  if init == "normal":
    return nn.initializers.normal(stddev=0.02)
  return nn.initializers.glorot_uniform()


class MeanAggregator(nn.Module):
  """One neighbour-mean layer; message passing happens outside so encoding can chunk it.

  gcn (paper eq. 1): σ(W · mean({x_v} ∪ N(v))).
  sage (authors' code): σ(W · [x_v ‖ mean(N(v))]), the mean of no neighbours being 0.
  """

  features: int
  kind: str
  use_bias: bool
  slope: float
  init_scheme: str

  @nn.compact
  def __call__(self, x_dst: jax.Array, sums: jax.Array, degree: jax.Array) -> jax.Array:
    # x_dst, sums: [N, D]; degree: [N] -> [N, features].
    if self.kind == "gcn":
      h = (x_dst + sums) / (1.0 + degree)[:, None]
    elif self.kind == "sage":
      h = jnp.concatenate([x_dst, sums / jnp.maximum(degree, 1.0)[:, None]], axis=-1)
    else:
      raise ValueError(f"Unknown aggregator {self.kind!r}; expected 'gcn' or 'sage' (lightgcn "
                       "layers have no module).")
    init = _kernel_init(self.init_scheme)
    h = nn.Dense(self.features, use_bias=self.use_bias, kernel_init=init)(h)
    return nn.leaky_relu(h, self.slope)


def lightgcn_messages(x: jax.Array, degree: jax.Array) -> jax.Array:
  """What a node sends in LightGCN propagation, x_u / √d_u: [S, D], [S] -> [S, D].

  degree is the node's degree in the whole graph, not in a sample; a node of degree 0 is nobody's
  neighbour, so its message is never read.
  """
  return x * jax.lax.rsqrt(jnp.maximum(degree, 1.0))[:, None]


def lightgcn_propagate(sums: jax.Array, count: jax.Array, degree: jax.Array) -> jax.Array:
  """LightGCN's layer Σ_{u ∈ N(v)} x_u / √(d_u d_v), from the sum of `lightgcn_messages` over
  `count` neighbours drawn uniformly with replacement from the d_v = `degree` of N(v).

  The sample mean times d_v estimates the sum over all of N(v) without bias; with every neighbour
  once (count = degree, full-graph encoding) it is the sum itself. sums [N, D], count and
  degree [N] -> [N, D]; no neighbours give 0.
  """
  return sums * (jnp.sqrt(degree) / jnp.maximum(count, 1.0))[:, None]


class HashGNN(nn.Module):
  """Encodes node ids into continuous codes z = tanh(W u + b) of `hash_bits` dimensions.

  Aggregator gcn or sage: u is the last GNN layer's output. lightgcn: the layers propagate with
  no weights or non-linearity (`lightgcn_propagate`) and u is the mean of layers 0..L at each node
  (LightGCN's layer combination with α_l = 1 / (L + 1)); the layers then need every node's degree
  in the whole graph.

  `encoder` "embedding" skips the GNN layers (u is the layer-0 feature: MF); `hash_method`
  "random_projection" projects the codes tanh(W u + b) by a fixed Gaussian matrix (LSH on the
  model's own code space) and "identity" serves u itself
  (BPR-MF; u then has hash_bits dimensions). Training reads the logits a = W u + b
  (`logits=True`) and makes codes of them as its method says (`train.step`).
  """

  num_nodes: int
  num_users: int
  embed_dim: int
  input_dense: int
  hidden_dims: Sequence[int]
  aggregator: str
  use_bias: bool
  slope: float
  hash_bits: int
  separate_hash_layers: bool
  init_scheme: str
  embed_init_std: float
  encoder: str = "gnn"
  hash_method: str = "guided"
  projection_seed: int = 0
  # > 0: the losses' score temperature is a parameter, log_temperature, starting at log of this
  # (`temperature`); 0: none, the config's fixed value applies.
  learned_temperature: float = 0.0

  @property
  def num_layers(self) -> int:
    return len(self.hidden_dims) if self.encoder == "gnn" else 0

  @property
  def lightgcn_layers(self) -> bool:
    """Whether there are GNN layers and they are LightGCN's: weightless, their messages scaled
    by degree, u the mean of every layer's output rather than the last one."""
    return self.aggregator == "lightgcn" and self.num_layers > 0

  def setup(self):
    init = _kernel_init(self.init_scheme)
    # Independent of the table's size, unlike a fan-based init over [num_nodes, embed_dim].
    self.embedding = nn.Embed(self.num_nodes, self.embed_dim,
                              embedding_init=nn.initializers.normal(self.embed_init_std))
    if self.input_dense > 0:
      self.input_layer = nn.Dense(self.input_dense, use_bias=self.use_bias, kernel_init=init)
    if not self.lightgcn_layers:  # LightGCN's layers have no parameters.
      self.layers = [
          MeanAggregator(dim, self.aggregator, self.use_bias, self.slope, self.init_scheme)
          for dim in self.hidden_dims[:self.num_layers]
      ]
    if self.learned_temperature > 0:
      # Its log, so that the temperature stays positive whatever Adam does to it.
      self.log_temperature = self.param(
          "log_temperature", lambda _: jnp.log(jnp.asarray(self.learned_temperature, jnp.float32)))
    if self.hash_method == "identity":
      return  # No hash layer.
    self.user_hash = nn.Dense(self.hash_bits, kernel_init=init)
    if self.separate_hash_layers:
      self.item_hash = nn.Dense(self.hash_bits, kernel_init=init)

  def temperature(self) -> jax.Array:
    """The learned score temperature, exp(log_temperature) > 0 (needs learned_temperature > 0)."""
    return jnp.exp(self.log_temperature)

  def embed(self, node_ids: jax.Array) -> jax.Array:
    """Layer-0 features of nodes: [N] int -> [N, D]."""
    return self.features(self.embedding(node_ids))

  def embed_all(self) -> jax.Array:
    """Layer-0 features of every node in id order, [N, D], from the table itself (no gather)."""
    return self.features(self.embedding.embedding)

  def features(self, rows: jax.Array) -> jax.Array:
    """Layer-0 features from embedding rows gathered by the caller: [N, E] -> [N, D].

    The row-wise optimizer gathers the rows a batch touches itself, to differentiate them alone.
    """
    if self.input_dense > 0:
      rows = nn.leaky_relu(self.input_layer(rows), self.slope)
    return rows

  def messages(self, x: jax.Array, degree: jax.Array) -> jax.Array:
    """What each node sends its neighbours, given its degree in the graph: [S, D], [S] -> [S, D].

    The neighbour sums that `aggregate` reads are sums of these.
    """
    return lightgcn_messages(x, degree) if self.lightgcn_layers else x

  def aggregate(self, layer: int, x_dst: jax.Array, sums: jax.Array, count: jax.Array,
                degree: jax.Array) -> jax.Array:
    """GNN layer `layer` of nodes given the sums of `messages` over `count` neighbours each and
    their degrees in the graph (equal to count when every neighbour is summed once):
    [N, D], [N, D], [N], [N] -> [N, hidden_dims[layer]]."""
    if self.lightgcn_layers:
      return lightgcn_propagate(sums, count, degree)
    return self.layers[layer](x_dst, sums, count)

  def hash_logits(self, x: jax.Array, node_ids: jax.Array) -> jax.Array:
    """The hash layer's pre-activation a: [N, D], [N] -> [N, K]."""
    if self.hash_method == "identity":
      return x
    a = self.user_hash(x)
    if self.separate_hash_layers:
      a = jnp.where((node_ids < self.num_users)[:, None], a, self.item_hash(x))
    if self.hash_method == "random_projection":
      # LSH of the codes the model ranks by, tanh(a), centred like every tanh output: hyperplanes
      # through the origin on the GNN's leaky-ReLU output u, a narrow cone, gave near-random
      # 32-bit codes on Gowalla (HR@50 0.007). Seeded, not learned: a constant of the module.
      planes = jax.random.normal(jax.random.PRNGKey(self.projection_seed),
                                 (self.hash_bits, self.hash_bits), x.dtype)  # [K, K]
      return jnp.tanh(a) @ planes
    return a

  def hash(self, x: jax.Array, node_ids: jax.Array) -> jax.Array:
    """Continuous codes z, in (-1, 1) but for identity codes: [N, D], [N] -> [N, K]."""
    a = self.hash_logits(x, node_ids)
    return a if self.hash_method == "identity" else jnp.tanh(a)

  def __call__(self, graph: graph_lib.GraphsTuple, num_targets: int,
               fanouts: tuple[int, ...], rows: jax.Array | None = None,
               logits: bool = False, degrees: jax.Array | None = None) -> jax.Array:
    """z (or with `logits`, a) of the first `num_targets` nodes of a sampled tree graph: [T, K].

    rows [num nodes, E]: the nodes' embedding rows, when the caller gathered them. degrees
    [num nodes]: each node's degree in the whole graph (needed by lightgcn, ignored otherwise).
    """
    x = self.embed(graph.nodes) if rows is None else self.features(rows)
    degrees = self._degrees(degrees, x.shape[0])
    total = x[:num_targets]  # Of layers 0..l, for lightgcn's combination.
    sizes = graph_lib.layer_sizes(num_targets, fanouts)[:self.num_layers]
    for layer, (num_dst, num_edges) in enumerate(sizes):
      sums, count = tree_neighbour_sums(self.messages(x, degrees[:x.shape[0]]),
                                        graph.edges[:num_edges], num_targets, fanouts, num_dst)
      x = self.aggregate(layer, x[:num_dst], sums, count, degrees[:num_dst])
      if self.lightgcn_layers:
        total = total + x[:num_targets]
    u = self.readout(total, x[:num_targets])
    hash_fn = self.hash_logits if logits else self.hash
    return hash_fn(u, graph.nodes[:num_targets])

  def readout(self, total: jax.Array, last: jax.Array) -> jax.Array:
    """u from the sum of layers 0..L (total) and layer L (last), both [T, D] -> [T, D]."""
    return total / (self.num_layers + 1) if self.lightgcn_layers else last

  def _degrees(self, degrees: jax.Array | None, num_nodes: int) -> jax.Array:
    if degrees is not None:
      return degrees.astype(jnp.float32)
    if self.lightgcn_layers:
      raise ValueError("aggregator='lightgcn' needs the nodes' degrees in the graph (degrees=).")
    return jnp.ones((num_nodes,), jnp.float32)  # Read by no other aggregator.

  def encode_graph(self, senders: jax.Array, receivers: jax.Array, degrees: jax.Array,
                   node_ids: jax.Array, logits: bool = False) -> jax.Array:
    """z (or with `logits`, a) of node_ids [T] with every neighbour of every node: [T, K].

    The whole graph's layers, differentiable ("full" sampler mode): senders, receivers [2E] are
    the CSR's entries (`graph.indices` and their rows, so receivers ascend) and degrees [N] every
    node's degree. Each layer reads all N nodes, so a step costs O(E · D) whatever the batch.
    """
    x = self.embed_all()  # [N, D]
    degrees = degrees.astype(x.dtype)
    total = x
    for layer in range(self.num_layers):
      sums = graph_lib.segment_sum(self.messages(x, degrees)[senders], receivers,
                                   num_segments=x.shape[0], indices_are_sorted=True)  # [N, D]
      x = self.aggregate(layer, x, sums, degrees, degrees)
      if self.lightgcn_layers:
        total = total + x
    u = self.readout(total[node_ids], x[node_ids])  # [T, D]
    hash_fn = self.hash_logits if logits else self.hash
    return hash_fn(u, node_ids)

  def encode_blocks(self, blocks, rows: jax.Array | None = None, logits: bool = False,
                    degrees: jax.Array | None = None) -> jax.Array:
    """z (or with `logits`, a) of every target of a `sampler.NodeBlocks` sample: [b·(2+T), K].

    rows [S_H, E]: embedding rows of `blocks.nodes`, when the caller gathered them. degrees [S_H]:
    the nodes' degrees in the whole graph (needed by lightgcn, ignored otherwise). Layer l runs
    on set H−1−l, so the last layer sees the targets' fanouts[0] neighbours (GraphSAGE order).
    """
    node_ids = jnp.where(blocks.valid, blocks.nodes, 0)  # Padding ids lie past the table.
    x = materialize(self.embed(node_ids) if rows is None else self.features(rows))  # [S_H, D]
    degrees = self._degrees(degrees, x.shape[0])
    # Sets nest as prefixes, so the targets' set 0 leads whatever set x covers at every layer.
    num_targets = blocks.masks[0].shape[0]  # S_0
    total = x[:num_targets]  # Of layers 0..l, for lightgcn's combination.
    num_hops = len(blocks.neighbours)
    for layer in range(self.num_layers):
      hop = num_hops - 1 - layer
      mask = blocks.masks[hop]  # [S_h, f]
      sums = gather_sum(x.shape[0], self.messages(x, degrees[:x.shape[0]]),
                        blocks.neighbours[hop], mask)  # [S_h, D]
      x = self.aggregate(layer, x[:mask.shape[0]], sums, mask.sum(axis=1, dtype=x.dtype),
                         degrees[:mask.shape[0]])
      if self.lightgcn_layers:
        total = total + x[:num_targets]
    u = self.readout(total, x[:num_targets])  # [S_0, D]
    hash_fn = self.hash_logits if logits else self.hash
    return hash_fn(u, node_ids[:num_targets])[blocks.targets]


def create_model(model_config, num_users: int, num_items: int, hash_config=None,
                 loss_config=None) -> HashGNN:
  """Builds the model from `config.model` (and `config.hash`, default: HashGNN's guided codes;
  `config.loss`, for a learned temperature) for a graph of the given size."""
  learned = loss_config is not None and loss_config.learn_temperature
  method = "guided" if hash_config is None else hash_config.method
  identity = method == "identity"
  return HashGNN(
      num_nodes=num_users + num_items,
      num_users=num_users,
      # Identity codes are the embedding itself, so it has the codes' width.
      embed_dim=model_config.hash_bits if identity else model_config.embed_dim,
      input_dense=model_config.input_dense,
      hidden_dims=tuple(model_config.hidden_dims),
      aggregator=model_config.aggregator,
      use_bias=model_config.use_bias,
      slope=model_config.leaky_relu_slope,
      hash_bits=model_config.hash_bits,
      separate_hash_layers=model_config.separate_hash_layers,
      init_scheme=model_config.init,
      embed_init_std=model_config.embed_init_std,
      encoder=model_config.encoder,
      hash_method=method,
      projection_seed=0 if hash_config is None else hash_config.projection_seed,
      learned_temperature=loss_config.temperature if learned else 0.0,
  )
