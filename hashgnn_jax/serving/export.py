"""`--mode=export`: a checkpoint's codes for every user and item, written for serving.

The layout is `format.py`'s. Each step folder is built in a hidden temporary sibling, every file
fsynced, and renamed into place only when complete; `latest.json` is then replaced atomically. A
reader thus sees the previous export or the new one, never part of one, and a failed export leaves
nothing behind. Folders of earlier steps stay until deleted by hand.
"""

import datetime
import os
import secrets
import shutil

from absl import logging
import ml_collections
import numpy as np

from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax import distributed
from hashgnn_jax import experiment as experiment_lib
from hashgnn_jax import fileio
from hashgnn_jax.retrieval import codes as codes_lib
from hashgnn_jax.serving import format as format_lib

SUBDIR = "export"


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
                      which: str = "latest") -> str | None:
  """Restores a checkpoint as `--mode=eval` does, encodes every node and writes WORKDIR/export.

  which="latest" takes `step` (latest if None) from WORKDIR/checkpoints; which="best" takes the
  best-by-validation checkpoint. Returns the step folder written (None on processes other than 0,
  which compute the same codes but leave the writing to process 0).
  """
  exp = experiment_lib.Experiment(config)
  params, step = experiment_lib.restore_params(exp, workdir, step, which)
  node_z = exp.encode(params)  # [U + I, K]
  if not distributed.is_main():
    return None
  path = write_export(os.path.join(workdir, SUBDIR), node_z=node_z, known=exp.known_at_test,
                      user_ids=exp.dataset.user_ids, item_ids=exp.dataset.item_ids,
                      config=config, step=step, checkpoint=which)
  logging.info("Exported step %d (%s checkpoint) to %s.", step, which, path)
  return path


def write_export(root: str, *, node_z: np.ndarray, known: graph_lib.BipartiteGraph, user_ids,
                 item_ids, config: ml_collections.ConfigDict, step: int,
                 checkpoint: str) -> str:
  """Writes ROOT/step_{step} atomically, points ROOT/latest.json at it and returns its path.

  Args:
    root: the export root, e.g. WORKDIR/export.
    node_z: continuous codes [U + I, K], users first, as `encode.encode_nodes` returns them.
    known: the graph of each user's known items (serving may exclude them); gives U and I.
    user_ids, item_ids: raw ids [U] and [I] (numbers or text), or None for row numbers.
    config: the run's config; eval.tie_seed, eval.user_chunk and eval.num_candidates become the
      export's search settings, so that serving ranks as the evaluator does.
    step, checkpoint: provenance: the checkpoint's step and "latest" or "best".
  """
  num_users, num_items = known.num_users, known.num_items
  node_z = np.asarray(node_z, np.float32)
  if node_z.ndim != 2 or node_z.shape[0] != num_users + num_items:
    raise ValueError(f"node_z must have shape [{num_users + num_items}, K] (users, then items), "
                     f"got {node_z.shape}.")
  words = np.asarray(codes_lib.pack_bits(node_z))  # [U + I, W]
  num_known = int(known.indptr[num_users])  # User rows come first in the CSR.
  arrays = {
    "item_codes": words[num_users:],
    "item_z": node_z[num_users:],
    "user_codes": words[:num_users],
    "user_z": node_z[:num_users],
    "item_ids": _raw_ids(item_ids, num_items, "item_ids"),
    "user_ids": _raw_ids(user_ids, num_users, "user_ids"),
    "known_indptr": known.indptr[:num_users + 1].astype(np.int64),
    "known_items": (known.indices[:num_known] - num_users).astype(np.int32),
  }
  manifest = {
    "format_version": format_lib.FORMAT_VERSION,
    "num_users": num_users,
    "num_items": num_items,
    "bits": int(node_z.shape[1]),
    "words": int(words.shape[1]),
    "num_known": num_known,
    "tie_seed": int(config.eval.tie_seed),
    "user_chunk": int(config.eval.user_chunk),
    "num_candidates": int(config.eval.num_candidates),
    "step": int(step),
    "checkpoint": checkpoint,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "config": config.to_dict(),
    "arrays": {},
  }
  # The reader's layout, checked here too, so that writer and reader agree by construction.
  for array_name, (shape, dtype) in format_lib.array_specs(manifest).items():
    array = arrays[array_name]
    if array.shape != shape or (dtype is not None and array.dtype.str != dtype):
      raise ValueError(f"{array_name} is {array.dtype.str} {array.shape}; the export format "
                       f"needs {dtype or 'int64 or text'} {shape}.")
  os.makedirs(root, exist_ok=True)
  name = f"step_{step}"
  # Not tempfile.mkdtemp, whose mode 0700 would outlive the rename; os.mkdir honours the umask.
  staged = os.path.join(root, f".tmp_{name}_{os.getpid()}_{secrets.token_hex(4)}")
  os.mkdir(staged)
  try:
    for array_name, array in arrays.items():
      path = os.path.join(staged, f"{array_name}.npy")
      with open(path, "xb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
      manifest["arrays"][array_name] = {
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "bytes": os.path.getsize(path),
        "sha256": fileio.file_sha256(path),
      }
    fileio.write_json_atomic(os.path.join(staged, format_lib.MANIFEST), manifest)
    _fsync_directory(staged)
    final = os.path.join(root, name)
    _install(staged, final)
  except BaseException:
    shutil.rmtree(staged, ignore_errors=True)
    raise
  fileio.write_json_atomic(os.path.join(root, format_lib.POINTER),
                              {"directory": name, "step": int(step), "checkpoint": checkpoint})
  _fsync_directory(root)
  return final


def _raw_ids(ids, size: int, field: str) -> np.ndarray:
  """Raw ids [size] as int64 or text (what .npy stores without pickle); row numbers if None."""
  if ids is None:
    return np.arange(size, dtype=np.int64)
  ids = np.asarray(ids)
  if ids.shape != (size,):
    raise ValueError(f"{field} must have shape ({size},), got {ids.shape}.")
  if ids.dtype.kind in "iu":
    return ids.astype(np.int64)
  if ids.dtype.kind in "OSU":
    return ids.astype(str)
  raise ValueError(f"{field} must hold integer or text ids, got dtype {ids.dtype}.")


def _fsync_directory(path: str) -> None:
  """Makes the entries (new files, renames) of folder `path` durable."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _install(staged: str, final: str) -> None:
  """Renames the complete folder `staged` to `final`; an existing `final` is swapped out only now.

  POSIX cannot rename a folder over a non-empty one, so a re-export of the same step moves the
  old folder aside first and puts it back if the second rename fails.
  """
  if not os.path.exists(final):
    os.rename(staged, final)
    return
  retired = staged + ".old"
  os.rename(final, retired)
  try:
    os.rename(staged, final)
  except BaseException:
    os.rename(retired, final)
    raise
  shutil.rmtree(retired)
