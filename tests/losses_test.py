"""Losses against NumPy formulas of eq. 5, eq. 6 and BPR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashgnn_jax import config_lib
from hashgnn_jax.model import losses


def _loss_config(**fields):
  """The default `config.loss` with `fields` set."""
  config = config_lib.default_config().loss
  config.update(fields)
  return config


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _codes(b=3, t=2, k=4, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, size=(b * (2 + t), k)).astype(np.float32)


def _numpy_scores(codes, b, t, scale):
  users, pos_items = codes[:b], codes[b:2 * b]
  negs = codes[2 * b:].reshape(b, t, -1)
  pos = np.array([users[j] @ pos_items[j] for j in range(b)]) * scale
  neg = np.array([[users[j] @ negs[j, s] for s in range(t)] for j in range(b)]) * scale
  return pos, neg


def test_pair_scores_layout():
  codes = _codes()
  pos, neg = losses.pair_scores(jnp.asarray(codes), 3, 0.5)
  ref_pos, ref_neg = _numpy_scores(codes, 3, 2, 0.5)
  np.testing.assert_allclose(pos, ref_pos, rtol=1e-5)
  np.testing.assert_allclose(neg, ref_neg, rtol=1e-5)


def test_cross_entropy_matches_formula():
  pos = np.array([1.5, -0.3], np.float32)
  neg = np.array([[0.2, -2.0, 0.7], [1.1, 0.0, -0.4]], np.float32)
  terms = np.concatenate([-np.log(_sigmoid(pos))[:, None], -np.log(1 - _sigmoid(neg))], axis=1)
  np.testing.assert_allclose(losses.cross_entropy_loss(pos, neg), terms.mean(), rtol=1e-5)


def test_hinge_rank_matches_formula():
  pos = np.array([1.5, -0.3], np.float32)
  neg = np.array([[0.2, -2.0, 0.7], [1.1, 0.0, -0.4]], np.float32)
  ref = np.maximum(0, _sigmoid(neg) - _sigmoid(pos)[:, None] + 0.2).mean()
  np.testing.assert_allclose(losses.hinge_rank_loss(pos, neg, 0.2), ref, rtol=1e-5)
  # A positive far above every negative satisfies the margin: zero loss.
  assert float(losses.hinge_rank_loss(np.array([20.0]), np.array([[-20.0]]), 0.2)) == 0.0


def test_bpr_matches_formula():
  pos = np.array([1.5, -0.3], np.float32)
  neg = np.array([[0.2, -2.0, 0.7], [1.1, 0.0, -0.4]], np.float32)
  ref = -np.log(_sigmoid(pos[:, None] - neg)).mean()
  np.testing.assert_allclose(losses.bpr_loss(pos, neg), ref, rtol=1e-5)


@pytest.mark.parametrize("rank,scale_kind,scale", [("hinge", "inv_bits", 0.25),
                                                   ("bpr", "none", 1.0),
                                                   ("hinge", "inv_sqrt_bits", 0.5)])
def test_total_loss(rank, scale_kind, scale):
  config = _loss_config(cross_weight=0.7, rank=rank, rank_weight=0.5, margin=0.2,
                        logit_scale=scale_kind)
  codes = _codes(k=4)
  total, parts = losses.hashgnn_loss(jnp.asarray(codes), 3, config, hash_bits=4)
  pos, neg = _numpy_scores(codes, 3, 2, scale)
  cross = np.concatenate([-np.log(_sigmoid(pos))[:, None], -np.log(1 - _sigmoid(neg))], 1).mean()
  if rank == "hinge":
    ranking = np.maximum(0, _sigmoid(neg) - _sigmoid(pos)[:, None] + 0.2).mean()
  else:
    ranking = -np.log(_sigmoid(pos[:, None] - neg)).mean()
  np.testing.assert_allclose(parts["cross_loss"], cross, rtol=1e-5)
  np.testing.assert_allclose(parts["rank_loss"], ranking, rtol=1e-5)
  np.testing.assert_allclose(total, 0.7 * cross + 0.5 * ranking, rtol=1e-5)


def test_unknown_scale_rejected():
  with pytest.raises(ValueError, match="logit scale"):
    losses.logit_scale("cosine_similarity", 32)


@pytest.mark.parametrize("dropped", ["rank_weight", "cross_weight"])
def test_a_zero_weight_leaves_its_term_out_of_loss_and_gradient(dropped):
  config = _loss_config(cross_weight=0.7, rank="hinge", rank_weight=0.5, margin=0.2,
                        logit_scale="none")
  config[dropped] = 0.0
  codes = jnp.asarray(_codes(k=4))
  kept = losses.cross_entropy_loss if dropped == "rank_weight" else (
      lambda pos, neg: losses.hinge_rank_loss(pos, neg, 0.2))
  weight = config.cross_weight if dropped == "rank_weight" else config.rank_weight
  alone = lambda c: weight * kept(*losses.pair_scores(c, 3, 1.0))
  total = lambda c: losses.hashgnn_loss(c, 3, config, hash_bits=4)[0]
  np.testing.assert_array_equal(total(codes), alone(codes))
  np.testing.assert_array_equal(jax.grad(total)(codes), jax.grad(alone)(codes))


def _numpy_cross(pos, neg):
  return np.concatenate([-np.log(_sigmoid(pos))[:, None], -np.log(1 - _sigmoid(neg))], 1).mean()


def test_cosine_scores_with_temperature():
  codes = _codes(k=4)
  config = _loss_config(logit_scale="cosine", temperature=5.0, rank_weight=0.0)
  _, parts = losses.hashgnn_loss(jnp.asarray(codes), 3, config, hash_bits=4)
  unit = codes / np.linalg.norm(codes, axis=1, keepdims=True)
  pos, neg = _numpy_scores(unit, 3, 2, 5.0)
  np.testing.assert_allclose(parts["cross_loss"], _numpy_cross(pos, neg), rtol=1e-5)


def test_cosine_of_sign_codes_is_inner_product_over_bits():
  signs = np.where(_codes(k=8) >= 0, 1.0, -1.0).astype(np.float32)
  cosine = losses.pair_scores(jnp.asarray(signs), 3, 2.0, cosine=True)
  scaled = losses.pair_scores(jnp.asarray(signs), 3, 2.0 / 8)
  for got, want in zip(cosine, scaled):
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # A zero row (tanh of zero logits) scores 0, not NaN.
  pos, _ = losses.pair_scores(jnp.zeros((12, 8)), 3, 1.0, cosine=True)
  assert np.all(np.asarray(pos) == 0)


def test_code_terms_against_numpy():
  rng = np.random.default_rng(3)
  z = rng.uniform(-1, 1, size=(3 * (2 + 2), 4)).astype(np.float32)
  negatives = z[6:]
  second = negatives.T @ negatives / len(negatives)
  off = second[~np.eye(4, dtype=bool)]
  refs = {"quant_loss": np.mean((z - np.sign(z))**2),
          "balance_loss": np.mean(negatives.mean(axis=0)**2),
          "decorr_loss": np.mean(off**2)}
  config = _loss_config(quant_weight=0.3, balance_weight=2.0, decorr_weight=0.5)
  codes = np.where(z >= 0, 1.0, -1.0).astype(np.float32)
  total, parts = losses.hashgnn_loss(jnp.asarray(codes), 3, config, 4, jnp.asarray(z))
  for name, ref in refs.items():
    np.testing.assert_allclose(parts[name], ref, rtol=1e-5, err_msg=name)
  base = 1.0 * parts["cross_loss"] + 0.5 * parts["rank_loss"]
  np.testing.assert_allclose(
      total, base + 0.3 * refs["quant_loss"] + 2.0 * refs["balance_loss"]
      + 0.5 * refs["decorr_loss"], rtol=1e-5)
  # A balanced, uncorrelated, binary z costs nothing: ±1 columns of a Hadamard matrix.
  hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], np.float32)
  assert float(losses.quantization_loss(hadamard)) == 0.0
  assert float(losses.balance_loss(hadamard[:, 1:])) == 0.0
  assert float(losses.decorrelation_loss(hadamard[:, 1:])) == 0.0


def test_code_terms_off_by_default_and_need_z():
  codes = jnp.asarray(_codes(k=4))
  _, parts = losses.hashgnn_loss(codes, 3, _loss_config(), 4)
  assert set(parts) == {"loss", "cross_loss", "rank_loss"}
  with pytest.raises(ValueError, match="quant_weight"):
    losses.hashgnn_loss(codes, 3, _loss_config(quant_weight=1.0), 4)
  # The term's gradient reaches z only, through its own weight.
  grad = jax.grad(lambda z: losses.hashgnn_loss(codes, 3, _loss_config(quant_weight=2.0), 4,
                                                z)[0])(codes * 0.5)
  np.testing.assert_allclose(grad, 2.0 * 2 * (np.abs(codes * 0.5) - 1) * np.sign(codes)
                             / codes.size, rtol=1e-5)


def test_temperature_argument_gets_the_loss_gradient():
  codes = jnp.asarray(_codes(k=4))
  config = _loss_config(logit_scale="cosine", temperature=99.0)  # Replaced by the argument.

  def loss_at(log_t):
    return losses.hashgnn_loss(codes, 3, config, 4, temperature=jnp.exp(log_t))[0]

  unit = np.asarray(codes, np.float64) / np.linalg.norm(codes, axis=1, keepdims=True)

  def numpy_loss(log_t):
    pos, neg = _numpy_scores(unit, 3, 2, np.exp(log_t))
    hinge = np.maximum(0, _sigmoid(neg) - _sigmoid(pos)[:, None] + 0.2).mean()
    return _numpy_cross(pos, neg) + 0.5 * hinge

  log_t, eps = np.log(3.0), 1e-4
  np.testing.assert_allclose(loss_at(log_t), numpy_loss(log_t), rtol=1e-5)
  numeric = (numpy_loss(log_t + eps) - numpy_loss(log_t - eps)) / (2 * eps)
  np.testing.assert_allclose(jax.grad(loss_at)(log_t), numeric, rtol=1e-3)


def test_binary_term_scores_signs_over_bits_and_passes_gradient_straight_through():
  rng = np.random.default_rng(4)
  z = rng.uniform(-1, 1, size=(3 * (2 + 2), 8)).astype(np.float32)
  config = _loss_config(binary_weight=0.4, binary_temperature=6.0)
  total, parts = losses.hashgnn_loss(jnp.asarray(z), 3, config, 8, jnp.asarray(z))
  signs = np.where(z >= 0, 1.0, -1.0)
  pos, neg = _numpy_scores(signs, 3, 2, 6.0 / 8)
  hinge = np.maximum(0, _sigmoid(neg) - _sigmoid(pos)[:, None] + 0.2).mean()
  np.testing.assert_allclose(parts["binary_cross_loss"], _numpy_cross(pos, neg), rtol=1e-5)
  np.testing.assert_allclose(parts["binary_rank_loss"], hinge, rtol=1e-5)
  np.testing.assert_allclose(parts["binary_loss"], _numpy_cross(pos, neg) + 0.5 * hinge,
                             rtol=1e-5)
  np.testing.assert_allclose(
      total, parts["cross_loss"] + 0.5 * parts["rank_loss"] + 0.4 * parts["binary_loss"],
      rtol=1e-5)
  # Straight through: the term's gradient in z is its gradient in the signs, at the signs.
  binary_only = _loss_config(binary_weight=1.0, cross_weight=1.0, rank_weight=0.5)
  through_z = jax.grad(lambda v: losses.hashgnn_loss(jnp.asarray(z), 3, binary_only, 8, v)[0]
                       - losses.hashgnn_loss(jnp.asarray(z), 3, _loss_config(), 8, v)[0])(
                           jnp.asarray(z))
  at_signs = jax.grad(lambda s: losses.hashgnn_loss(s, 3, _loss_config(
      logit_scale="inv_bits", temperature=6.0), 8)[0])(jnp.asarray(signs, jnp.float32))
  np.testing.assert_allclose(through_z, at_signs, rtol=1e-4, atol=1e-7)


def test_inbatch_softmax_against_numpy():
  rng = np.random.default_rng(5)
  users = rng.normal(size=(3, 4)).astype(np.float32)  # This device's 3 examples: global 2..4.
  items = rng.normal(size=(6, 4)).astype(np.float32)  # The global batch's 6 positives.
  item_ids = np.array([7, 9, 7, 1, 9, 2])
  own = np.arange(2, 5)
  collides = (item_ids[own][:, None] == item_ids[None, :]) & (own[:, None] != np.arange(6))
  log_q = np.log(np.array([3.0, 2.0, 3.0, 1.0, 2.0, 5.0], np.float32))  # The items' degrees.
  got = losses.inbatch_softmax_loss(jnp.asarray(users), jnp.asarray(items), 2,
                                    jnp.asarray(collides), jnp.asarray(log_q), 0.7, cosine=False)
  expected = []
  for row, slot in enumerate(own):
    logits = 0.7 * items @ users[row] - log_q
    keep = ~collides[row]
    expected.append(-(logits[slot] - np.log(np.sum(np.exp(logits[keep])))))
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)
  # Example 2's item 7 also sits in slot 0, which its softmax leaves out.
  assert collides[0, 0] and not collides[0, 2]


def test_inbatch_term_weighted_into_the_loss():
  codes = jnp.asarray(_codes(b=3, t=2, k=4))
  items = losses.BatchItems(codes[3:6], jnp.asarray(0), jnp.zeros((3, 3), bool), jnp.zeros(3))
  config = _loss_config(inbatch_weight=0.25, logit_scale="cosine", temperature=2.0)
  total, parts = losses.hashgnn_loss(codes, 3, config, 4, batch_items=items)
  alone = losses.inbatch_softmax_loss(codes[:3], codes[3:6], 0, items.collides, items.log_q,
                                      2.0, True)
  np.testing.assert_allclose(parts["inbatch_loss"], alone, rtol=1e-6)
  np.testing.assert_allclose(total, parts["cross_loss"] + 0.5 * parts["rank_loss"] + 0.25 * alone,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="inbatch_weight"):
    losses.hashgnn_loss(codes, 3, config, 4)


def test_binary_term_includes_the_inbatch_softmax_of_the_signs():
  rng = np.random.default_rng(6)
  z = rng.uniform(-1, 1, size=(3 * (2 + 2), 8)).astype(np.float32)
  signs = np.where(z >= 0, 1.0, -1.0).astype(np.float32)
  collides = np.zeros((3, 3), bool)
  items = losses.BatchItems(jnp.asarray(z[3:6]), jnp.asarray(0), jnp.asarray(collides),
                            jnp.zeros(3), jnp.asarray(z[3:6]))
  config = _loss_config(binary_weight=1.0, binary_temperature=4.0, inbatch_weight=0.5)
  _, parts = losses.hashgnn_loss(jnp.asarray(z), 3, config, 8, jnp.asarray(z), batch_items=items)
  want = losses.inbatch_softmax_loss(signs[:3], signs[3:6], 0, collides, np.zeros(3), 0.5, False)
  np.testing.assert_allclose(parts["binary_inbatch_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(
      parts["binary_loss"], parts["binary_cross_loss"] + 0.5 * parts["binary_rank_loss"]
      + 0.5 * want, rtol=1e-5)
  with pytest.raises(ValueError, match="batch_items.z"):
    losses.hashgnn_loss(jnp.asarray(z), 3, config, 8, jnp.asarray(z),
                        batch_items=items._replace(z=None))
