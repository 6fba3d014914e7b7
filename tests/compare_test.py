"""The comparison runner: planning, the run loop, Table 2 and the figures, and one real run."""

import json
import logging
import os
import pathlib
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import pytest

from hashgnn_jax import compare
from hashgnn_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_CONFIG = "configs/test.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# ml_collections loads config files with importlib's deprecated load_module (as in main.py).
pytestmark = pytest.mark.filterwarnings(
    r"ignore:the load_module\(\) method is deprecated:DeprecationWarning")


def _compare(*args, timeout=600):
  # One real CPU device: the four fake ones of conftest only slow a tiny run down.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "hashgnn_jax.compare", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _names(runs):
  return [run.name for run in runs]


# Planning.


def test_unknown_variant_fails_with_the_known_list():
  with pytest.raises(ValueError, match=r"\['nope'\].*paper, authors_code"):
    compare.plan_runs(["paper", "nope"], [], [], "/out")
  with pytest.raises(ValueError, match=r"\['bitz'\].*guidance, bits"):
    compare.plan_runs(["paper"], [], ["bitz"], "/out")


def test_unknown_variant_fails_on_the_command_line_before_training(tmp_path):
  result = _compare(f"--config={TEST_CONFIG}", "--variants=paper,nope", f"--out={tmp_path}")
  assert result.returncode != 0
  assert "nope" in result.stderr and "authors_code" in result.stderr
  assert not (tmp_path / "runs").exists()


def test_staged_variant_pulls_in_its_prerequisite_first(monkeypatch):
  monkeypatch.setattr(config_lib, "VARIANTS", ("paper", "graphsage", "lsh"))
  monkeypatch.setattr(config_lib, "VARIANT_STAGES", {"lsh": "graphsage"})
  runs = compare.plan_runs(["lsh", "paper", "graphsage"], ["--config.seed=1"], [], "/out")
  assert _names(runs) == ["graphsage", "lsh", "paper"]
  graphsage, lsh, paper = runs
  assert lsh.prerequisite == "graphsage" and graphsage.prerequisite is None
  assert lsh.own_overrides == ("--config.train.init_from=/out/runs/graphsage",)
  assert lsh.overrides == graphsage.overrides + lsh.own_overrides
  assert graphsage.overrides == paper.overrides
  assert graphsage.overrides[-1] == "--config.seed=1"


def test_studies_expand_to_named_runs_of_paper():
  user = ["--config.seed=3", "--config.train.num_steps=20"]
  runs = compare.plan_runs(["authors_code"], user, ["guidance", "bits"], "/out")
  assert _names(runs) == [
      "authors_code", "paper", "paper@p=1", "paper@p=0.8", "paper@p=0.6", "paper@p=0.5",
      "paper@p=0.4", "paper@bits=16", "paper@bits=32", "paper@bits=64", "paper@bits=128"]
  by_name = {run.name: run for run in runs}
  shared = compare.runner_overrides() + tuple(user)
  guided = by_name["paper@p=0.8"]
  assert (guided.variant, guided.study, guided.study_value) == ("paper", "guidance", 0.8)
  assert guided.overrides == shared + (
      "--config.guidance.schedule=constant", "--config.guidance.init=0.8",
      "--config.guidance.floor=0.8")
  assert by_name["paper@bits=16"].overrides == shared + ("--config.model.hash_bits=16",)
  assert by_name["paper"].overrides == shared and by_name["paper"].study is None


def test_studies_of_other_variants():
  runs = compare.plan_runs([], [], ["bits"], "/out", study_variants=("graphsage", "hash_ste"))
  assert _names(runs) == [f"{v}@bits={k}" for v in ("graphsage", "hash_ste")
                          for k in compare.HASH_BITS]
  assert {run.variant for run in runs[:4]} == {"graphsage"}
  with pytest.raises(ValueError, match=r"\['nope'\]"):
    compare.plan_runs([], [], ["bits"], "/out", study_variants=("nope",))
  with pytest.raises(ValueError, match="lsh"):
    compare.plan_runs([], [], ["bits"], "/out", study_variants=("lsh",))


def test_user_overrides_sit_between_runner_defaults_and_study_settings():
  user = ["--config.eval.cutoffs=(10,20)", "--config.model.hash_bits=64"]
  runs = compare.plan_runs(["authors_code"], user, ["bits"], "/out")
  defaults = compare.runner_overrides()
  assert defaults[0] == "--config.eval.cutoffs=(10,20,50,100,150,200)"
  # The runner's cutoffs give way to the user's: a repeated tuple override would append to it.
  kept = tuple(a for a in defaults if compare.override_key(a) != "eval.cutoffs")
  assert runs[0].overrides == kept + tuple(user)
  bits16 = {run.name: run for run in runs}["paper@bits=16"]
  assert bits16.overrides == kept + tuple(user) + ("--config.model.hash_bits=16",)
  # As hashgnn_jax.main resolves them: the user's over the variant, the study's over the user's.
  config = compare.resolve_config(TEST_CONFIG, "authors_code", runs[0].overrides)
  assert config.eval.cutoffs == (10, 20) and config.model.hash_bits == 64
  assert config.model.embed_dim == 16 and config.loss.rank == "bpr"
  assert compare.resolve_config(TEST_CONFIG, "paper", bits16.overrides).model.hash_bits == 16
  assert "--config.eval.extra_candidates=(100,)" in defaults
  assert config.eval.extra_candidates == (100,)


def test_overrides_are_taken_verbatim_from_the_command_line():
  argv = ["compare", f"--config={TEST_CONFIG}", "--config.seed", "3", "--variants=paper",
          "--noconfig.eval.exclude_train", "--config.eval.cutoffs=(10, 20)", "--config.seed=4"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_list("variants", None, "", flag_values=flag_values)
  flag_values(argv)
  assert compare.extract_overrides(argv[1:], flag_values) == [
      "--config.seed=3", "--noconfig.eval.exclude_train", "--config.eval.cutoffs=(10, 20)",
      "--config.seed=4"]
  with pytest.raises(AttributeError, match="bogus"):
    compare.resolve_config(TEST_CONFIG, "paper", ["--config.train.bogus=1"])


def test_config_file_modifiers_reach_every_run():
  # configs/alibaba.py:synthetic swaps the data for the generated graph; each run keeps it.
  run = compare.plan_runs(["hash_ste"], [], [], "/out")[0]
  command = compare.run_command(run, "configs/alibaba.py:synthetic", "/out")
  assert "--config=configs/alibaba.py:synthetic,hash_ste" in command
  config = compare.resolve_config("configs/alibaba.py:synthetic", "hash_ste", run.overrides)
  assert config.data.kind == "synthetic" and config.guidance.init == 0.0
  assert compare.resolve_config("configs/alibaba.py", "hash_ste", ()).data.kind == "alibaba"
  # A file whose get_config takes one variant says which name it does not know.
  with pytest.raises((ValueError, flags.Error), match="synthetic"):
    compare.resolve_config(TEST_CONFIG + ":synthetic", "graphsage", ())


# The run loop, with stand-in commands instead of training.


def _fake_training(run_dir):
  """A command that writes a test record as hashgnn_jax.main would, after a line of stderr."""
  record = {"split": "test", "step": 7, "by_protocol": {"standard": {"hamming": {"hr@20": 0.5}}},
            "num_users": 10, "num_items": 20, "num_eval_users": 9}
  script = ("import json, sys; print('training', file=sys.stderr); "
            f"json.dump({record!r}, open(sys.argv[1], 'w'))")
  return [sys.executable, "-c", script, os.path.join(run_dir, "eval_results.json")]


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path):
  out = str(tmp_path)
  runs = [compare.Run("bad", "paper", ()), compare.Run("staged", "paper", (), prerequisite="bad"),
          compare.Run("good", "authors_code", ())]

  def command_fn(run):
    if run.name == "bad":
      return [sys.executable, "-c",
              "import sys; print('boom: bad value', file=sys.stderr); sys.exit(3)"]
    return _fake_training(compare.run_dir(out, run.name))

  writes = []
  outcomes = compare.run_all(runs, out, command_fn, lambda outcomes: writes.append(outcomes))
  assert {name: o.status for name, o in outcomes.items()} == {
      "bad": "failed", "staged": "failed", "good": "finished"}
  assert "exit status 3" in outcomes["bad"].error
  assert outcomes["staged"].error == "prerequisite bad failed"
  assert "boom: bad value" in (tmp_path / "runs/bad/error.txt").read_text()
  assert "boom: bad value" in (tmp_path / "runs/bad/log.txt").read_text()
  assert "training" in (tmp_path / "runs/good/log.txt").read_text()
  assert not (tmp_path / "runs/staged").exists()
  assert not (tmp_path / "runs/good/error.txt").exists()
  assert len(writes) == 3  # After each of the first two runs, then at the end.

  configs = {run.name: compare.resolve_config(TEST_CONFIG, run.variant, ()).to_dict()
             for run in runs}
  header = {"config_file": TEST_CONFIG, "overrides": [], "command": ["compare"]}
  results = compare.collect_results(runs, outcomes, configs, out, header)
  good = results["runs"][2]
  assert (good["step"], good["checkpoint"], good["seed"]) == (7, "latest", 0)
  assert good["metrics"] == {"standard": {"hamming": {"hr@20": 0.5}}}
  assert good["config"]["loss"]["rank"] == "bpr"  # authors_code
  table = compare.format_table(results)
  assert "| bad | failed |" in table and "| good | **0.5000** |" in table
  assert "prerequisite bad failed" in table

  # Again: the finished run is skipped, the failed one is tried again.
  outcomes = compare.run_all(runs, out, command_fn, lambda outcomes: None)
  assert outcomes["good"].status == "finished" and outcomes["good"].wall_seconds > 0

  def attempts(name):
    log = (tmp_path / "runs" / name / "log.txt").read_text()
    return sum(line.startswith("# ") for line in log.splitlines())

  assert (attempts("bad"), attempts("good")) == (2, 1)


# Table 2 and the figures, from a hand-made results structure.


def _metrics(scale, cutoffs=(10, 20, 50, 100, 150, 200)):
  modes = ("hamming", "hierarchical", "hierarchical@100", "continuous", "popularity")
  return {protocol: {mode: {f"{name}@{n}": scale * (i + 1) * n / 1000
                            for name in ("hr", "ndcg") for n in cutoffs}
                     for i, mode in enumerate(modes)}
          for protocol in ("standard", "paper")}


def _entry(name, scale, status="finished", study=None, value=None):
  config = config_lib.default_config().to_dict()
  entry = {"name": name, "variant": name.split("@")[0], "status": status, "study": study,
           "study_value": value, "own_overrides": [], "seed": 0, "config": config,
           "wall_seconds": 12.0}
  if status == "finished":
    entry.update(step=100, checkpoint="best", metrics=_metrics(scale), num_users=30,
                 num_items=40, num_eval_users=25)
  else:
    entry["error"] = "exit status 1"
  return entry


def _results(with_studies):
  runs = [_entry("paper", 1.0), _entry("graphsage", 1.5), _entry("lsh", 0, status="failed")]
  if with_studies:
    runs += [_entry(f"paper@p={p:g}", p, study="guidance", value=p) for p in (1, 0.8, 0.5)]
    runs += [_entry(f"paper@bits={k}", k / 32, study="bits", value=k) for k in (16, 32, 64)]
  return {"config_file": "configs/gowalla.py", "overrides": ["--config.train.num_steps=5"],
          "runs": runs}


def test_table_has_paper_layout_with_best_in_bold():
  table = compare.format_table(_results(with_studies=False))
  assert table.startswith("# Table 2: configs/gowalla.py\n")
  assert "`--config.train.num_steps=5`" in table and "kind=synthetic" in table
  sections = [line for line in table.splitlines() if line.startswith("## ")]
  assert sections == [
      "## standard protocol, Hamming", "## standard protocol, hierarchical@100, M = 100",
      "## standard protocol, hierarchical, M = 500 (eval.num_candidates)",
      "## standard protocol, continuous", "## paper protocol, Hamming",
      "## paper protocol, hierarchical@100, M = 100",
      "## paper protocol, hierarchical, M = 500 (eval.paper_candidates)",
      "## paper protocol, continuous", "## Runs"]
  lines = table.splitlines()
  start = lines.index("## standard protocol, Hamming")
  assert lines[start + 2] == "| run | HR@20 | HR@50 | HR@100 | NDCG@20 | NDCG@50 | NDCG@100 |"
  assert lines[start + 3] == "|---|---|---|---|---|---|---|"
  # Hamming is the first mode (i = 0): value = scale * n / 1000; graphsage (1.5x) is best.
  assert lines[start + 4] == "| paper | 0.0200 | 0.0500 | 0.1000 | 0.0200 | 0.0500 | 0.1000 |"
  assert lines[start + 5] == ("| graphsage | **0.0300** | **0.0750** | **0.1500** | **0.0300** | "
                              "**0.0750** | **0.1500** |")
  assert lines[start + 6] == "| lsh | failed | | | | | |"
  assert "popularity" not in table
  assert "- lsh (variant lsh, seed 0): failed: exit status 1" in table


def test_figures_are_pngs_and_study_figures_need_their_runs(tmp_path):
  written = compare.write_plots(_results(with_studies=False), str(tmp_path))
  assert sorted(os.path.basename(p) for p in written) == [
      "fig3_hamming_hr.png", "fig3_hamming_hr_paper.png"]
  written = compare.write_plots(_results(with_studies=True), str(tmp_path))
  assert sorted(os.path.basename(p) for p in written) == [
      "fig3_hamming_hr.png", "fig3_hamming_hr_paper.png", "fig5c_bits.png", "fig7_guidance.png"]
  for path in written:
    assert pathlib.Path(path).read_bytes()[:8] == PNG_MAGIC, path
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]


def test_figures_without_matplotlib_warn_with_the_extra(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # Makes `import matplotlib` fail.
  with caplog.at_level(logging.WARNING):
    assert compare.write_plots(_results(with_studies=True), str(tmp_path)) == []
  assert 'pip install -e ".[plots]"' in caplog.text
  assert not os.listdir(tmp_path)


# End to end.


def test_runner_trains_both_variants_then_skips_them(tmp_path):
  out = tmp_path / "compare"
  args = [f"--config={TEST_CONFIG}", "--variants=paper,authors_code", f"--out={out}",
          "--config.train.num_steps=20", "--config.eval.cutoffs=(10,20)",
          "--config.checkpoint.every_steps=20"]
  result = _compare(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[1/2] paper: training" in result.stderr and "ETA" in result.stderr
  results = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in results["runs"]] == ["paper", "authors_code"]
  for run in results["runs"]:
    assert run["status"] == "finished", run
    assert run["step"] == 20 and run["checkpoint"] == "latest" and run["seed"] == 0
    assert run["config"]["train"]["num_steps"] == 20
    assert run["config"]["eval"]["cutoffs"] == [10, 20]
    assert set(run["metrics"]["standard"]["hamming"]) == {"hr@10", "hr@20", "ndcg@10",
                                                           "ndcg@20"}
    assert (out / "runs" / run["name"] / "log.txt").stat().st_size > 0
  assert results["runs"][1]["config"]["loss"]["rank"] == "bpr"  # The variant under the budget.
  assert results["overrides"] == args[3:]
  table = (out / "table.md").read_text()
  assert "| paper |" in table and "| authors_code |" in table and "HR@20" in table
  assert (out / "fig3_hamming_hr.png").read_bytes()[:8] == PNG_MAGIC

  records = [out / "runs" / name / "eval_results.json" for name in ("paper", "authors_code")]
  mtimes = [path.stat().st_mtime_ns for path in records]
  start = time.monotonic()
  result = _compare(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert time.monotonic() - start < 60
  assert result.stderr.count("already finished, skipped") == 2
  assert [path.stat().st_mtime_ns for path in records] == mtimes
