"""Orbax checkpoints of the train state under WORKDIR/checkpoints."""

import json
import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from hashgnn_jax import distributed
from hashgnn_jax.train import state as state_lib
from hashgnn_jax.train import tables

# Where a run's unreadable checkpoints go when it resumes past them (`Checkpointer.restore`).
CORRUPT_SUBDIR = "checkpoints_corrupt"


class ConfigMismatchError(ValueError):
  """A checkpoint that reads fine but does not fit this run's train state (other settings)."""


class Checkpointer:
  """Periodic, asynchronous saves and restores onto this run's device."""

  def __init__(self, workdir: str, *, every_steps: int, max_to_keep: int,
               subdir: str = "checkpoints", keep_best: bool = False,
               sharding: jax.sharding.NamedSharding | None = None,
               rows: tables.RowSharding | None = None):
    """With `keep_best`, keeps only the `max_to_keep` saves of highest `metrics["score"]`.

    sharding: the replicated layout of the saved state over every process's devices, needed
    when several processes save (`distributed.as_global`). rows: the sharded layout's owners,
    whose [n, L, E] blocks are saved as [n·L, E] split by rows and restored back into blocks.
    """
    self._sharding = sharding
    self._rows = rows
    self.directory = os.path.join(os.path.abspath(workdir), subdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=max(every_steps, 1),
        enable_async_checkpointing=True,
        best_fn=(lambda metrics: metrics["score"]) if keep_best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not keep_best,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, config_dict: dict, *, force: bool = False,
           score: float | None = None) -> bool:
    """Starts a save when the interval says so (or `force`); returns whether it did.

    Orbax writes to a temporary folder and renames it when complete, so a crash never leaves a
    checkpoint that restore would pick up half-written.
    """
    # Decided here, once, so the state is converted only for a save (not on every step).
    if not (force or self._manager.should_save(step)):
      return False
    if self._rows is not None:
      state = state_lib.map_tables(self._rows.to_saved, state)
    if jax.process_count() > 1:
      if self._sharding is None:
        raise ValueError("Saving from several processes needs the Checkpointer's sharding.")
      state = distributed.as_global(state, self._sharding)
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                config=ocp.args.JsonSave(config_dict)),
        force=True,
        metrics=None if score is None else {"score": float(score)},
    )

  def restore(self, abstract_state, step: int | None = None, config_dict: dict | None = None,
              set_aside_unreadable: bool = False):
    """Restores the state at `step` (latest if None) into the structure of `abstract_state`.

    The table and its moments may have been saved with another number of rows (the other
    layout, or the sharded one over another device count): past the graph's nodes rows are
    padding, so they are cut or padded with zeros to the target's.

    If the saved state does not fit that structure and `config_dict` (this run's config) is
    given, the error names the settings that differ from the run that wrote the checkpoint.

    Without `step`, an unreadable latest checkpoint (a truncated array file, a missing item, bad
    metadata) gives way to the newest readable one, with a warning naming each bad step; with
    none readable, the error names the folder. A bad checkpoint is never deleted: with
    `set_aside_unreadable` (a run that will save those steps again) it is moved to
    WORKDIR/checkpoints_corrupt/STEP, otherwise it stays where it is.
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint found under {self.directory}.")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(
            f"No checkpoint for step {step} under {self.directory}; available: {sorted(steps)}.")
      return self._restore_step(abstract_state, step, config_dict)
    unreadable = []
    for candidate in sorted(steps, reverse=True):
      try:
        state = self._restore_step(abstract_state, candidate, config_dict)
      except ConfigMismatchError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        # Orbax and TensorStore raise plain Exception, ValueError or KeyError for damaged files.
        logging.warning("The checkpoint at step %d under %s is unreadable (%s: %s); trying the "
                        "one before it.", candidate, self.directory, type(error).__name__,
                        str(error).splitlines()[0][:300] if str(error) else "")
        unreadable.append(candidate)
        continue
      if unreadable and set_aside_unreadable:
        self._set_aside(unreadable)
      return state
    raise RuntimeError(f"No readable checkpoint under {self.directory}: steps {unreadable} all "
                       "failed to restore (warnings above); they are left in place.")

  def _restore_step(self, abstract_state, step: int, config_dict: dict | None):
    strict = not self._only_table_rows_differ(abstract_state, step, config_dict)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state, strict=strict)))
    except ValueError as error:
      if "do not match" not in str(error):
        raise
      raise ConfigMismatchError(
          f"The checkpoint at step {step} under {self.directory} does not fit this run's train "
          f"state (other model or optimizer settings). {self._differences(step, config_dict)}"
      ) from error
    if self._rows is not None:
      return state_lib.map_tables(self._rows.from_saved, restored.state)
    return restored.state

  def _only_table_rows_differ(self, abstract_state, step: int, config_dict: dict | None) -> bool:
    """Whether the saved state has the target's leaves and shapes but for the row counts of
    the table and moments, each at least the graph's node count: the one difference that
    padding or cutting rows mends. Raises ConfigMismatchError naming the leaves where other
    shapes differ (the run's settings do); another tree restores strictly and fails there."""
    reader = ocp.StandardCheckpointer()
    try:
      saved = _shapes(reader.metadata(
          os.path.join(self.directory, str(step), "state")).item_metadata.tree)
    except Exception:  # pylint: disable=broad-except
      return False  # Unreadable metadata: the strict restore says what is wrong.
    finally:
      reader.close()  # Its async machinery, started for this one read.
    target = _shapes(abstract_state)
    if saved.keys() != target.keys():
      return False
    differ = sorted(path for path in target if saved[path] != target[path])
    num_rows = target[("node_marks",)][0] - 1  # Marks cover the nodes and one spare slot.
    rows_only = all(p in state_lib.TABLE_PATHS and saved[p][1:] == target[p][1:]
                    and min(saved[p][0], target[p][0]) >= num_rows for p in differ)
    if not rows_only:
      shapes = "; ".join(f"{'/'.join(p)}: {saved[p]} -> {target[p]}" for p in differ[:4])
      raise ConfigMismatchError(
          f"The checkpoint at step {step} under {self.directory} does not fit this run's train "
          f"state: shapes differ ({shapes}). {self._differences(step, config_dict)}")
    return bool(differ)

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable step folders out of Orbax's sight, so the run can save those steps."""
    corrupt = os.path.join(os.path.dirname(self.directory), CORRUPT_SUBDIR)
    if distributed.is_main():
      os.makedirs(corrupt, exist_ok=True)
      for step in steps:
        target = os.path.join(corrupt, str(step))
        suffix = 1
        while os.path.exists(target):  # An earlier resume set the same step aside.
          target = os.path.join(corrupt, f"{step}.{suffix}")
          suffix += 1
        os.replace(os.path.join(self.directory, str(step)), target)
        logging.warning("Moved the unreadable checkpoint of step %d to %s (kept for inspection).",
                        step, target)
    distributed.barrier("unreadable checkpoints set aside")
    self._manager.reload()

  def _differences(self, step: int, config_dict: dict | None) -> str:
    """The config keys whose values differ between this run and the checkpoint's writer."""
    if config_dict is None:
      return ""
    saved = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    # Through JSON, so that tuples compare equal to the lists they were saved as.
    ours, theirs = (_flatten(json.loads(json.dumps(d))) for d in (config_dict, saved.config))
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if not keys:
      return "Its config equals this run's."
    return "Settings that differ (checkpoint -> this run): " + "; ".join(
        f"config.{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in keys) + "."

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def trained_params(workdir: str) -> tuple[dict, str, int]:
  """(parameters as host arrays, "best" or "latest", step) of the run in `workdir`.

  Its best checkpoint by validation if it kept one, else its latest. Restored as saved, with no
  target structure, so a run of other settings (a variant without a hash layer, say) can read
  the parts it shares.
  """
  for subdir, which in (("checkpoints_best", "best"), ("checkpoints", "latest")):
    directory = os.path.join(os.path.abspath(workdir), subdir)
    if not os.path.isdir(directory):
      continue
    with ocp.CheckpointManager(directory) as manager:
      step = manager.best_step() if which == "best" else manager.latest_step()
      if which == "best" and step is None:
        step = manager.latest_step()  # Its metrics are not read back without the options.
      if step is None:
        continue
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      return jax.device_get(restored.state["params"]), which, int(step)
  raise FileNotFoundError(f"No checkpoint under {workdir}/checkpoints_best or "
                          f"{workdir}/checkpoints: config.train.init_from must name the workdir "
                          "of a trained run.")


def _shapes(tree) -> dict:
  """{path of names: shape} of a tree's arrays (a train state, or a checkpoint's metadata)."""
  def name(key):
    for field in ("name", "key", "idx"):
      if hasattr(key, field):
        return str(getattr(key, field))
    return str(key)

  return {tuple(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flatten(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def abstract_like(tree, sharding: jax.sharding.Sharding):
  """ShapeDtypeStructs of `tree` with `sharding`: the restore target's layout.

  Orbax reads a checkpoint into whatever devices the sharding names, so a run restores one
  written on another number of devices or processes.
  """
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
