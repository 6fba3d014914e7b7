"""Top-k items for users of an export, as JSON on stdout, for callers that do not write Python.

    python -m hashgnn_jax.serving --export=WORKDIR/export --users=u17,u4 --mode=hierarchical \\
        --num=20

prints {"export", "step", "mode", "num", "exclude_known", "results": [{"user", "items",
"scores"}]}, one result per user in the order given, best item first; where fewer than --num
items remain after exclusion the lists are shorter. A bad export, an unknown user or a bad flag
exits with status 1 (2 for a usage error) and one line on stderr naming what was wrong.
"""

import json
import sys

from absl import app
from absl import flags
import numpy as np

from hashgnn_jax.retrieval import index as retrieval
from hashgnn_jax.serving import format as format_lib
from hashgnn_jax.serving import retriever as retriever_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("export", None, "An export root (WORKDIR/export) or one of its step folders.")
flags.DEFINE_list("users", None, "Comma-separated raw user ids of the export (row indices with "
                  "--noraw_ids).")
flags.DEFINE_enum("mode", "hamming", retrieval.SEARCH_MODES,
                  "hamming: by Hamming distance; hierarchical: the Hamming top --num_candidates "
                  "re-ranked by z·z; continuous: z·z over all items.")
flags.DEFINE_integer("num", 20, "Items per user.", lower_bound=1)
flags.DEFINE_integer("num_candidates", None,
                     "hierarchical only: Hamming candidates re-ranked (default: the export's "
                     "eval.num_candidates).", lower_bound=1)
flags.DEFINE_bool("exclude_known", True,
                  "Leave out each user's known items (training plus validation), as evaluation "
                  "does.")
flags.DEFINE_bool("raw_ids", True, "--users are raw ids and items come back raw; with "
                  "--noraw_ids, row indices both ways.")
flags.DEFINE_enum("backend", "jax", retriever_lib.BACKENDS,
                  "jax: exact, the evaluator's scorer; faiss: IndexBinaryFlat (needs faiss).")
flags.DEFINE_bool("verify_checksums", True, "Check every file's SHA-256 before serving.")
flags.mark_flags_as_required(["export", "users"])


def _query_ids(users: list[str], retriever: retriever_lib.Retriever, raw_ids: bool) -> np.ndarray:
  """The --users strings as the ids the export holds: integers where its ids are, else text."""
  if raw_ids and retriever.user_ids.dtype.kind == "U":
    return np.asarray(users, dtype=str)
  try:
    return np.asarray([int(user) for user in users], dtype=np.int64)
  except ValueError:
    what = "raw user ids of this export" if raw_ids else "row indices (--noraw_ids)"
    raise ValueError(f"--users={','.join(users)}: the {what} are integers.") from None


def serve(values: flags.FlagValues) -> dict:
  """Loads the export and searches the flags' users; returns the JSON-ready report."""
  retriever = retriever_lib.Retriever.load(values.export, backend=values.backend,
                                           verify_checksums=values.verify_checksums)
  users = _query_ids(values.users, retriever, values.raw_ids)
  ids, scores = retriever.search(users, k=values.num, mode=values.mode,
                                 num_candidates=values.num_candidates,
                                 exclude_known=values.exclude_known,
                                 raw_ids=values.raw_ids)
  results = []
  for user, row_ids, row_scores in zip(users.tolist(), ids, scores):
    found = np.isfinite(row_scores)  # The -inf tail: nothing left after exclusion.
    results.append({"user": user, "items": row_ids[found].tolist(),
                    "scores": row_scores[found].tolist()})
  return {"export": retriever.path, "step": retriever.step, "mode": values.mode,
          "num": values.num, "exclude_known": values.exclude_known, "results": results}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    report = serve(FLAGS)
  except KeyError as error:  # Unknown users: the message is KeyError's only argument.
    sys.exit(f"serving: {error.args[0]}")
  except (ValueError, OSError, format_lib.InvalidExportError, ImportError) as error:
    sys.exit(f"serving: {error}")
  json.dump(report, sys.stdout, ensure_ascii=False, indent=1)
  sys.stdout.write("\n")


if __name__ == "__main__":
  app.run(main)
