"""Top-k item retrieval from an export written by `--mode=export` (see `export.py`).

An export is a folder of `.npy` arrays and a `manifest.json` that lists the shape, dtype, size and
SHA-256 of each. `Retriever.load` checks all of that before serving, so a damaged, truncated or
half-copied export fails with the file's name instead of returning wrong items. Search runs on
`retrieval.ItemIndex` with the export's tie seed, so its rankings equal the evaluator's.

    retriever = Retriever.load("WORKDIR/export")
    item_ids, scores = retriever.search(["u17", "u4"], k=50, mode="hierarchical",
                                        exclude_known=True)
"""

import json
import os

import numpy as np

from hashgnn_jax import fileio
from hashgnn_jax import graph as graph_lib
from hashgnn_jax import retrieval

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# In an export root: names the step folder written last (`export.py` swaps it atomically).
POINTER = "latest.json"
BACKENDS = ("jax", "faiss")


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
    "item_codes": ((items, words), "<u4"),  # Packed sign bits, as retrieval.pack_bits.
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
  if manifest["words"] != -(-manifest["bits"] // retrieval.WORD_BITS):
    raise InvalidExportError(
      f"{path}: {manifest['bits']} bits need {-(-manifest['bits'] // retrieval.WORD_BITS)} "
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


class _IdMap:
  """Raw ids to rows by binary search over the sorted ids (no Python dict of millions)."""

  def __init__(self, raw_ids: np.ndarray, what: str, path: str):
    self._what = what
    self._order = np.argsort(raw_ids, kind="stable")  # [n]
    self._sorted = raw_ids[self._order]  # [n]
    if np.any(self._sorted[1:] == self._sorted[:-1]):
      raise InvalidExportError(f"{path}: raw ids repeat, so they map to rows ambiguously.")

  def rows(self, ids) -> np.ndarray:
    """Row of each raw id in `ids` [C]; KeyError naming those that are unknown."""
    ids = np.asarray(ids)
    if self._sorted.dtype.kind == "U":
      ids = ids.astype(str)  # A number written for a text id means that text.
    elif ids.size and ids.dtype.kind not in "iu":
      raise KeyError(f"{self._what} ids of this export are integers, got {ids.dtype} ids.")
    positions = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)  # [C]
    found = self._sorted[positions] == ids
    if not found.all():
      raise KeyError(_unknown_message(self._what, ids[~found]))
    return self._order[positions]


def _unknown_message(what: str, unknown: np.ndarray) -> str:
  shown = unknown[:10].tolist()
  more = f" and {unknown.size - 10} more" if unknown.size > 10 else ""
  return f"Unknown {what} ids: {shown}{more}."


def _unpack_bits(words: np.ndarray, num_bits: int) -> np.ndarray:
  """±1 codes [C, K] whose `retrieval.pack_bits` is `words` [C, W]: the inverse packing."""
  shifts = np.arange(retrieval.WORD_BITS, dtype=np.uint32)
  bits = (words[:, :, None] >> shifts) & 1  # [C, W, 32]
  bits = bits.reshape(words.shape[0], -1)[:, :num_bits]  # [C, K]
  return np.where(bits == 1, 1.0, -1.0).astype(np.float32)


def _faiss_index(item_codes: np.ndarray):
  """A faiss IndexBinaryFlat over packed item codes [I, W]."""
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("backend='faiss' needs the faiss package (pip install faiss-cpu); the "
                      "default backend='jax' needs nothing more.") from error
  index = faiss.IndexBinaryFlat(item_codes.shape[1] * retrieval.WORD_BITS)
  index.add(_as_bytes(item_codes))
  return index


def _as_bytes(words: np.ndarray) -> np.ndarray:
  """uint32 words [n, W] as the uint8 [n, 4W] faiss takes; distances ignore the bit order."""
  return np.ascontiguousarray(words, dtype="<u4").view(np.uint8)


class Retriever:
  """Top-k items for users of an export, or for codes given directly. Use `Retriever.load`."""

  def __init__(self, directory: str, manifest: dict, arrays: dict, *, backend: str,
               chunk_size: int | None):
    if backend not in BACKENDS:
      raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS}.")
    self.path = directory
    self.manifest = manifest
    self.num_users = manifest["num_users"]
    self.num_items = manifest["num_items"]
    self.bits = manifest["bits"]
    self.step = manifest["step"]
    self.backend = backend
    # The evaluator's chunk by default: every chunk is padded to this shape, so float inner
    # products (hierarchical scores) match the evaluator's bit for bit.
    self.chunk_size = int(chunk_size or manifest["user_chunk"])
    if self.chunk_size <= 0:
      raise ValueError(f"chunk_size={chunk_size} must be > 0.")
    self.user_ids = arrays["user_ids"]  # [U] raw ids
    self.item_ids = arrays["item_ids"]  # [I] raw ids
    self._users = _IdMap(self.user_ids, "user", os.path.join(directory, "user_ids.npy"))
    self._user_z = arrays["user_z"]  # [U, K]
    indptr = arrays["known_indptr"]
    try:
      # The evaluator's known-items graph, so exclusion rows are padded exactly as there.
      self._known = graph_lib.build_graph(np.repeat(np.arange(self.num_users), np.diff(indptr)),
                                          arrays["known_items"], self.num_users, self.num_items)
    except ValueError as error:
      raise InvalidExportError(f"{os.path.join(directory, 'known_items.npy')}: {error}") from None
    if backend == "faiss":
      self._faiss = _faiss_index(arrays["item_codes"])
      self._item_z = arrays["item_z"]  # [I, K], for the hierarchical re-rank.
    else:
      self._index = retrieval.ItemIndex(arrays["item_z"], tie_seed=manifest["tie_seed"])

  @classmethod
  def load(cls, path: str, *, backend: str = "jax", chunk_size: int | None = None,
           verify_checksums: bool = True) -> "Retriever":
    """Loads and validates the export at `path`: an export root or one of its step folders.

    Args:
      path: WORKDIR/export (its latest.json names the step folder) or WORKDIR/export/step_N.
      backend: "jax" (exact, the evaluator's scorer) or "faiss" (IndexBinaryFlat; needs faiss).
      chunk_size: users scored at once (memory O(chunk_size × items)); default: the export's
        eval.user_chunk. The jax backend pads every chunk to this size, so a lone query costs a
        full chunk: lower it for latency. Other values keep Hamming results exact but may change
        float inner products in the last bit (XLA may sum them in another order for another
        shape), and with them a hierarchical or continuous order among near-equal items.
      verify_checksums: check each file's SHA-256 (sizes, shapes and dtypes are always checked).
    """
    directory, manifest, arrays = read_export(path, verify_checksums=verify_checksums)
    return cls(directory, manifest, arrays, backend=backend, chunk_size=chunk_size)

  def user_rows(self, user_ids, *, raw_ids: bool = True) -> np.ndarray:
    """Rows [C] (0-based user indices) of raw user ids, or checked indices with raw_ids=False."""
    if not raw_ids:
      rows = np.asarray(user_ids)
      if rows.size and rows.dtype.kind not in "iu":
        raise KeyError(f"User indices must be integers, got {rows.dtype}.")
      bad = (rows < 0) | (rows >= self.num_users)
      if bad.any():
        raise KeyError(_unknown_message("user", rows[bad]) + f" Indices lie in [0, "
                       f"{self.num_users}).")
      return rows.astype(np.int64)
    return self._users.rows(user_ids)

  def search(self, user_ids=None, codes=None, *, k: int = 100, mode: str = "hamming",
             num_candidates: int | None = None, exclude_known: bool = False,
             raw_ids: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items per query, best first: (item ids [C, k], scores float32 [C, k]).

    Args:
      user_ids: [C] users of the export: raw ids, or row indices with raw_ids=False.
      codes: instead of user_ids, continuous codes float [C, K], or packed codes uint32 [C, W]
        (as `retrieval.pack_bits` makes them; Hamming mode only).
      k: items per query.
      mode: "hamming", "hierarchical" (the Hamming top `num_candidates` re-ranked by z·z) or
        "continuous" (z·z over all items).
      num_candidates: hierarchical only; default: the export's eval.num_candidates.
      exclude_known: drop each user's known items (training plus validation), as the
        evaluator's standard protocol does; needs user_ids.
      raw_ids: user_ids are raw ids and item ids come back raw; False: row indices both ways.

    Returns:
      Item ids (raw, or int64 rows) and scores: minus the Hamming distance, or z·z. Ties break by
      the export's tie seed, as in evaluation (faiss backend: see README). Where fewer than k items
      remain after exclusion, the tail has score -inf and id -1 ("" for text ids).
    """
    if (user_ids is None) == (codes is None):
      raise ValueError("Pass exactly one of user_ids or codes.")
    if mode == "hierarchical" and num_candidates is None:
      num_candidates = self.manifest["num_candidates"]
    if user_ids is not None:
      rows = self.user_rows(user_ids, raw_ids=raw_ids)  # [C]
      if rows.ndim != 1:
        raise ValueError(f"user_ids must be one-dimensional, got shape {rows.shape}.")
      num_queries = len(rows)
    else:
      if exclude_known:
        raise ValueError("exclude_known needs user_ids: codes belong to no user of the export.")
      codes = np.asarray(codes)
      num_queries = len(codes)
    search = self._search_faiss if self.backend == "faiss" else self._search_jax
    ids, scores = [], []
    # Queries are gathered or converted one chunk at a time, so memory stays O(chunk × items).
    for start in range(0, num_queries, self.chunk_size):
      chunk = slice(start, start + self.chunk_size)
      if user_ids is not None:
        query_z = self._user_z[rows[chunk]]  # [c, K]
        exclude = self._known.padded_user_items(rows[chunk]) if exclude_known else None
      else:
        query_z, exclude = self._query_z(codes[chunk], mode), None
      chunk_ids, chunk_scores = search(query_z, exclude, k=k, mode=mode,
                                       num_candidates=num_candidates)
      ids.append(chunk_ids)
      scores.append(chunk_scores)
    ids = np.concatenate(ids) if ids else np.zeros((0, k), np.int64)
    scores = np.concatenate(scores) if scores else np.zeros((0, k), np.float32)
    if raw_ids:
      fill = "" if self.item_ids.dtype.kind == "U" else -1
      ids = np.where(ids >= 0, self.item_ids[np.maximum(ids, 0)], fill)
    return ids, scores

  def _query_z(self, codes: np.ndarray, mode: str) -> np.ndarray:
    """Continuous codes z [c, K] float32 of query codes, given as z or packed."""
    words = self.manifest["words"]
    if codes.dtype == np.uint32:
      if codes.ndim != 2 or codes.shape[1] != words:
        raise ValueError(f"Packed codes must have shape [C, {words}], got {codes.shape}.")
      if mode != "hamming":
        raise ValueError(f"Packed codes carry no continuous part; mode={mode!r} needs float "
                         "codes z.")
      # ±1 codes pack back to the same words, and Hamming search reads nothing else.
      return _unpack_bits(codes, self.bits)
    if codes.dtype.kind != "f" or codes.ndim != 2 or codes.shape[1] != self.bits:
      raise ValueError(f"codes must be float [C, {self.bits}] or packed uint32 [C, {words}], got "
                       f"{codes.dtype} {codes.shape}.")
    return codes.astype(np.float32)

  def _search_jax(self, query_z, exclude, *, k, mode, num_candidates):
    """ItemIndex search of one chunk, padded to `chunk_size` rows so that one shape compiles."""
    real = len(query_z)
    pad = self.chunk_size - real
    query_z = np.pad(query_z, ((0, pad), (0, 0)))
    if exclude is not None:
      exclude = np.pad(exclude, ((0, pad), (0, 0)), constant_values=-1)
    ids, scores = self._index.search(query_z, mode=mode, num_results=k,
                                     num_candidates=num_candidates, exclude=exclude)
    return ids[:real], scores[:real]

  def _search_faiss(self, query_z, exclude, *, k, mode, num_candidates):
    """faiss Hamming search of one chunk; hierarchical re-ranks its candidates by z·z."""
    if mode not in ("hamming", "hierarchical"):
      raise ValueError(f"backend='faiss' serves mode 'hamming' or 'hierarchical', not {mode!r}.")
    wanted = num_candidates if mode == "hierarchical" else k
    if not 1 <= k <= wanted <= self.num_items:
      raise ValueError(f"Need 1 <= k={k} <= num_candidates={wanted} <= num_items="
                       f"{self.num_items}.")
    # faiss cannot skip items per query: fetch enough extra to drop the known ones afterwards.
    extra = 0 if exclude is None else exclude.shape[1]
    query_words = np.asarray(retrieval.pack_bits(query_z))  # [C, W]
    distances, ids = self._faiss.search(_as_bytes(query_words),
                                        min(wanted + extra, self.num_items))  # [C, n]
    top_ids = np.full((len(ids), wanted), -1, np.int64)  # [C, wanted]
    top_scores = np.full((len(ids), wanted), -np.inf, np.float32)
    for row in range(len(ids)):
      keep = ids[row] >= 0
      if exclude is not None:
        keep &= ~np.isin(ids[row], exclude[row])
      kept_ids, kept_distances = ids[row][keep][:wanted], distances[row][keep][:wanted]
      top_ids[row, :len(kept_ids)] = kept_ids
      top_scores[row, :len(kept_ids)] = -kept_distances
    if mode == "hamming":
      return top_ids, top_scores
    inner = np.einsum("ck,cmk->cm", query_z, self._item_z[np.maximum(top_ids, 0)])  # [C, M]
    inner = np.where(top_ids >= 0, inner, -np.inf).astype(np.float32)
    # A stable sort keeps the Hamming order among equal inner products, as ItemIndex does.
    order = np.argsort(-inner, axis=1, kind="stable")[:, :k]  # [C, k]
    return (np.take_along_axis(top_ids, order, axis=1),
            np.take_along_axis(inner, order, axis=1))
