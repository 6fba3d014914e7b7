"""Checksums and atomic writes shared by the data cache, results and exports.

Standard library only, so the data stage, the results record and exports share it without
pulling in anything else.
"""

import hashlib
import json
import os
import tempfile

_HASH_CHUNK = 8 << 20


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file, read in 8 MiB pieces."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def write_atomic(path: str, write) -> None:
  """Calls `write(binary file)` on a temporary file beside `path`, then renames it over `path`.

  A reader sees the old file or the new one, never part of one, and a failed write leaves
  nothing behind.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.splitext(path)[1])
  try:
    # mkstemp creates the file 0600; give it the mode a plain open() would, so another user (a
    # serving process, say) can read results and manifests.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temporary file beside `path`, then renames it over `path`."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
