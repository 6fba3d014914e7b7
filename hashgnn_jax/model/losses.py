"""HashGNN's training losses on the codes of one batch (pure functions)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hashgnn_jax.model import network


def logit_scale(kind: str, hash_bits: int) -> float:
  """Factor on inner products before the sigmoid; ⟨h_u, h_i⟩ of ±1 codes spans [−K, K].

  "cosine" scores unit rows (`pair_scores`), which for ±1 codes is ⟨h_u, h_i⟩ / K.
  """
  if kind in ("none", "cosine"):
    return 1.0
  if kind == "inv_sqrt_bits":
    return float(hash_bits) ** -0.5
  if kind == "inv_bits":
    return 1.0 / hash_bits
  raise ValueError(f"Unknown logit scale {kind!r}; expected none, inv_sqrt_bits, inv_bits or "
                   "cosine.")


def _unit_rows(x: jax.Array) -> jax.Array:
  """Rows scaled to norm 1: [n, K] -> [n, K]. The floor keeps an all-zero row (tanh of zero
  logits) finite; ±1 rows have norm √K."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def pair_scores(codes: jax.Array, num_examples: int, scale: float,
                cosine: bool = False) -> tuple[jax.Array, jax.Array]:
  """Scaled inner products (of unit rows, with `cosine`) of each user with its positive and its
  negatives.

  codes [b·(2+T), K] in the sampler's [users | positives | negatives] layout ->
  (positive [b], negative [b, T]).
  """
  if cosine:
    codes = _unit_rows(codes)
  users = codes[:num_examples]
  positives = codes[num_examples:2 * num_examples]
  negatives = codes[2 * num_examples:].reshape(num_examples, -1, codes.shape[-1])
  pos = jnp.sum(users * positives, axis=-1) * scale
  neg = jnp.einsum("bk,btk->bt", users, negatives) * scale
  return pos, neg


def cross_entropy_loss(pos: jax.Array, neg: jax.Array) -> jax.Array:
  """Eq. 5: binary cross-entropy of links (label 1) and sampled non-links (label 0).

  Averaged over all 1+T pairs of each example, then over examples.
  """
  per_example = jax.nn.softplus(-pos) + jnp.sum(jax.nn.softplus(neg), axis=-1)
  return jnp.mean(per_example) / (1 + neg.shape[-1])


def hinge_rank_loss(pos: jax.Array, neg: jax.Array, margin: float) -> jax.Array:
  """Eq. 6: mean over triplets of max(0, σ(s⁻) − σ(s⁺) + α)."""
  return jnp.mean(jax.nn.relu(jax.nn.sigmoid(neg) - jax.nn.sigmoid(pos)[:, None] + margin))


def bpr_loss(pos: jax.Array, neg: jax.Array) -> jax.Array:
  """The authors' code's ranking term: mean over triplets of −log σ(s⁺ − s⁻)."""
  return jnp.mean(jax.nn.softplus(neg - pos[:, None]))


def quantization_loss(z: jax.Array) -> jax.Array:
  """Mean of (z − sign z)² = (|z| − 1)² over the entries: how far z is from a binary code."""
  return jnp.mean(jnp.square(jnp.abs(z) - 1.0))


def _identity(x):
  return x


def balance_loss(z: jax.Array, batch_mean=_identity) -> jax.Array:
  """Mean over bits of (the bit's mean over the rows)²: 0 when each bit is +1 on half of them.

  z [n, K]; given the uniformly drawn negative items, an estimate over the whole catalogue.
  `batch_mean` averages a statistic over the devices' equal shares of the batch (a pmean), so
  that the square is taken of the global batch's mean, whatever the device count.
  """
  return jnp.mean(jnp.square(batch_mean(jnp.mean(z, axis=0))))


def decorrelation_loss(z: jax.Array, batch_mean=_identity) -> jax.Array:
  """Mean square of the off-diagonal entries of zᵀz / n: 0 when the bits are uncorrelated.

  z [n, K]; the diagonal (each bit's own second moment) is the quantisation term's business.
  `batch_mean` as in `balance_loss`.
  """
  k = z.shape[-1]
  second = batch_mean(z.T @ z / z.shape[0])  # [K, K]
  off = second * (1.0 - jnp.eye(k, dtype=z.dtype))
  return jnp.sum(jnp.square(off)) / max(k * (k - 1), 1)


def inbatch_softmax_loss(users: jax.Array, items: jax.Array, offset: jax.Array,
                         collides: jax.Array, log_q: jax.Array, scale: float,
                         cosine: bool) -> jax.Array:
  """Softmax cross-entropy of each user's positive against every positive of the global batch.

  users [b, K]: this device's users, whose positives are rows offset..offset+b of items [B, K]
  (every device's positives, in global-batch order); collides [b, B]: True where another slot
  holds the user's own positive item, left out of its softmax rather than counted as a negative;
  log_q [B]: log of each slot's chance to hold its item (its degree, up to a constant), taken
  off the logits (the logQ correction), as the batch's items come by popularity.
  Scores as `pair_scores`. Mean over the b users.
  """
  if cosine:
    users, items = _unit_rows(users), _unit_rows(items)
  logits = jnp.where(collides, -jnp.inf, users @ items.T * scale - log_q[None, :])  # [b, B]
  own = offset + jnp.arange(users.shape[0])
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, own[:, None], axis=-1))


def _link_losses(pos: jax.Array, neg: jax.Array, loss_config) -> tuple[jax.Array, jax.Array]:
  """(L_cross, L_rank) of one set of scores."""
  if loss_config.rank == "hinge":
    return cross_entropy_loss(pos, neg), hinge_rank_loss(pos, neg, loss_config.margin)
  if loss_config.rank == "bpr":
    return cross_entropy_loss(pos, neg), bpr_loss(pos, neg)
  raise ValueError(f"Unknown rank loss {loss_config.rank!r}; expected 'hinge' or 'bpr'.")


class BatchItems(NamedTuple):
  """The global batch's positives, for the in-batch softmax term (`inbatch_softmax_loss`)."""
  codes: jax.Array  # [B, K]: every device's positive items' codes, in global-batch order.
  offset: jax.Array  # int scalar: where this device's examples start in the global batch.
  collides: jax.Array  # [b, B] bool: another slot holds this example's positive item.
  log_q: jax.Array  # [B]: log of each positive item's degree (`inbatch_softmax_loss`).
  z: jax.Array | None = None  # [B, K]: their continuous codes, for the binary term's softmax.


def hashgnn_loss(codes: jax.Array, num_examples: int, loss_config, hash_bits: int,
                 z: jax.Array | None = None, temperature: jax.Array | None = None,
                 batch_items: BatchItems | None = None, batch_mean=_identity,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = cross_weight · L_cross + rank_weight · L_rank (+ the terms on z), and its parts.

  codes [b·(2+T), K] are what the scores read (z mixed with sign(z), say); z [b·(2+T), K], the
  continuous codes behind them, feeds the terms on z, each with its weight in `loss_config`:
  - binary_weight: the same losses again on the straight-through signs of z, scored
    ⟨h_u, h_i⟩ · binary_temperature / K, so the served codes are trained at a scale where the
    sigmoid does not saturate, while `codes` keep the continuous scores;
  - quant_weight, balance_weight, decorr_weight: quantisation (every row), bit balance and bit
    decorrelation (the negative items' rows).
  `temperature` (the model's learned one) replaces `loss_config.temperature`. With
  `loss_config.inbatch_weight`, a softmax of each user over the global batch's positives
  (`batch_items`), scored like `codes`, adds to the loss. `batch_mean` (a pmean over the
  devices) makes the balance and decorrelation statistics the global batch's.
  """
  if temperature is None:
    temperature = loss_config.temperature
  scale = logit_scale(loss_config.logit_scale, hash_bits) * temperature
  pos, neg = pair_scores(codes, num_examples, scale, loss_config.logit_scale == "cosine")
  cross, rank = _link_losses(pos, neg, loss_config)
  # A zero weight leaves its term out of the graph, not multiplied by 0: a NaN or inf there
  # (a saturated sigmoid, say) must not reach the loss or the gradient of a run without it.
  parts = {"cross_loss": cross, "rank_loss": rank}
  weighted = [(loss_config.cross_weight, cross), (loss_config.rank_weight, rank)]
  if loss_config.inbatch_weight:
    if batch_items is None:
      raise ValueError(f"config.loss.inbatch_weight={loss_config.inbatch_weight} needs the "
                       "batch's positives (batch_items).")
    parts["inbatch_loss"] = inbatch_softmax_loss(
        codes[:num_examples], batch_items.codes, batch_items.offset, batch_items.collides,
        batch_items.log_q, scale, loss_config.logit_scale == "cosine")
    weighted.append((loss_config.inbatch_weight, parts["inbatch_loss"]))

  def binary_term():
    signs = network.ste_sign(z)
    binary_scale = loss_config.binary_temperature / hash_bits
    pos, neg = pair_scores(signs, num_examples, binary_scale)
    b_cross, b_rank = _link_losses(pos, neg, loss_config)
    parts["binary_cross_loss"], parts["binary_rank_loss"] = b_cross, b_rank
    terms = [(loss_config.cross_weight, b_cross), (loss_config.rank_weight, b_rank)]
    if loss_config.inbatch_weight:
      if batch_items.z is None:
        raise ValueError("The binary term's in-batch softmax needs the batch's continuous "
                         "codes (batch_items.z).")
      parts["binary_inbatch_loss"] = inbatch_softmax_loss(
          signs[:num_examples], network.ste_sign(batch_items.z), batch_items.offset,
          batch_items.collides, batch_items.log_q, binary_scale, False)
      terms.append((loss_config.inbatch_weight, parts["binary_inbatch_loss"]))
    return sum(w * v for w, v in terms if w)

  z_terms = {"binary_loss": (loss_config.binary_weight, binary_term),
             "quant_loss": (loss_config.quant_weight, lambda: quantization_loss(z)),
             "balance_loss": (loss_config.balance_weight,
                              lambda: balance_loss(z[2 * num_examples:], batch_mean)),
             "decorr_loss": (loss_config.decorr_weight,
                             lambda: decorrelation_loss(z[2 * num_examples:], batch_mean))}
  for name, (weight, term) in z_terms.items():
    if weight:
      if z is None:
        raise ValueError(f"config.loss.{name.replace('_loss', '')}_weight={weight} needs the "
                         "continuous codes z.")
      parts[name] = term()
      weighted.append((weight, parts[name]))
  terms = [weight * value for weight, value in weighted if weight]
  total = sum(terms[1:], terms[0]) if terms else jnp.zeros((), cross.dtype)
  return total, {"loss": total, **parts}
