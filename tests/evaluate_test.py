"""Tests for hashgnn_jax.evaluation.evaluate: chunking and user sampling leave the metrics'
meaning intact."""

import numpy as np
import pytest

from hashgnn_jax import config_lib
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.evaluation import evaluate

_NUM_USERS, _NUM_ITEMS = 40, 57


def _problem(seed=0):
  """A random graph, a held-out split of other pairs, and codes on a 1/4 grid.

  Grid codes make every inner product exact, so no result may depend on the chunk shape.
  """
  rng = np.random.default_rng(seed)
  pairs = np.unique(rng.integers(0, [_NUM_USERS, _NUM_ITEMS], size=(600, 2)), axis=0)
  held_out = rng.random(len(pairs)) < 0.3
  train, test = pairs[~held_out], pairs[held_out]
  graph = graph_lib.build_graph(train[:, 0], train[:, 1], _NUM_USERS, _NUM_ITEMS)
  codes = (rng.integers(-4, 5, size=(_NUM_USERS + _NUM_ITEMS, 32)) / 4).astype(np.float32)
  return codes, graph, test[:, 0], test[:, 1]


def _eval_config(**overrides):
  config = config_lib.default_config().eval
  config.cutoffs = (5, 10)
  config.num_candidates = 20
  config.paper_candidates = 15
  config.update(overrides)
  return config


def test_chunk_size_does_not_change_metrics():
  codes, graph, users, items = _problem()
  results = [
    evaluate.evaluate_codes(codes, graph, users, items, _eval_config(user_chunk=chunk))
    for chunk in (3, 64)  # Many padded chunks, and one chunk larger than the user count.
  ]
  assert results[1]["by_protocol"] == results[0]["by_protocol"]
  assert set(results[0]["by_protocol"]) == {"standard", "paper"}
  assert set(results[0]["by_protocol"]["standard"]) == {
    "hamming", "hierarchical", "continuous", "popularity"
  }
  assert results[0]["num_eval_users"] == results[0]["num_split_users"] == len(np.unique(users))
  assert not results[0]["user_sample"]


def test_sampled_evaluation_equals_evaluating_the_sample_alone():
  codes, graph, users, items = _problem()
  config = _eval_config(max_users=12, sample_seed=5, user_chunk=8)
  sampled = evaluate.evaluate_codes(codes, graph, users, items, config)
  assert sampled["num_eval_users"] == 12 and sampled["user_sample"]
  assert sampled["num_split_users"] == len(np.unique(users))
  again = evaluate.evaluate_codes(codes, graph, users, items, config)
  assert again["by_protocol"] == sampled["by_protocol"]  # Reproducible.
  sample = evaluate.sample_users(users, 12, 5)
  keep = np.isin(users, sample)
  alone = evaluate.evaluate_codes(codes, graph, users[keep], items[keep],
                                  _eval_config(user_chunk=8))
  assert alone["by_protocol"] == sampled["by_protocol"]
  assert not alone["user_sample"]


@pytest.mark.parametrize("max_users", [-1, 0, 30, 31])
def test_sample_users_is_everyone_unless_smaller(max_users):
  users = np.array([7, 3, 3, 9, 30, 1] * 5 + list(range(40, 65)))  # 30 distinct users
  np.testing.assert_array_equal(evaluate.sample_users(users, max_users, seed=0), np.unique(users))


def test_sample_users_is_seeded_sorted_and_distinct():
  users = np.repeat(np.arange(100, 300), 3)
  sample = evaluate.sample_users(users, 50, seed=1)
  assert len(sample) == 50 and np.all(np.diff(sample) > 0) and np.all(np.isin(sample, users))
  np.testing.assert_array_equal(sample, evaluate.sample_users(users, 50, seed=1))
  assert not np.array_equal(sample, evaluate.sample_users(users, 50, seed=2))


def test_progress_is_logged_with_an_eta(monkeypatch, caplog):
  codes, graph, users, items = _problem()
  monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0.0)
  with caplog.at_level("INFO"):
    evaluate.evaluate_codes(codes, graph, users, items, _eval_config(user_chunk=10))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Evaluation:")]
  num_users = len(np.unique(users))
  chunks = -(-num_users // 10)
  # Every chunk but the last (whose line would say nothing the result does not).
  assert [line.split()[1] for line in lines] == [f"{i}/{chunks}" for i in range(1, chunks)]
  assert all(f"({num_users} users)" in line and "s left." in line for line in lines)
  caplog.clear()
  with caplog.at_level("INFO"):  # The default interval: a sub-second evaluation logs nothing.
    monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 30.0)
    evaluate.evaluate_codes(codes, graph, users, items, _eval_config(user_chunk=10))
  assert not [r for r in caplog.records if r.getMessage().startswith("Evaluation:")]


def test_extra_candidates_are_hierarchical_modes_of_their_own():
  codes, graph, users, items = _problem()
  both = evaluate.evaluate_codes(codes, graph, users, items,
                                 _eval_config(extra_candidates=(12, 20)))
  for m in (12, 20):
    alone = evaluate.evaluate_codes(codes, graph, users, items,
                                    _eval_config(num_candidates=m, paper_candidates=m))
    for protocol in ("standard", "paper"):
      assert (both["by_protocol"][protocol][f"hierarchical@{m}"]
              == alone["by_protocol"][protocol]["hierarchical"])
  assert both["by_protocol"]["standard"]["hierarchical"] == evaluate.evaluate_codes(
      codes, graph, users, items, _eval_config())["by_protocol"]["standard"]["hierarchical"]


def test_an_extra_depth_below_the_largest_cutoff_reports_the_cutoffs_it_reaches():
  codes, graph, users, items = _problem()
  shallow = evaluate.evaluate_codes(codes, graph, users, items, _eval_config(extra_candidates=(7,)))
  alone = evaluate.evaluate_codes(codes, graph, users, items,
                                  _eval_config(cutoffs=(5,), num_candidates=7, paper_candidates=7))
  for protocol in ("standard", "paper"):
    got = shallow["by_protocol"][protocol]["hierarchical@7"]
    want = alone["by_protocol"][protocol]["hierarchical"]
    assert set(got) == {"hr@5", "ndcg@5"} and got["hr@5"] == want["hr@5"]
    if protocol == "standard":  # The authors' NDCG reads every hit retrieved, 7 here, not 5.
      assert got == want
