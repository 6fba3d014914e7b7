"""Row-wise (lazy) Adam against optax's dense Adam, and the row bookkeeping around it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.train import optim

LR = 0.05


def _dense_adam_steps(table, grads_per_step, learning_rate=LR, weight_decay=0.0):
  tx = optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay else optax.adam(
      learning_rate)
  state = tx.init(table)
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, table)
    table = optax.apply_updates(table, updates)
  return table


@pytest.mark.parametrize("streaming", [False, True])
def test_every_row_touched_equals_dense_adam(streaming):
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(4)]
  state = optim.row_adam_init(table)
  rows = table
  for g in grads:
    # All rows, in a shuffled order: the update must not depend on the order of ids.
    ids = jnp.asarray(rng.permutation(6), jnp.int32)
    rows, state = optim.row_adam_update(rows, state, ids, g[ids], learning_rate=LR,
                                        streaming=streaming)
  np.testing.assert_allclose(rows, _dense_adam_steps(table, grads), rtol=1e-6, atol=1e-7)
  assert int(state.count) == 4


@pytest.mark.parametrize("streaming", [False, True])
def test_weight_decay_equals_adamw_and_spares_untouched_rows(streaming):
  rng = np.random.default_rng(5)
  table = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(3)]
  update = functools.partial(optim.row_adam_update, learning_rate=LR, weight_decay=0.3,
                             streaming=streaming)
  rows, state = table, optim.row_adam_init(table)
  for g in grads:
    rows, state = update(rows, state, jnp.arange(6), g)
  np.testing.assert_allclose(rows, _dense_adam_steps(table, grads, weight_decay=0.3),
                             rtol=1e-6, atol=1e-7)
  assert not np.allclose(rows, _dense_adam_steps(table, grads), rtol=1e-4)
  # Lazy: a row no step touches keeps its value (dense AdamW would shrink it every step).
  ids = jnp.array([0, 3, 6])  # 6 = R: a padding slot.
  after, _ = update(table, optim.row_adam_init(table), ids, grads[0][jnp.array([0, 3, 0])])
  untouched = np.array([1, 2, 4, 5])
  np.testing.assert_array_equal(after[untouched], table[untouched])
  reference = _dense_adam_steps(table[jnp.array([0, 3])], [grads[0][jnp.array([0, 3])]],
                                weight_decay=0.3)
  np.testing.assert_allclose(after[jnp.array([0, 3])], reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("streaming", [False, True])
def test_schedule_follows_optax_step_count(streaming):
  # A schedule is called with the number of earlier updates, as optax.adam calls it.
  schedule = optax.linear_schedule(LR, LR / 10, transition_steps=3)
  rng = np.random.default_rng(3)
  table = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=(4, 2)), jnp.float32) for _ in range(4)]
  rows, state = table, optim.row_adam_init(table)
  for g in grads:
    rows, state = optim.row_adam_update(rows, state, jnp.arange(4), g, learning_rate=schedule,
                                        streaming=streaming)
  np.testing.assert_allclose(rows, _dense_adam_steps(table, grads, schedule), rtol=1e-6,
                             atol=1e-7)
  # A constant rate instead differs: the test can tell the two apart.
  assert not np.allclose(rows, _dense_adam_steps(table, grads), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("streaming", [False, True])
def test_untouched_rows_and_moments_stay_put(streaming):
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
  g1 = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
  g2 = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
  state = optim.row_adam_init(table)
  # Step 1 touches rows 0, 2, 4; step 2 touches rows 0, 2 plus one padding slot (id 5 = R).
  update = functools.partial(optim.row_adam_update, learning_rate=LR, streaming=streaming)
  after1, state1 = update(table, state, jnp.array([0, 2, 4]), g1)
  ids2 = jnp.array([2, 5, 0])
  grads2 = jnp.stack([g2[1], jnp.full((2,), 7.0), g2[0]])
  after2, state2 = update(after1, state1, ids2, grads2)

  np.testing.assert_array_equal(after1[np.array([1, 3])], table[np.array([1, 3])])
  np.testing.assert_array_equal(after2[np.array([1, 3, 4])], after1[np.array([1, 3, 4])])
  np.testing.assert_array_equal(state2.mu[4], state1.mu[4])
  np.testing.assert_array_equal(state2.nu[4], state1.nu[4])
  np.testing.assert_array_equal(state1.mu[np.array([1, 3])], 0.0)
  # Rows 0 and 2 saw both steps: dense Adam on just those rows gives the same values.
  expected = _dense_adam_steps(table[np.array([0, 2])], [g1[:2], g2])
  np.testing.assert_allclose(after2[np.array([0, 2])], expected, rtol=1e-6, atol=1e-7)
  # Row 4, touched once: one Adam step from its initial value.
  np.testing.assert_allclose(after2[4], _dense_adam_steps(table[4:5], [g1[2:3]])[0], rtol=1e-6)


def test_streaming_and_gathered_updates_agree():
  # Several steps over a table, each touching a random subset of rows plus padding (id = R).
  rng = np.random.default_rng(4)
  num_rows, dim = 50, 4
  table = jnp.asarray(rng.normal(size=(num_rows, dim)), jnp.float32)
  tables = {False: table, True: table}
  states = {s: optim.row_adam_init(table) for s in (False, True)}
  for _ in range(5):
    ids = np.full(20, num_rows, np.int32)
    touched = rng.choice(num_rows, size=rng.integers(1, 20), replace=False)
    ids[rng.choice(20, size=len(touched), replace=False)] = touched
    grads = jnp.asarray(rng.normal(size=(20, dim)), jnp.float32)
    for s in (False, True):
      tables[s], states[s] = optim.row_adam_update(tables[s], states[s], jnp.asarray(ids), grads,
                                                   learning_rate=LR, streaming=s)
  np.testing.assert_allclose(tables[True], tables[False], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(states[True].mu, states[False].mu, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(states[True].nu, states[False].nu, rtol=1e-6, atol=1e-7)


def test_in_id_order_sorts_ids_and_moves_their_gradients_along():
  # Ids on both sides of 32-bit word boundaries, padding (= num_rows) anywhere.
  num_rows = 70
  ids = np.array([69, 70, 32, 0, 70, 31, 33, 64, 70, 1], np.int32)
  grads = np.arange(len(ids) * 2, dtype=np.float32).reshape(-1, 2)
  got_ids, got_grads = jax.jit(optim._in_id_order, static_argnums=2)(ids, grads, num_rows)
  order = np.argsort(np.where(ids < num_rows, ids, num_rows + np.arange(len(ids))), kind="stable")
  np.testing.assert_array_equal(got_ids, [0, 1, 31, 32, 33, 64, 69, 70, 70, 70])
  np.testing.assert_array_equal(got_grads, grads[order])


def _numpy_unique(ids, valid):
  seen, order = {}, []
  for i, ok in zip(ids, valid):
    if ok and i not in seen:
      seen[i] = len(order)
      order.append(i)
  return order, [seen[i] if ok else 0 for i, ok in zip(ids, valid)]


def test_unique_nodes_matches_first_occurrence_order():
  rng = np.random.default_rng(2)
  ids = rng.integers(0, 20, size=60).astype(np.int32)
  valid = rng.random(60) < 0.8
  order, inverse = _numpy_unique(ids.tolist(), valid.tolist())
  fn = jax.jit(lambda ids, valid, marks: graph_lib.unique_nodes(ids, valid, 20, marks))
  marks = graph_lib.empty_marks(20)
  unique, unique_valid, got_inverse, marks = fn(jnp.asarray(ids), jnp.asarray(valid), marks)
  np.testing.assert_array_equal(marks, graph_lib.empty_marks(20))  # Left empty for reuse.
  count = len(order)
  np.testing.assert_array_equal(unique[:count], order)
  np.testing.assert_array_equal(unique[count:], 20)  # Padding id = num_nodes.
  np.testing.assert_array_equal(unique_valid, np.arange(20) < count)
  np.testing.assert_array_equal(got_inverse, inverse)
  np.testing.assert_array_equal(np.asarray(unique)[np.asarray(got_inverse)][valid], ids[valid])


def test_combine_row_grads_sums_over_devices_and_averages():
  num_devices, rows, dim = 4, 10, 3
  rng = np.random.default_rng(3)
  # Each device: 5 distinct ids (some shared across devices) or padding (= rows).
  ids = np.full((num_devices, 5), rows, np.int32)
  grads = rng.normal(size=(num_devices, 5, dim)).astype(np.float32)
  for d in range(num_devices):
    count = rng.integers(1, 6)
    ids[d, :count] = rng.choice(rows, size=count, replace=False)
  combine = jax.pmap(
      lambda i, g: optim.combine_row_grads(i, g, graph_lib.empty_marks(rows), "devices")[:2],
      axis_name="devices", devices=jax.local_devices()[:num_devices])
  out_ids, out_grads = combine(jnp.asarray(ids), jnp.asarray(grads))

  expected = np.zeros((rows, dim), np.float32)
  for d in range(num_devices):
    for slot in range(5):
      if ids[d, slot] < rows:
        expected[ids[d, slot]] += grads[d, slot]
  expected /= num_devices
  touched = sorted(set(ids[ids < rows].tolist()))
  for d in range(num_devices):  # Every device holds the same combined rows.
    got_ids = np.asarray(out_ids[d])
    real = got_ids < rows
    assert sorted(got_ids[real].tolist()) == touched
    np.testing.assert_allclose(np.asarray(out_grads[d])[real], expected[got_ids[real]],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(out_grads[d])[~real], 0.0)
