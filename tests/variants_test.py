"""The paper's comparison set: every variant trains and evaluates, each mechanism against an
independent computation (HashNet's continuation, Gumbel bits, LSH, the frozen two-stage encoder,
MF without a GNN)."""

import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashgnn_jax import config_lib
from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax.model import network as model_lib
from hashgnn_jax.train import checkpointing
from hashgnn_jax.train import loop as train_loop
from hashgnn_jax.train import sampler
from hashgnn_jax.train import schedules

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import test as test_config  # pylint: disable=g-import-not-at-top

_STEPS = 6


def _config(variant, **train):
  config = test_config.get_config(variant)
  config.train.num_steps = _STEPS
  config.checkpoint.every_steps = _STEPS
  config.data.valid_fraction = 0.1  # So each run tests its best checkpoint, as compare does.
  config.eval.extra_candidates = (60,)
  for key, value in train.items():
    config.train[key] = value
  return config


@pytest.fixture(scope="module")
def graphsage_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("graphsage")
  return str(workdir), train_loop.train_and_evaluate(_config("graphsage"), str(workdir))


def _check_record(record):
  assert record["split"] == "test" and record["checkpoint"] == "best"
  for protocol in ("standard", "paper"):
    modes = record["by_protocol"][protocol]
    assert set(modes) == {"hamming", "hierarchical", "hierarchical@60", "continuous", "popularity"}
    for metrics in modes.values():
      assert all(np.isfinite(v) and 0 <= v for v in metrics.values())


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(ValueError, match="Unknown config variant 'hashgnn2'") as info:
    test_config.get_config("hashgnn2")
  for name in config_lib.VARIANTS:
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("variant", [v for v in config_lib.VARIANTS if v != "graphsage"])
def test_every_variant_trains_and_evaluates(variant, graphsage_run, tmp_path):
  source, graphsage_record = graphsage_run
  _check_record(graphsage_record)
  init_from = source if variant in config_lib.VARIANT_STAGES else ""
  record = train_loop.train_and_evaluate(_config(variant, init_from=init_from), str(tmp_path))
  _check_record(record)
  # LSH trains nothing: its only checkpoint is the initial state.
  assert record["step"] == (0 if variant == "lsh" else _STEPS)


def test_staged_variants_need_their_first_stage():
  for variant in config_lib.VARIANT_STAGES:
    with pytest.raises(ValueError, match="needs config.train.init_from"):
      config_lib.validate(test_config.get_config(variant))


def test_hashgnn_sp_trains_only_the_hash_layer(graphsage_run, tmp_path):
  source, _ = graphsage_run
  trained, _, _ = checkpointing.trained_params(source)
  train_loop.train_and_evaluate(_config("hashgnn_sp", init_from=source), str(tmp_path))
  second, _, step = checkpointing.trained_params(str(tmp_path))
  assert step > 0
  before = flax.traverse_util.flatten_dict(trained)
  after = flax.traverse_util.flatten_dict(second)
  assert set(after) == set(before)
  for path, value in after.items():
    if path[0] == "user_hash":
      assert not np.array_equal(value, before[path]), path  # Trained from a fresh start.
    else:
      np.testing.assert_array_equal(value, before[path], err_msg="/".join(path))


def test_lsh_codes_are_numpy_projections_of_graphsages_codes(graphsage_run):
  source, _ = graphsage_run
  trained, _, _ = checkpointing.trained_params(source)
  exp = experiment_lib.Experiment(_config("lsh", init_from=source))
  params = exp.initial_state().params
  # LSH starts from every parameter of the graphsage run, its hash layer included.
  for path, value in flax.traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(value, flax.traverse_util.flatten_dict(trained)[path])
  ids = jnp.arange(exp.graph.num_nodes)
  x = np.asarray(exp.model.apply({"params": params}, ids, method=model_lib.HashGNN.embed))
  z = np.asarray(exp.model.apply({"params": params}, x, ids, method=model_lib.HashGNN.hash))
  kernel, bias = (np.asarray(params["user_hash"][k], np.float64) for k in ("kernel", "bias"))
  bits = exp.config.model.hash_bits
  planes = np.asarray(jax.random.normal(jax.random.PRNGKey(exp.config.hash.projection_seed),
                                        (bits, bits)), np.float64)
  # hash() projects whatever representation it is given (here the layer-0 features): graphsage's
  # codes tanh(x W + b), then the hyperplanes.
  projected = np.tanh(x.astype(np.float64) @ kernel + bias) @ planes
  np.testing.assert_allclose(z, np.tanh(projected), atol=1e-5)
  np.testing.assert_array_equal(z >= 0, projected >= 0)


def test_hashnet_beta_schedule_and_continuation():
  hash_config = config_lib.default_config().hash
  beta = schedules.create_beta_schedule(hash_config)
  steps = np.array([0, 100, 200, 300, 400, 600, 1000])
  np.testing.assert_allclose([float(beta(s)) for s in steps],
                             [1, 1, 1, 2**0.5, 2, 4, 16], rtol=1e-6)
  a = jnp.linspace(-2.0, 2.0, 9)
  a64 = np.asarray(a, np.float64)
  for b in (1.0, 4.0):
    np.testing.assert_allclose(model_lib.continuation_codes(a, b), np.tanh(b * a64), rtol=1e-6)
    # d tanh(βa)/da = β (1 − tanh²(βa)), to float32's resolution near saturation.
    grad = jax.grad(lambda v, b=b: model_lib.continuation_codes(v, b).sum())(a)
    np.testing.assert_allclose(grad, b * (1 - np.tanh(b * a64) ** 2), rtol=1e-4, atol=3e-6)


def test_gumbel_temperature_and_bit_distribution():
  hash_config = config_lib.default_config().hash
  tau = schedules.create_temperature_schedule(hash_config)
  np.testing.assert_allclose([float(tau(s)) for s in (0, 500, 1000, 10_000)],
                             [1.0, 0.5, 0.25, hash_config.tau_min], rtol=1e-6)
  rng = np.random.default_rng(0)
  n, t = 200_000, 0.3
  for logit in (-1.5, 0.0, 0.8):
    uniform = rng.uniform(2.0**-25, 1 - 2.0**-25, n).astype(np.float32)
    bits = np.asarray(model_lib.gumbel_codes(jnp.full(n, logit), jnp.asarray(uniform), t))
    # P(bit > 0) = σ(a) at any temperature; P(bit <= v) = σ(2τ artanh(v) − a).
    tolerance = 4 * (0.25 / n) ** 0.5
    assert abs((bits > 0).mean() - 1 / (1 + np.exp(-logit))) < tolerance
    for v in (-0.9, -0.3, 0.5):
      expected = 1 / (1 + np.exp(-(2 * t * np.arctanh(v) - logit)))
      assert abs((bits <= v).mean() - expected) < tolerance, (logit, v)


def test_gumbel_codes_are_exact_signs_at_evaluation():
  config = test_config.get_config("hash_gumb")
  model = model_lib.create_model(config.model, 5, 4, config.hash)
  x = jax.random.normal(jax.random.PRNGKey(0), (9, config.model.hidden_dims[-1]))  # u
  ids = jnp.arange(9)
  params = model.init(jax.random.PRNGKey(1), x, ids, method=model_lib.HashGNN.hash)["params"]
  a = model.apply({"params": params}, x, ids, method=model_lib.HashGNN.hash_logits)
  z = model.apply({"params": params}, x, ids, method=model_lib.HashGNN.hash)
  # Evaluation is deterministic (no noise) and its binary codes are the most probable bits.
  np.testing.assert_array_equal(z, model.apply({"params": params}, x, ids,
                                               method=model_lib.HashGNN.hash))
  np.testing.assert_array_equal(np.asarray(z) >= 0, np.asarray(a) >= 0)


def test_target_uniforms_do_not_depend_on_the_device_split():
  seed = jnp.uint32(7)
  whole = sampler.target_uniforms(seed, jnp.arange(8), num_negatives=2, width=3)
  halves = [sampler.target_uniforms(seed, jnp.arange(4) + 4 * i, num_negatives=2, width=3)
            for i in range(2)]
  # Rows are [users | positives | negatives]; each half holds its own examples' rows.
  def rows(u, b):
    return {"users": u[:b], "pos": u[b:2 * b], "neg": u[2 * b:]}
  for part in ("users", "pos", "neg"):
    np.testing.assert_array_equal(
        rows(whole, 8)[part], np.concatenate([rows(h, 4)[part] for h in halves]))
  assert 0 <= float(whole.min()) and float(whole.max()) < 1


@pytest.mark.parametrize("variant, expected", [
  ("mf", {"embedding", "user_hash"}), ("bprmf", {"embedding"}), ("paper", None)])
def test_mf_variants_have_no_gnn_parameters(variant, expected):
  config = test_config.get_config(variant)
  exp_model = model_lib.create_model(config.model, 5, 4, config.hash)
  params = exp_model.init(jax.random.PRNGKey(0), jnp.arange(3), method=model_lib.HashGNN.embed)
  tree = flax.traverse_util.flatten_dict(
      experiment_lib.Experiment(config).initial_state().params)
  names = {path[0] for path in tree}
  if expected is None:
    assert {"layers_0", "layers_1"} <= names
  else:
    assert names == expected
  if variant == "bprmf":
    # The codes are the embedding itself, of hash_bits dimensions.
    assert params["params"]["embedding"]["embedding"].shape[1] == config.model.hash_bits
