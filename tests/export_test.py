"""Export and serving: layout, atomic writes, validation, and rankings equal to the evaluator's."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from hashgnn_jax import config_lib
from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.data import loader
from hashgnn_jax.evaluation import metrics as metrics_lib
from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax import fileio
from hashgnn_jax.model import encode
from hashgnn_jax.model import network as model_lib
from hashgnn_jax.retrieval import codes as codes_lib
from hashgnn_jax.retrieval import index as retrieval
from hashgnn_jax.serving import export
from hashgnn_jax.serving import format as format_lib
from hashgnn_jax.serving import retriever as serving

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import test as test_config  # pylint: disable=g-import-not-at-top

NUM_USERS, NUM_ITEMS, BITS = 40, 30, 40  # 40 bits: two words, the second one padded.
TIE_SEED, CANDIDATES = 7, 12


def _write(root, tiny, *, step=3, checkpoint="latest"):
  return export.write_export(str(root), node_z=tiny.node_z, known=tiny.graph,
                             user_ids=tiny.user_ids, item_ids=tiny.item_ids, config=tiny.config,
                             step=step, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Codes of a random-parameter model on a random 40 × 30 graph, exported with raw ids."""
  rng = np.random.default_rng(0)
  pairs = np.unique(np.stack([rng.integers(NUM_USERS, size=250),
                              rng.integers(NUM_ITEMS, size=250)], axis=1), axis=0)
  graph = graph_lib.build_graph(pairs[:, 0], pairs[:, 1], NUM_USERS, NUM_ITEMS)
  config = config_lib.default_config()
  config.model.embed_dim, config.model.hidden_dims, config.model.hash_bits = 4, (6, 5), BITS
  config.eval.tie_seed, config.eval.num_candidates = TIE_SEED, CANDIDATES
  config.eval.user_chunk = 16
  model = model_lib.create_model(config.model, NUM_USERS, NUM_ITEMS)
  tree = graph_lib.sampled_tree_graph(np.zeros(3, np.int32), np.ones(2, bool), 1, (1, 1))
  params = model.init(jax.random.PRNGKey(1), tree, 1, (1, 1))["params"]
  tiny = types.SimpleNamespace(
    graph=graph,
    config=config,
    node_z=encode.encode_nodes(model, params, graph, edge_chunk=64),  # [U + I, K]
    # Unsorted raw ids, text for users and numbers for items, so the maps are really used.
    user_ids=np.array([f"u{i:03d}" for i in rng.permutation(NUM_USERS)]),
    item_ids=1000 + 7 * rng.permutation(NUM_ITEMS).astype(np.int64),
  )
  tiny.root = tmp_path_factory.mktemp("export")
  tiny.path = _write(tiny.root, tiny)
  return tiny


def test_layout_and_manifest(tiny):
  assert tiny.path == str(tiny.root / "step_3")
  assert sorted(os.listdir(tiny.root)) == ["latest.json", "step_3"]
  assert json.loads((tiny.root / "latest.json").read_text())["directory"] == "step_3"
  manifest = json.loads((tiny.root / "step_3" / "manifest.json").read_text())
  assert manifest["format_version"] == format_lib.FORMAT_VERSION
  assert (manifest["num_users"], manifest["num_items"], manifest["bits"], manifest["words"]) == (
    NUM_USERS, NUM_ITEMS, BITS, 2)
  assert (manifest["tie_seed"], manifest["step"], manifest["checkpoint"]) == (TIE_SEED, 3, "latest")
  assert manifest["config"]["model"]["hash_bits"] == BITS
  assert sorted(os.listdir(tiny.path)) == sorted(
    [f"{name}.npy" for name in manifest["arrays"]] + ["manifest.json"])
  load = lambda name: np.load(os.path.join(tiny.path, f"{name}.npy"))
  np.testing.assert_array_equal(load("item_z"), tiny.node_z[NUM_USERS:])
  np.testing.assert_array_equal(load("user_codes"), codes_lib.pack_bits(tiny.node_z[:NUM_USERS]))
  np.testing.assert_array_equal(load("user_ids"), tiny.user_ids)
  indptr, items = load("known_indptr"), load("known_items")
  for user in range(NUM_USERS):
    np.testing.assert_array_equal(items[indptr[user]:indptr[user + 1]],
                                  tiny.graph.user_items(user))


@pytest.mark.parametrize("mode", ["hamming", "hierarchical", "continuous"])
@pytest.mark.parametrize("exclude_known", [False, True])
def test_search_equals_item_index(tiny, mode, exclude_known):
  # One chunk of exactly the query's shape, so float inner products match bit for bit.
  retriever = serving.Retriever.load(str(tiny.root), chunk_size=NUM_USERS)
  rows = np.random.default_rng(1).permutation(NUM_USERS)
  ids, scores = retriever.search(tiny.user_ids[rows], k=10, mode=mode,
                                 exclude_known=exclude_known)
  index = retrieval.ItemIndex(tiny.node_z[NUM_USERS:], tie_seed=TIE_SEED)
  want_ids, want_scores = index.search(
    tiny.node_z[rows], mode=mode, num_results=10, num_candidates=CANDIDATES,
    exclude=tiny.graph.padded_user_items(rows) if exclude_known else None)
  assert (want_ids >= 0).all()
  np.testing.assert_array_equal(ids, tiny.item_ids[want_ids])
  np.testing.assert_array_equal(scores, want_scores)


def test_chunks_and_padding_change_nothing(tiny):
  rows = np.arange(23)  # Three chunks of 8, the last padded.
  search = lambda chunk_size: serving.Retriever.load(tiny.path, chunk_size=chunk_size).search(
    rows, k=15, raw_ids=False, exclude_known=True)
  (ids, scores), (want_ids, want_scores) = search(8), search(23)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(scores, want_scores)


def test_raw_id_round_trip(tiny):
  retriever = serving.Retriever.load(tiny.path)
  np.testing.assert_array_equal(retriever.user_rows(tiny.user_ids), np.arange(NUM_USERS))
  rows = retriever.user_rows(["u005", "u017"])
  np.testing.assert_array_equal(tiny.user_ids[rows], ["u005", "u017"])
  raw, raw_scores = retriever.search(["u005", "u017"], k=5, mode="hierarchical")
  ids, scores = retriever.search(rows, k=5, mode="hierarchical", raw_ids=False)
  assert ids.dtype == np.int64
  np.testing.assert_array_equal(raw, tiny.item_ids[ids])
  np.testing.assert_array_equal(raw_scores, scores)
  with pytest.raises(KeyError, match=r"Unknown user ids: \['u999', 'x'\]"):
    retriever.search(["u005", "u999", "x"])
  with pytest.raises(KeyError, match=rf"Unknown user ids: \[-1, {NUM_USERS}\]"):
    retriever.search([0, -1, NUM_USERS], raw_ids=False)


def test_exclude_known_drops_known_items(tiny):
  retriever = serving.Retriever.load(tiny.path)
  rows = np.arange(NUM_USERS)
  ids, scores = retriever.search(rows, k=NUM_ITEMS, raw_ids=False, exclude_known=True)
  everything, _ = retriever.search(rows, k=NUM_ITEMS, raw_ids=False)
  raw, _ = retriever.search(tiny.user_ids, k=NUM_ITEMS, exclude_known=True)
  for row in rows:
    known = set(tiny.graph.user_items(row).tolist())
    kept = ids[row][ids[row] >= 0]
    assert set(kept.tolist()) == set(range(NUM_ITEMS)) - known
    assert len(kept) == NUM_ITEMS - len(known)
    # The tail holds the excluded slots: score -inf, id -1 (raw ids too).
    assert np.isneginf(scores[row][len(kept):]).all()
    assert (raw[row][len(kept):] == -1).all()
    assert sorted(everything[row].tolist()) == list(range(NUM_ITEMS))


def test_code_queries(tiny):
  retriever = serving.Retriever.load(tiny.path)
  rows = np.array([3, 1, 4, 1, 5])
  z = tiny.node_z[rows]
  for mode in ("hamming", "hierarchical"):
    by_user = retriever.search(rows, k=8, mode=mode, raw_ids=False)
    by_code = retriever.search(codes=z, k=8, mode=mode, raw_ids=False)
    np.testing.assert_array_equal(by_code[0], by_user[0])
    np.testing.assert_array_equal(by_code[1], by_user[1])
  packed = np.asarray(codes_lib.pack_bits(z))
  by_words = retriever.search(codes=packed, k=8, raw_ids=False)
  np.testing.assert_array_equal(by_words[0], retriever.search(rows, k=8, raw_ids=False)[0])
  with pytest.raises(ValueError, match="Packed codes carry no continuous part"):
    retriever.search(codes=packed, mode="hierarchical")
  with pytest.raises(ValueError, match="exclude_known needs user_ids"):
    retriever.search(codes=z, exclude_known=True)
  with pytest.raises(ValueError, match="exactly one of user_ids or codes"):
    retriever.search(rows, codes=z)
  with pytest.raises(ValueError, match=rf"codes must be float \[C, {BITS}\]"):
    retriever.search(codes=z[:, :3])


def _edit_manifest(directory, change):
  path = directory / "manifest.json"
  manifest = json.loads(path.read_text())
  change(manifest)
  path.write_text(json.dumps(manifest))


def _replace_array(directory, name, array):
  """Rewrites `<name>.npy` and its size and checksum, so that only its layout is wrong."""
  path = directory / f"{name}.npy"
  np.save(path, array)

  def change(manifest):
    manifest["arrays"][name].update(bytes=path.stat().st_size,
                                    sha256=fileio.file_sha256(str(path)))

  _edit_manifest(directory, change)


def _flip_last_byte(path):
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:-10])


_CORRUPTIONS = {
  "deleted_array": (lambda d: (d / "item_z.npy").unlink(), FileNotFoundError,
                    r"item_z\.npy is missing; the export needs item_z as float32 \(30, 40\)"),
  "deleted_manifest": (lambda d: (d / "manifest.json").unlink(), FileNotFoundError,
                       r"manifest\.json is missing"),
  "flipped_byte": (lambda d: _flip_last_byte(d / "user_z.npy"), format_lib.InvalidExportError,
                   r"user_z\.npy: SHA-256 differs from the manifest's"),
  "truncated": (lambda d: _truncate(d / "item_codes.npy"), format_lib.InvalidExportError,
                r"item_codes\.npy: \d+ bytes, the manifest expects \d+ \(truncated\)"),
  "bad_json": (lambda d: (d / "manifest.json").write_text("{not json"),
               format_lib.InvalidExportError, r"manifest\.json: unreadable manifest"),
  "wrong_version": (lambda d: _edit_manifest(d, lambda m: m.update(format_version=99)),
                    format_lib.InvalidExportError,
                    r"manifest\.json: format_version 99; this code reads version 1"),
  "wrong_shape": (lambda d: _replace_array(d, "user_z", np.zeros((NUM_USERS, BITS + 1),
                                                                  np.float32)),
                  format_lib.InvalidExportError,
                  r"user_z\.npy: holds float32 \(40, 41\), expected float32 \(40, 40\)"),
  "wrong_dtype": (lambda d: _replace_array(d, "item_codes", np.zeros((NUM_ITEMS, 2), np.int32)),
                  format_lib.InvalidExportError,
                  r"item_codes\.npy: holds int32 \(30, 2\), expected uint32 \(30, 2\)"),
  "bad_known_items": (lambda d: _replace_array(d, "known_items", np.full(
    np.load(d / "known_items.npy").shape, NUM_ITEMS, np.int32)), format_lib.InvalidExportError,
                      r"known_items\.npy: item ids must lie in \[0, 30\)"),
}


@pytest.mark.parametrize("corruption", sorted(_CORRUPTIONS))
def test_corrupt_export_is_rejected(tiny, tmp_path, corruption):
  damage, error, message = _CORRUPTIONS[corruption]
  root = tmp_path / "export"
  shutil.copytree(tiny.root, root)
  damage(root / "step_3")
  with pytest.raises(error, match=message):
    serving.Retriever.load(str(root))


def test_failed_export_leaves_previous_one(tiny, tmp_path, monkeypatch):
  root = tmp_path / "export"
  _write(root, tiny, step=1)
  calls, original = [], fileio.file_sha256

  def failing_sha256(path):  # Fails on the fourth array, with three already written.
    calls.append(path)
    if len(calls) > 3:
      raise OSError("disk full")
    return original(path)

  monkeypatch.setattr(fileio, "file_sha256", failing_sha256)
  for step in (2, 1):  # A new step, then a re-export over the existing one.
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
      _write(root, tiny, step=step, checkpoint="best")
    assert sorted(os.listdir(root)) == ["latest.json", "step_1"]
  monkeypatch.undo()
  retriever = serving.Retriever.load(str(root))
  assert (retriever.step, retriever.manifest["checkpoint"]) == (1, "latest")


def test_reexport_replaces_and_moves_pointer(tiny, tmp_path):
  root = tmp_path / "export"
  _write(root, tiny, step=1)
  _write(root, tiny, step=2)
  _write(root, tiny, step=1, checkpoint="best")
  assert sorted(os.listdir(root)) == ["latest.json", "step_1", "step_2"]
  retriever = serving.Retriever.load(str(root))  # The pointer names the export written last.
  assert (retriever.step, retriever.manifest["checkpoint"]) == (1, "best")
  assert serving.Retriever.load(str(root / "step_2")).step == 2


def test_faiss_backend_matches_distances(tiny):
  pytest.importorskip("faiss", exc_type=ImportError)  # A broken install skips too.
  exact = serving.Retriever.load(tiny.path)
  approximate = serving.Retriever.load(tiny.path, backend="faiss")
  rows = np.arange(NUM_USERS)
  for exclude_known in (False, True):
    ids, scores = exact.search(rows, k=10, raw_ids=False, exclude_known=exclude_known)
    f_ids, f_scores = approximate.search(rows, k=10, raw_ids=False, exclude_known=exclude_known)
    # The same distances; only the order among equal distances may differ.
    np.testing.assert_array_equal(f_scores, scores)
    for row in rows:
      better = scores[row] > scores[row, -1]
      assert set(f_ids[row][better]) == set(ids[row][better])
      if exclude_known:
        assert not set(f_ids[row]) & set(tiny.graph.user_items(row).tolist())
  # With every item a candidate, hierarchical re-ranks the same set by the same inner products.
  _, scores = exact.search(rows, k=10, mode="hierarchical", num_candidates=NUM_ITEMS,
                          raw_ids=False)
  _, f_scores = approximate.search(rows, k=10, mode="hierarchical", num_candidates=NUM_ITEMS,
                                  raw_ids=False)
  np.testing.assert_allclose(f_scores, scores, rtol=1e-5, atol=1e-5)


def test_faiss_backend_fills_the_tail_like_jax(tiny):
  pytest.importorskip("faiss", exc_type=ImportError)
  rows = np.arange(NUM_USERS)
  # Every item asked for: after exclusion the tail is -1 / -inf in both backends.
  ids, scores = serving.Retriever.load(tiny.path).search(
    rows, k=NUM_ITEMS, raw_ids=False, exclude_known=True)
  f_ids, f_scores = serving.Retriever.load(tiny.path, backend="faiss").search(
    rows, k=NUM_ITEMS, raw_ids=False, exclude_known=True)
  np.testing.assert_array_equal(f_scores, scores)
  np.testing.assert_array_equal(f_ids < 0, ids < 0)
  for row in rows:
    assert set(f_ids[row][f_ids[row] >= 0]) == set(range(NUM_ITEMS)) - set(
      tiny.graph.user_items(row).tolist())


def _serve(*args):
  return subprocess.run([sys.executable, "-m", "hashgnn_jax.serving", *args], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300, check=False)


def test_serving_command_prints_the_retrievers_results(tiny):
  users = [str(tiny.user_ids[row]) for row in (5, 0, 17)]
  result = _serve(f"--export={tiny.root}", f"--users={','.join(users)}", "--mode=hierarchical",
                  "--num=5")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert (report["export"], report["step"], report["mode"], report["num"]) == (
    tiny.path, 3, "hierarchical", 5)
  ids, scores = serving.Retriever.load(str(tiny.root)).search(
    users, k=5, mode="hierarchical", exclude_known=True)
  assert [entry["user"] for entry in report["results"]] == users
  for entry, want_ids, want_scores in zip(report["results"], ids, scores):
    assert entry["items"] == want_ids.tolist()
    assert entry["scores"] == want_scores.tolist()


def test_serving_command_help_and_errors(tiny):
  result = _serve("--help")  # absl prints the help and exits with status 1.
  for flag in ("--export:", "--users:", "--mode:", "--num:", "--[no]exclude_known:"):
    assert flag in result.stdout
  result = _serve(f"--export={tiny.root}", "--users=u000,nobody")
  assert result.returncode == 1
  assert "Unknown user ids: ['nobody']" in result.stderr
  result = _serve(f"--export={tiny.root / 'missing'}", "--users=u000")
  assert result.returncode == 1 and "manifest.json is missing" in result.stderr


def test_faiss_backend_without_faiss_says_how_to_install(tiny, monkeypatch):
  monkeypatch.setitem(sys.modules, "faiss", None)  # Makes `import faiss` fail.
  with pytest.raises(ImportError, match="pip install faiss-cpu"):
    serving.Retriever.load(tiny.path, backend="faiss")


def test_cli_export_reproduces_evaluation(tmp_path):
  """`--mode=export` of a best checkpoint: serving's rankings give the evaluator's exact metrics.

  The checkpoint is an initial state saved by the run's own checkpointer: training steps would
  add a minute of step compilation and nothing that the export reads.
  """
  config = test_config.get_config()
  config.data.valid_fraction = 0.1  # Known items are then training plus validation pairs.
  config.eval.modes = ("hamming", "hierarchical")  # Continuous: see test_search_equals_item_index.
  workdir = tmp_path / "run"
  exp = experiment_lib.Experiment(config)
  best = exp.best_checkpointer(str(workdir))
  best.save(0, exp.initial_state(), config.to_dict(), force=True, score=0.0)
  best.close()
  record = experiment_lib.evaluate_checkpoint(config, str(workdir), which="best")
  result = subprocess.run(
    [sys.executable, "-m", "hashgnn_jax.main", "--config=configs/test.py", f"--workdir={workdir}",
     "--mode=export", "--checkpoint=best", "--config.data.valid_fraction=0.1"],
    cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
    timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert f"Export written to {workdir / 'export' / 'step_0'}" in result.stdout
  retriever = serving.Retriever.load(str(workdir / "export"))
  assert (retriever.step, retriever.manifest["checkpoint"]) == (0, "best")

  dataset = loader.load_dataset(config.data)
  eval_users = np.unique(dataset.test_users)
  num_held_out = np.bincount(dataset.test_users, minlength=dataset.num_users)[eval_users]
  cutoffs = tuple(config.eval.cutoffs)
  for protocol, exclude_known, candidates in (
      ("standard", True, config.eval.num_candidates),
      ("paper", False, config.eval.paper_candidates)):
    for mode in config.eval.modes:
      ids, _ = retriever.search(eval_users, k=max(cutoffs), mode=mode, num_candidates=candidates,
                                exclude_known=exclude_known, raw_ids=False)
      hits = metrics_lib.hit_matrix(ids, eval_users, dataset.test_users, dataset.test_items,
                                    dataset.num_items)
      got = metrics_lib.summarize(
        metrics_lib.ranking_metrics(hits, num_held_out, cutoffs, protocol=protocol))
      assert got == record["by_protocol"][protocol][mode], (protocol, mode)
