"""HashGNN's training losses on the codes of one batch (pure functions)."""

import jax
import jax.numpy as jnp


def logit_scale(kind: str, hash_bits: int) -> float:
  """Factor on inner products before the sigmoid; ⟨h_u, h_i⟩ of ±1 codes spans [−K, K]."""
  if kind == "none":
    return 1.0
  if kind == "inv_sqrt_bits":
    return float(hash_bits) ** -0.5
  if kind == "inv_bits":
    return 1.0 / hash_bits
  raise ValueError(f"Unknown logit scale {kind!r}; expected none, inv_sqrt_bits or inv_bits.")


def pair_scores(codes: jax.Array, num_examples: int, scale: float) -> tuple[jax.Array, jax.Array]:
  """Scaled inner products of each user with its positive and its negatives.

  codes [b·(2+T), K] in the sampler's [users | positives | negatives] layout ->
  (positive [b], negative [b, T]).
  """
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


def hashgnn_loss(codes: jax.Array, num_examples: int, loss_config,
                 hash_bits: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = cross_weight · L_cross + rank_weight · L_rank, with its parts for logging."""
  pos, neg = pair_scores(codes, num_examples, logit_scale(loss_config.logit_scale, hash_bits))
  cross = cross_entropy_loss(pos, neg)
  if loss_config.rank == "hinge":
    rank = hinge_rank_loss(pos, neg, loss_config.margin)
  elif loss_config.rank == "bpr":
    rank = bpr_loss(pos, neg)
  else:
    raise ValueError(f"Unknown rank loss {loss_config.rank!r}; expected 'hinge' or 'bpr'.")
  # A zero weight leaves its term out of the graph, not multiplied by 0: a NaN or inf there
  # (a saturated sigmoid, say) must not reach the loss or the gradient of a run without it.
  terms = [weight * value for weight, value in ((loss_config.cross_weight, cross),
                                                (loss_config.rank_weight, rank)) if weight]
  total = sum(terms[1:], terms[0]) if terms else jnp.zeros((), cross.dtype)
  return total, {"loss": total, "cross_loss": cross, "rank_loss": rank}
