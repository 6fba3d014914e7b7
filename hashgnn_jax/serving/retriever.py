"""Top-k item retrieval from an export written by `--mode=export`.

`Retriever.load` reads and checks the export (`format.read_export`), then serves it: search runs
on `retrieval.ItemIndex` with the export's tie seed and the evaluator's chunk shape, so its
rankings equal the evaluator's; `backend="faiss"` runs Hamming search on a faiss IndexBinaryFlat
instead. `python -m hashgnn_jax.serving` is the command line over this class.

    retriever = Retriever.load("WORKDIR/export")
    item_ids, scores = retriever.search(["u17", "u4"], k=50, mode="hierarchical",
                                        exclude_known=True)
"""

import os

import numpy as np

from hashgnn_jax.data import graph as graph_lib
from hashgnn_jax.retrieval import codes as codes_lib
from hashgnn_jax.retrieval import index as retrieval
from hashgnn_jax.serving import format as format_lib

BACKENDS = ("jax", "faiss")


class _IdMap:
  """Raw ids to rows by binary search over the sorted ids (no Python dict of millions)."""

  def __init__(self, raw_ids: np.ndarray, what: str, path: str):
    self._what = what
    self._order = np.argsort(raw_ids, kind="stable")  # [n]
    self._sorted = raw_ids[self._order]  # [n]
    if np.any(self._sorted[1:] == self._sorted[:-1]):
      raise format_lib.InvalidExportError(
          f"{path}: raw ids repeat, so they map to rows ambiguously.")

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
  """±1 codes [C, K] whose `codes_lib.pack_bits` is `words` [C, W]: the inverse packing."""
  shifts = np.arange(codes_lib.WORD_BITS, dtype=np.uint32)
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
  index = faiss.IndexBinaryFlat(item_codes.shape[1] * codes_lib.WORD_BITS)
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
      raise format_lib.InvalidExportError(
          f"{os.path.join(directory, 'known_items.npy')}: {error}") from None
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
    directory, manifest, arrays = format_lib.read_export(path, verify_checksums=verify_checksums)
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
        (as `codes_lib.pack_bits` makes them; Hamming mode only).
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
    query_words = np.asarray(codes_lib.pack_bits(query_z))  # [C, W]
    distances, ids = self._faiss.search(_as_bytes(query_words),
                                        min(wanted + extra, self.num_items))  # [C, n]
    keep = ids >= 0  # [C, n]; faiss pads with -1 where it has fewer than n items.
    if exclude is not None:
      # One isin over all rows: offsetting each row's ids by row × (I + 1) keeps rows apart.
      offsets = np.arange(len(ids))[:, None] * (self.num_items + 1)  # [C, 1]
      keep &= ~np.isin(ids + offsets, (exclude + offsets)[exclude >= 0])
    # Kept entries first, each row's in faiss's order (a stable sort of the drop flags).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :wanted]  # [C, wanted]
    kept = np.take_along_axis(keep, order, axis=1)
    top_ids = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)  # [C, wanted]
    top_scores = np.where(kept, -np.take_along_axis(distances, order, axis=1),
                          -np.inf).astype(np.float32)
    if mode == "hamming":
      return top_ids, top_scores
    inner = np.einsum("ck,cmk->cm", query_z, self._item_z[np.maximum(top_ids, 0)])  # [C, M]
    inner = np.where(top_ids >= 0, inner, -np.inf).astype(np.float32)
    # A stable sort keeps the Hamming order among equal inner products, as ItemIndex does.
    order = np.argsort(-inner, axis=1, kind="stable")[:, :k]  # [C, k]
    return (np.take_along_axis(top_ids, order, axis=1),
            np.take_along_axis(inner, order, axis=1))
