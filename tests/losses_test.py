"""Losses against NumPy formulas of eq. 5, eq. 6 and BPR."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hashgnn_jax.model import losses


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
  config = ml_collections.ConfigDict(dict(
      cross_weight=0.7, rank=rank, rank_weight=0.5, margin=0.2, logit_scale=scale_kind))
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
    losses.logit_scale("cosine", 32)


@pytest.mark.parametrize("dropped", ["rank_weight", "cross_weight"])
def test_a_zero_weight_leaves_its_term_out_of_loss_and_gradient(dropped):
  import jax  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      cross_weight=0.7, rank="hinge", rank_weight=0.5, margin=0.2, logit_scale="none"))
  config[dropped] = 0.0
  codes = jnp.asarray(_codes(k=4))
  kept = losses.cross_entropy_loss if dropped == "rank_weight" else (
      lambda pos, neg: losses.hinge_rank_loss(pos, neg, 0.2))
  weight = config.cross_weight if dropped == "rank_weight" else config.rank_weight
  alone = lambda c: weight * kept(*losses.pair_scores(c, 3, 1.0))
  total = lambda c: losses.hashgnn_loss(c, 3, config, hash_bits=4)[0]
  np.testing.assert_array_equal(total(codes), alone(codes))
  np.testing.assert_array_equal(jax.grad(total)(codes), jax.grad(alone)(codes))
