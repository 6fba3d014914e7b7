"""Restore falls back past unreadable checkpoints, and never deletes one."""

import gc
import glob
import logging
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax.train import checkpointing

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import test as test_config  # pylint: disable=g-import-not-at-top

# A failed TensorStore read leaves Orbax's pending read coroutines behind; collected after their
# event loop closed, they raise "Event loop is closed" into sys.unraisablehook. Collect them here,
# inside this module's tests, so that no later test sees them.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
  yield
  gc.collect()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with checkpoints at steps 1, 2 and 3 (states told apart by their step)."""
  exp = experiment_lib.Experiment(test_config.get_config())
  workdir = tmp_path_factory.mktemp("saved")
  ckpt = checkpointing.Checkpointer(str(workdir), every_steps=1, max_to_keep=5)
  state = exp.initial_state()
  for step in (1, 2, 3):
    ckpt.save(step, state.replace(step=state.step + step), {}, force=True)
  ckpt.close()
  return exp, workdir


def _truncate_largest_array(step_dir):
  path = max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(100)


def _damaged_copy(source, tmp_path, damage, steps=(3,)):
  """A copy of `source` whose checkpoints at `steps` went through `damage`, and its
  Checkpointer: (workdir, ckpt)."""
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  for step in steps:
    damage(workdir / "checkpoints" / str(step))
  return workdir, checkpointing.Checkpointer(str(workdir), every_steps=1, max_to_keep=5)


CORRUPTIONS = {
    "truncated array file": _truncate_largest_array,
    "missing item": lambda step_dir: shutil.rmtree(f"{step_dir}/state"),
    "missing metadata": lambda step_dir: os.remove(f"{step_dir}/state/_METADATA"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_unreadable_latest_falls_back_with_a_warning(saved, tmp_path, caplog, corruption):
  exp, source = saved
  workdir, ckpt = _damaged_copy(source, tmp_path, CORRUPTIONS[corruption])
  with caplog.at_level(logging.WARNING):
    state = ckpt.restore(exp.abstract_state())
  assert int(state.step) == 2
  assert any("step 3" in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records)
  # Left in place by a read-only restore (evaluation).
  assert (workdir / "checkpoints" / "3").exists() and ckpt.all_steps() == [1, 2, 3]
  ckpt.close()


def test_resuming_sets_the_bad_step_aside_and_can_save_it_again(saved, tmp_path):
  exp, source = saved
  workdir, ckpt = _damaged_copy(source, tmp_path, _truncate_largest_array)
  state = ckpt.restore(exp.abstract_state(), set_aside_unreadable=True)
  assert int(state.step) == 2
  moved = workdir / checkpointing.CORRUPT_SUBDIR / "3"
  assert moved.is_dir() and (moved / "state").is_dir()  # Kept whole, for inspection.
  assert sorted(ckpt.all_steps()) == [1, 2]
  assert ckpt.save(3, state.replace(step=state.step + 1), {}, force=True)
  ckpt.wait()
  np.testing.assert_array_equal(int(ckpt.restore(exp.abstract_state()).step), 3)
  ckpt.close()


def test_no_readable_checkpoint_names_the_folder_and_deletes_nothing(saved, tmp_path):
  exp, source = saved
  workdir, ckpt = _damaged_copy(source, tmp_path, _truncate_largest_array, steps=(1, 2, 3))
  with pytest.raises(RuntimeError, match=f"No readable checkpoint under {workdir}/checkpoints"):
    ckpt.restore(exp.abstract_state(), set_aside_unreadable=True)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]
  assert not (workdir / checkpointing.CORRUPT_SUBDIR).exists()


def test_an_explicit_step_does_not_fall_back(saved, tmp_path):
  exp, source = saved
  _, ckpt = _damaged_copy(source, tmp_path, _truncate_largest_array)
  with pytest.raises(Exception, match="reading array"):
    ckpt.restore(exp.abstract_state(), step=3)
  assert int(ckpt.restore(exp.abstract_state(), step=2).step) == 2
