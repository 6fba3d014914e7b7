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


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temporary file beside `path`, then renames it over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".json")
  try:
    # mkstemp creates the file 0600; give it the mode a plain open() would, so another user (a
    # serving process, say) can read results and manifests.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
