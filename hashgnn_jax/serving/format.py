"""The export format: one folder of `.npy` arrays and a `manifest.json`, defined once.

The writer (`export.py`) and the reader (`retriever.py`) both import this module, so the array
names, shapes, dtypes and manifest keys cannot drift apart. Reading an export checks everything
the manifest promises (format version, keys, each array's shape, dtype, size and SHA-256, the
known-items CSR), so a damaged, truncated or half-copied export fails with the file's name
instead of serving wrong items.

    WORKDIR/export/
      latest.json          {"directory": "step_N", "step": N, "checkpoint": "latest"|"best"}
      step_N/
        manifest.json      format version, sizes, tie seed, step, config, and per array its
                           shape, dtype, bytes and SHA-256
        item_codes.npy     uint32 [I, W]  packed sign bits (codes.pack_bits), W = ceil(K / 32)
        item_z.npy         float32 [I, K] continuous codes
        user_codes.npy     uint32 [U, W]
        user_z.npy         float32 [U, K]
        item_ids.npy       [I] raw item id of each row (int64 or text; row numbers if none)
        user_ids.npy       [U] raw user id of each row
        known_indptr.npy   int64 [U + 1]  CSR offsets of each user's known items
        known_items.npy    int32 [E]      known item rows: training plus validation pairs
"""

import json
import os

import numpy as np

from hashgnn_jax import fileio
from hashgnn_jax.retrieval import codes as codes_lib

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# In an export root: names the step folder written last (`export.py` swaps it atomically).
POINTER = "latest.json"


class InvalidExportError(ValueError):
  """An export whose manifest or arrays are not what this version of the reader expects."""


def array_specs(manifest: dict) -> dict[str, tuple[tuple[int, ...], str | None]]:
  """(shape, dtype) of every array an export holds, as its manifest's sizes imply.

  Each array is stored as `<name>.npy`. A dtype of None marks the raw id maps, which hold int64
  or text ids, whichever the data set had.
  """
  users, items = manifest["num_users"], manifest["num_items"]
  bits, words = manifest["bits"], manifest["words"]
  return {
    "item_codes": ((items, words), "<u4"),  # Packed sign bits, as codes_lib.pack_bits.
    "item_z": ((items, bits), "<f4"),
    "user_codes": ((users, words), "<u4"),
    "user_z": ((users, bits), "<f4"),
    "item_ids": ((items,), None),  # Raw id of each item row.
    "user_ids": ((users,), None),
    "known_indptr": ((users + 1,), "<i8"),  # CSR of each user's known items.
    "known_items": ((manifest["num_known"],), "<i4"),
  }


def export_directory(path: str) -> str:
  """The step folder at `path`: `path` itself, or the one its `latest.json` names."""
  pointer = os.path.join(path, POINTER)
  if os.path.exists(os.path.join(path, MANIFEST)) or not os.path.exists(pointer):
    return path
  try:
    with open(pointer, encoding="utf-8") as f:
      name = json.load(f)["directory"]
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise InvalidExportError(
      f"{pointer}: unreadable export pointer ({error!r}); expected JSON "
      '{"directory": "step_N"}.'
    ) from None
  return os.path.join(path, name)


def _read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} is missing: {directory} is not an export (written by --mode=export), nor an export "
      f"root holding {POINTER}."
    )
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as error:
    raise InvalidExportError(f"{path}: unreadable manifest ({error}).") from None
  if not isinstance(manifest, dict):
    raise InvalidExportError(f"{path}: expected a JSON object, got {type(manifest).__name__}.")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise InvalidExportError(
      f"{path}: format_version {version!r}; this code reads version {FORMAT_VERSION}."
    )
  required = ("num_users", "num_items", "bits", "words", "num_known", "tie_seed", "user_chunk",
              "num_candidates", "step", "arrays")
  missing = [key for key in required if key not in manifest]
  if missing:
    raise InvalidExportError(f"{path}: lacks the key(s) {missing}.")
  if manifest["words"] != -(-manifest["bits"] // codes_lib.WORD_BITS):
    raise InvalidExportError(
      f"{path}: {manifest['bits']} bits need {-(-manifest['bits'] // codes_lib.WORD_BITS)} "
      f"words, the manifest says {manifest['words']}."
    )
  return manifest


def _describe(shape, dtype) -> str:
  return f"{'int64 or text' if dtype is None else np.dtype(dtype).name} {tuple(shape)}"


def _read_array(directory: str, name: str, entry: dict, shape, dtype, *,
                verify_checksums: bool) -> np.ndarray:
  """Loads `<name>.npy` after checking it against its manifest entry and the expected layout."""
  path = os.path.join(directory, f"{name}.npy")
  expected = _describe(shape, dtype)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; the export needs {name} as {expected}.")
  manifest_path = os.path.join(directory, MANIFEST)
  try:
    listed_shape, listed_dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
    listed_bytes, listed_sha256 = entry["bytes"], entry["sha256"]
  except (KeyError, TypeError) as error:
    raise InvalidExportError(f"{manifest_path}: the entry of {name} needs a shape, dtype, bytes "
                             f"and sha256 ({error!r}).") from None
  id_dtype_ok = dtype is None and (listed_dtype == np.int64 or listed_dtype.kind == "U")
  if listed_shape != shape or not (id_dtype_ok or listed_dtype == dtype):
    raise InvalidExportError(f"{manifest_path}: lists {name} as "
                             f"{_describe(listed_shape, listed_dtype)}, expected {expected}.")
  size = os.path.getsize(path)
  if size != listed_bytes:
    state = "truncated" if size < listed_bytes else "too long"
    raise InvalidExportError(f"{path}: {size} bytes, the manifest expects {listed_bytes} "
                             f"({state}).")
  if verify_checksums and fileio.file_sha256(path) != listed_sha256:
    raise InvalidExportError(f"{path}: SHA-256 differs from the manifest's {listed_sha256}; the "
                             "file is corrupt or was changed after export.")
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except ValueError as error:
    raise InvalidExportError(f"{path}: not a readable .npy file ({error}).") from None
  if array.shape != shape or array.dtype != listed_dtype:
    raise InvalidExportError(
      f"{path}: holds {_describe(array.shape, array.dtype)}, expected {expected}."
    )
  # A copy in memory: a later export may replace the file while this one serves.
  return np.array(array)


def read_export(path: str, *, verify_checksums: bool = True) -> tuple[str, dict, dict]:
  """Validates the export at `path` and returns (its step folder, manifest, arrays by name).

  Raises FileNotFoundError for a missing manifest or array file and InvalidExportError for an
  unknown format version, a malformed manifest, a size, checksum, shape or dtype mismatch, or an
  inconsistent known-items CSR, each naming the file and what was expected.
  """
  directory = export_directory(path)
  manifest = _read_manifest(directory)
  specs = array_specs(manifest)
  listed = manifest["arrays"]
  if not isinstance(listed, dict) or set(listed) != set(specs):
    raise InvalidExportError(
      f"{os.path.join(directory, MANIFEST)}: \"arrays\" must list exactly {sorted(specs)}, got "
      f"{sorted(listed) if isinstance(listed, dict) else listed!r}."
    )
  arrays = {
    name: _read_array(directory, name, listed[name], shape, dtype,
                      verify_checksums=verify_checksums)
    for name, (shape, dtype) in specs.items()
  }
  indptr = arrays["known_indptr"]
  if indptr[0] != 0 or indptr[-1] != manifest["num_known"] or np.any(np.diff(indptr) < 0):
    raise InvalidExportError(
      f"{os.path.join(directory, 'known_indptr.npy')}: expected non-decreasing CSR offsets from "
      f"0 to num_known={manifest['num_known']}."
    )
  return directory, manifest, arrays
