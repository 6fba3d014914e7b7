"""Writes a synthetic UserBehavior.csv at Alibaba's scale and prints its statistics as JSON.

  python bench/make_user_behavior.py [--out=/tmp/UserBehavior.csv] [--rows=28500000]

Layout as Taobao's file, no header: user_id,item_id,category_id,behavior_type,timestamp. Defaults
give about 602k users, 4.17M items and 28.5M rows over nine days (about 1 GB). Users have
log-normal activity; 70% of rows go to a skewed head of 500k items and 30% spread uniformly over
the catalogue, which is what leaves most items with a handful of rows, as in the real log. Ids are
scattered over the real ranges so that the loader has to remap them. The four real behaviour types
keep their real shares; a fifth, unlisted type ("share", 0.5%) exercises the loader's keep-list.
"""

import argparse
import json
import time

import numpy as np

_BEHAVIORS = (b"pv", b"buy", b"cart", b"fav", b"share")
_BEHAVIOR_SHARES = (0.891, 0.02, 0.055, 0.029, 0.005)
_START = 1_511_539_200  # 2017-11-25 00:00 in China (UTC+8), the first day of the real log.
_DIGITS = 10  # Enough for every id and timestamp written here.


def _ascii_columns(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns the right-aligned ASCII digits [N, _DIGITS] of non-negative ints and their widths."""
  powers = 10 ** np.arange(_DIGITS - 1, -1, -1, dtype=np.int64)  # [D]
  digits = (values[:, None] // powers % 10 + ord("0")).astype(np.uint8)  # [N, D]
  widths = np.maximum(np.floor(np.log10(np.maximum(values, 1))).astype(np.int64) + 1, 1)  # [N]
  return digits, widths


def _format_rows(columns: list[np.ndarray], behavior: np.ndarray) -> bytes:
  """Formats one chunk of rows as CSV text without a per-row Python loop."""
  # Every row is laid out in a fixed-width byte matrix; a mask keeps each field's used bytes, and
  # boolean indexing (row-major) then yields the lines in order.
  names = np.zeros((len(_BEHAVIORS), max(map(len, _BEHAVIORS))), dtype=np.uint8)
  for i, name in enumerate(_BEHAVIORS):
    names[i, : len(name)] = np.frombuffer(name, dtype=np.uint8)
  name_widths = np.array([len(name) for name in _BEHAVIORS])
  pieces, masks = [], []
  separator = np.full((behavior.size, 1), ord(","), dtype=np.uint8)
  always = np.ones((behavior.size, 1), dtype=bool)
  for position, values in enumerate(columns):
    digits, widths = _ascii_columns(values)
    pieces += [digits, separator]
    masks += [np.arange(_DIGITS) >= _DIGITS - widths[:, None], always]
    if position == 2:  # The behaviour type sits between the category and the timestamp.
      pieces += [names[behavior], separator]
      masks += [np.arange(names.shape[1]) < name_widths[behavior][:, None], always]
  pieces[-1] = np.full_like(separator, ord("\n"))
  return np.concatenate(pieces, axis=1)[np.concatenate(masks, axis=1)].tobytes()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/UserBehavior.csv")
  parser.add_argument("--rows", type=int, default=28_500_000)
  parser.add_argument("--users", type=int, default=602_000)
  parser.add_argument("--days", type=int, default=9)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chunk_rows", type=int, default=1_000_000)
  args = parser.parse_args()

  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  user_ids = np.sort(rng.choice(1_018_011, size=args.users, replace=False)) + 1  # [U]
  item_ids = rng.permutation(5_163_070) + 1  # [I_max]; position -> id.
  activity = rng.lognormal(0.0, 1.0, size=args.users)  # [U]
  activity /= activity.sum()
  shares = np.asarray(_BEHAVIOR_SHARES) / sum(_BEHAVIOR_SHARES)
  seen_users = np.zeros(user_ids.max() + 1, dtype=bool)
  seen_items = np.zeros(item_ids.max() + 1, dtype=bool)
  written = 0
  with open(args.out, "wb") as f:
    for first in range(0, args.rows, args.chunk_rows):
      n = min(args.chunk_rows, args.rows - first)
      users = user_ids[rng.choice(args.users, size=n, p=activity)]  # [n]
      head = rng.random(n) < 0.7  # [n]
      positions = np.where(
        head,
        (500_000 * rng.random(n) ** 2.0).astype(np.int64),
        rng.integers(0, 5_000_000, size=n),
      )  # [n]
      items = item_ids[positions]  # [n]
      categories = items * 2_654_435_761 % 9_439 * 547 + 1_000  # [n]; fixed per item.
      behavior = rng.choice(len(_BEHAVIORS), size=n, p=shares)  # [n]
      timestamps = _START + rng.integers(0, args.days * 86_400, size=n)  # [n]
      seen_users[users] = True
      seen_items[items] = True
      text = _format_rows([users, items, categories, timestamps], behavior)
      f.write(text)
      written += len(text)
  print(
    json.dumps(
      {
        "path": args.out,
        "rows": args.rows,
        "bytes": written,
        "users": int(seen_users.sum()),
        "items": int(seen_items.sum()),
        "days": args.days,
        "seconds": round(time.perf_counter() - start, 1),
      }
    )
  )


if __name__ == "__main__":
  main()
