"""The row-sharded embedding layout (`train/tables.py`) against NumPy and the replicated layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.serving import export
from hashgnn_jax.serving import format as format_lib
from hashgnn_jax.train import loop as train
from hashgnn_jax.train import sampler
from hashgnn_jax.train import state as state_lib
from hashgnn_jax.train import step as step_lib
from hashgnn_jax.train import tables

from train_test import _config, _run_steps  # pylint: disable=g-import-not-at-top


def test_blocks_round_trip_with_padding_rows():
  devices = tuple(jax.local_devices()[:4])
  rows = tables.RowSharding(devices, num_rows=10)  # L = 3: the last block holds 1 row + 2 pads.
  assert rows.rows_per_device == 3 and rows.saved_shape(2) == (12, 2)
  table = np.arange(20, dtype=np.float32).reshape(10, 2)
  blocks = rows.split(table)
  assert blocks.shape == (4, 3, 2)
  for shard in blocks.addressable_shards:  # Device i holds rows [3i, 3i + 3).
    owner = devices.index(shard.device)
    expected = np.zeros((3, 2), np.float32)
    part = table[3 * owner:3 * owner + 3]
    expected[:len(part)] = part
    np.testing.assert_array_equal(np.asarray(shard.data)[0], expected)
  saved = rows.to_saved(blocks)
  assert saved.shape == (12, 2) and saved.sharding == rows.sharding
  np.testing.assert_array_equal(np.asarray(saved)[:10], table)
  np.testing.assert_array_equal(rows.gather(rows.from_saved(saved)), table)
  zeros = rows.zeros(2, jnp.float32)
  assert zeros.shape == (4, 3, 2) and not np.asarray(zeros).any()


@pytest.mark.parametrize("capacity", [5, 3, 2, 1])
def test_lookup_and_owned_gradients_against_numpy(capacity):
  """Full lists (5 = S), lists of L = 3 (which cannot overflow either), and shorter ones."""
  num_devices, num_rows, width, per_device = 4, 10, 3, 5
  rows_per = -(-num_rows // num_devices)
  rng = np.random.default_rng(0)
  table = rng.normal(size=(num_rows, width)).astype(np.float32)
  padded = np.zeros((num_devices * rows_per, width), np.float32)
  padded[:num_rows] = table
  # Distinct ids per device, some padding (num_rows) between them, rows shared between devices.
  ids = np.full((num_devices, per_device), num_rows, np.int32)
  for d in range(num_devices):
    chosen = rng.choice(num_rows, size=3 + d % 2, replace=False)
    if d == 0:
      chosen = np.array([2, 5, 0, 1])  # Three of owner 0's rows: lists under 3 overflow.
    ids[d, rng.choice(per_device, size=len(chosen), replace=False)] = chosen
  valid = ids < num_rows
  grads = rng.normal(size=(num_devices, per_device, width)).astype(np.float32)
  marks = graph_lib.empty_marks(num_rows)

  @functools.partial(jax.pmap, axis_name="x", in_axes=(0, 0, 0, 0, None))
  def exchange(blocks, ids, valid, grads, marks):
    looked, requests, fits = tables.lookup(blocks, ids, valid, "x", capacity)
    owned, summed, marks = tables.owned_gradients(requests, grads, rows_per, marks, "x")
    return looked, fits, owned, summed, marks

  looked, fits, owned, summed, marks_out = map(np.asarray, exchange(
      padded.reshape(num_devices, rows_per, width), ids, valid, grads, marks))
  # Each id's place among its device's ids for the same owner, in order: sent if below C.
  sent = np.zeros_like(valid)
  for d in range(num_devices):
    seen_per_owner = [0] * num_devices
    for s in range(per_device):
      if valid[d, s]:
        owner = ids[d, s] // rows_per
        sent[d, s] = seen_per_owner[owner] < capacity
        seen_per_owner[owner] += 1
    assert fits[d] == all(count <= capacity for count in seen_per_owner)
  assert fits[0] == (capacity >= 3)
  np.testing.assert_array_equal(looked[sent], table[ids[sent]])
  assert not looked[~sent].any()
  # The global-mean gradient of every row sent for, at its owner, once.
  expected = {}
  for d, s in zip(*np.nonzero(sent)):
    expected[ids[d, s]] = expected.get(ids[d, s], 0) + grads[d, s] / num_devices
  seen = set()
  for owner in range(num_devices):
    for slot, local in enumerate(owned[owner]):
      if local >= rows_per:  # Padding: past the block.
        continue
      row = owner * rows_per + int(local)
      assert row not in seen
      seen.add(row)
      np.testing.assert_allclose(summed[owner, slot], expected[row], rtol=1e-6)
  assert seen == set(expected)
  np.testing.assert_array_equal(marks_out, np.asarray(jnp.stack([marks] * 4)))


def test_fit_capacity_holds_the_busiest_owner_with_a_margin_and_at_most_a_block():
  sample = lambda ids: sampler.NodeBlocks(
      nodes=np.asarray(ids + [7] * 3), valid=np.asarray([True] * len(ids) + [False] * 3),
      neighbours=(), masks=(), targets=None, counts=None, complete=None)
  # Owner 1 of blocks of 1,000 rows gets 300 ids in the second sample: 1.1 × 300 -> 384.
  samples = [sample(list(range(0, 500, 2))), sample(list(range(1000, 1300)) + [3, 2500])]
  assert tables.fit_capacity(samples, 1000, 3) == 384
  # 990 ids of one owner: its block of 1,000 rows bounds the list, not 1.1 × 990.
  assert tables.fit_capacity([sample(list(range(990)))], 1000, 2) == 1000


def _whole(exp, state):
  """The state with a sharded table and moments gathered into [R, E] host arrays."""
  if exp.row_sharding is None:
    return jax.device_get(state)
  return jax.device_get(state_lib.map_tables(exp.row_sharding.gather, state))


def _assert_same(a, b, **tolerance):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path),
                               **tolerance)


@pytest.mark.parametrize("mode,extra", [("node", {}), ("tree", {}),
                                        ("node", {"loss__inbatch_weight": 0.0})])
def test_sharded_steps_equal_replicated_steps(mode, extra):
  devices = jax.local_devices()[:4]
  replicated = experiment_lib.Experiment(_config(sampler__mode=mode, **extra))
  sharded = experiment_lib.Experiment(_config(sampler__mode=mode,
                                              train__embedding_layout="sharded", **extra))
  a, metrics_a, _ = _run_steps(replicated, devices, 3)
  b, metrics_b, _ = _run_steps(sharded, devices, 3)
  assert b.params["embedding"]["embedding"].shape == (4, 225, 16)  # 900 rows over 4 devices.
  for name in metrics_a:
    assert float(metrics_a[name]) == float(metrics_b[name]), name
  # The same sums in the same order: equal to rounding, not to a tolerance of training noise.
  _assert_same(_whole(replicated, a), _whole(sharded, b), rtol=1e-6, atol=1e-7)
  initial = replicated.initial_state().params["embedding"]["embedding"]
  assert not np.allclose(_whole(sharded, b).params["embedding"]["embedding"], initial)


def test_bounded_request_lists_train_like_full_ones_and_fall_back_when_they_overflow():
  devices = jax.local_devices()[:4]
  replicated = experiment_lib.Experiment(_config())
  sharded = experiment_lib.Experiment(_config(train__embedding_layout="sharded"))
  expected, metrics, _ = _run_steps(replicated, devices, 3)
  # Lists of 224 of an owner's 225 rows hold these batches' requests (at most ~210 an owner).
  fitted, fitted_metrics, _ = _run_steps(sharded, devices, 3, capacity=224)
  assert float(fitted_metrics["trimmed"]) == 1
  for name in metrics:
    assert float(metrics[name]) == float(fitted_metrics[name]), name
  _assert_same(_whole(replicated, expected), _whole(sharded, fitted), rtol=1e-6, atol=1e-7)
  # Lists of 128 overflow: the step changes nothing, and the stepper runs it with full lists.
  initial = _whole(sharded, sharded.initial_state())
  short, short_metrics, _ = _run_steps(sharded, devices, 1, capacity=128)
  assert float(short_metrics["trimmed"]) == 0 and int(short.step) == 0
  _assert_same(initial, _whole(sharded, short), rtol=0, atol=0)
  one, _, _ = _run_steps(replicated, devices, 1)
  replicated_lib, shard_inputs = step_lib.device_layout(devices)
  stepper = step_lib.make_stepper(sharded.model, sharded.tx, sharded.config, sharded.per_epoch,
                                  devices, None, 128)
  order = jax.device_put(sampler.epoch_order(sharded.order_rng, 0, sharded.graph.num_edges),
                         replicated_lib)
  state = step_lib.place_state(sharded.initial_state(), devices, "sharded")
  state, fallback_metrics = stepper(state, graph_lib.to_device(sharded.graph, replicated_lib),
                                    order, sharded.step_rng, shard_inputs)
  assert float(fallback_metrics["trimmed"]) == 0 and int(state.step) == 1
  _assert_same(_whole(replicated, one), _whole(sharded, state), rtol=1e-6, atol=1e-7)


def test_request_capacity_is_fitted_only_where_it_saves():
  """The test graph's owners each give nearly their whole block: no fitted list; a bigger
  graph's owners give a part of it."""
  devices = jax.local_devices()[:4]
  replicated_lib, _ = step_lib.device_layout(devices)

  def fit(num_nodes, **overrides):
    config = _config(train__embedding_layout="sharded", **overrides)
    config.data.synthetic.num_users, config.data.synthetic.num_items = num_nodes
    exp = experiment_lib.Experiment(config)
    graph = graph_lib.to_device(exp.graph, replicated_lib)
    return step_lib.fit_request_capacity(exp.config, graph, devices, None), exp

  assert fit((600, 300))[0] is None
  assert fit((4000, 4000), train__request_capacity="full")[0] is None
  capacity, exp = fit((4000, 4000))
  rows_per_device = -(-exp.graph.num_nodes // 4)
  assert capacity is not None and capacity % 128 == 0 and capacity < rows_per_device
  with pytest.raises(ValueError, match="train.request_capacity"):
    experiment_lib.Experiment(_config(train__request_capacity="some"))


def test_sharded_run_resumes_restores_across_layouts_and_evaluates_like_replicated(tmp_path):
  steps = {"train__num_steps": 40, "checkpoint__every_steps": 20, "train__num_devices": 4}
  straight = train.train_and_evaluate(_config(**steps), str(tmp_path / "replicated"))
  # Sharded, stopped at 20 and resumed: the replicated run's trajectory and results.
  half = _config(**{**steps, "train__num_steps": 20}, train__embedding_layout="sharded")
  train.train_and_evaluate(half, str(tmp_path / "sharded"))
  sharded_config = _config(**steps, train__embedding_layout="sharded")
  resumed = train.train_and_evaluate(sharded_config, str(tmp_path / "sharded"))
  assert resumed["by_protocol"] == straight["by_protocol"]

  reference = experiment_lib.Experiment(_config(**steps))
  expected = _whole(reference, _restore(reference, tmp_path / "replicated"))
  # The sharded checkpoint (saved as [4·225, 16]) into the replicated layout, onto sharded
  # layouts of other device counts (3: L = 300; 2: L = 450), and the replicated checkpoint
  # into the sharded layout.
  for config, workdir in [(_config(**steps), "sharded"),
                          (_config(train__embedding_layout="sharded", train__num_devices=3),
                           "sharded"),
                          (_config(train__embedding_layout="sharded", train__num_devices=2),
                           "sharded"),
                          (sharded_config, "replicated")]:
    exp = experiment_lib.Experiment(config)
    restored = _restore(exp, tmp_path / workdir)
    if exp.row_sharding is not None:
      blocks = restored.params["embedding"]["embedding"]
      assert blocks.shape[0] == len(exp.devices) and blocks.sharding == exp.row_sharding.sharding
    _assert_same(expected, _whole(exp, restored), rtol=1e-6, atol=1e-7)
  record = experiment_lib.evaluate_checkpoint(_config(**steps), str(tmp_path / "sharded"))
  assert record["by_protocol"] == straight["by_protocol"]
  # Export from the sharded layout's own config: the replicated run's codes.
  exports = [format_lib.read_export(export.export_checkpoint(config, str(tmp_path / name)))[2]
             for config, name in ((sharded_config, "sharded"), (_config(**steps), "replicated"))]
  assert exports[0].keys() == exports[1].keys()
  for name in exports[0]:
    np.testing.assert_array_equal(exports[0][name], exports[1][name], err_msg=name)


def _restore(exp, workdir):
  ckpt = exp.checkpointer(str(workdir))
  state = ckpt.restore(exp.abstract_state())
  ckpt.close()
  return state


def test_restore_still_rejects_other_settings(tmp_path):
  train.train_and_evaluate(_config(train__num_steps=2, train__embedding_layout="sharded"),
                           str(tmp_path))
  exp = experiment_lib.Experiment(_config(model__embed_dim=8, train__embedding_layout="sharded"))
  ckpt = exp.checkpointer(str(tmp_path))
  with pytest.raises(ValueError, match=r"shapes differ \(.*opt_state/rows/mu: \(900, 16\) -> "
                                       r"\(900, 8\).*config.model.embed_dim: 16 -> 8"):
    ckpt.restore(exp.abstract_state(), config_dict=exp.config.to_dict())
  ckpt.close()


def test_sharded_layout_needs_rowwise_updates():
  with pytest.raises(ValueError, match="config.train.embedding_layout='sharded' needs"):
    experiment_lib.Experiment(_config(train__embedding_layout="sharded",
                                      train__embedding_update="dense"))
  with pytest.raises(ValueError, match="train.embedding_layout"):
    experiment_lib.Experiment(_config(train__embedding_layout="spread"))
