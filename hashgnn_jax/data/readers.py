"""Streaming readers that turn interaction logs into one NumPy table, `Interactions`.

Text files are read in blocks of whole lines. A block is parsed with vectorised NumPy operations
on byte offsets (where each line and field starts and ends), so no Python object is made per row
and memory stays at a few times the block size on top of the output columns. A line that does not
parse stops the read with a ValueError naming the file, its 1-based line number and its text.

All readers accept Windows line ends, blank lines and spaces around fields. Ids stay raw here
(remapping to 0..N-1 is `prepare`'s job): int64 where the source ids are numbers, else strings.
"""

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np

from hashgnn_jax.data import formats

# Bytes read per block. Blocks end at a line end, so one may be a line longer. Public so that tests
# can make it tiny and put block edges inside lines.
BLOCK_BYTES = 4 << 20
_TIMESTAMP_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds",
                         "ns": "nanoseconds"}  # Same keys as formats.TIMESTAMP_UNIT_DIGITS.

_MOVIELENS_LAYOUTS = {  # Delimiter -> the layout quoted in errors.
  b"::": "'user::item::rating::timestamp'",
  b"\t": "'user<TAB>item<TAB>rating<TAB>timestamp'",
  b",": "'userId,movieId,rating,timestamp'",
}
_LIGHTGCN_LAYOUT = "'user item item ...' with integer ids"
_USER_BEHAVIOR_FIELDS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
_USER_BEHAVIOR_LAYOUT = repr(",".join(_USER_BEHAVIOR_FIELDS))
_UNIT_DELIMITER = b"\x1f"  # Stands in for a multi-byte delimiter such as '::'.
_QUOTE_LIMIT = 120  # Characters of an offending line quoted in an error.
_MAX_DIGITS = 18  # Every 18-digit decimal fits in int64.
# Zero bytes after each block's data, so that gathering a field's digits needs no bounds clamp.
_PADDING = 32
_SPACES = b" \t\r\v\f"


def _byte_table(chars: bytes) -> np.ndarray:
  table = np.zeros(256, dtype=bool)
  table[list(chars)] = True
  return table


@dataclasses.dataclass(frozen=True, eq=False)
class Interactions:
  """Logged interactions, one row each, with raw (not yet remapped) user and item ids."""

  users: np.ndarray  # [N] int64, or str when the source ids are not all numbers
  items: np.ndarray  # [N] int64 or str
  timestamps: np.ndarray | None = None  # [N] int64 seconds
  behaviors: np.ndarray | None = None  # [N] int8, positions in `behavior_names`
  ratings: np.ndarray | None = None  # [N] float32
  source: str = ""
  behavior_names: tuple[str, ...] = ()

  def __post_init__(self):
    for name in ("items", "timestamps", "behaviors", "ratings"):
      column = getattr(self, name)
      if column is not None and column.shape != self.users.shape:
        raise ValueError(f"{name} has shape {column.shape}, users {self.users.shape}")

  def __len__(self) -> int:
    return int(self.users.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class _Lines:
  """The non-blank lines of one block: byte extents, stripped of surrounding spaces."""

  path: str
  raw: bytes  # The block as read, quoted in errors.
  first_line: int  # 1-based number of the block's first line in the file.
  # [B + _PADDING] uint8: `raw` (a multi-byte delimiter replaced by one byte), then zeros.
  data: np.ndarray
  starts: np.ndarray  # [L] int64
  ends: np.ndarray  # [L] int64, exclusive
  index: np.ndarray  # [L] int64, 0-based line index within the block
  spaced: bool  # Whether the block holds any byte to strip (a space, carriage return, ...).

  def __len__(self) -> int:
    return int(self.starts.shape[0])

  def error(self, row: int, expected: str) -> ValueError:
    """A ValueError quoting line `row` (a position among the non-blank lines) of the file."""
    index = int(self.index[row])
    text = self.raw.split(b"\n", index + 1)[index].decode("utf-8", "replace").strip()
    if len(text) > _QUOTE_LIMIT:
      text = text[:_QUOTE_LIMIT] + "..."
    return ValueError(f"{self.path}:{self.first_line + index}: expected {expected}, got {text!r}")

  def drop_first(self) -> "_Lines":
    """The same block without its first non-blank line (a header)."""
    return dataclasses.replace(
      self, starts=self.starts[1:], ends=self.ends[1:], index=self.index[1:]
    )


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory; expected a file")


def _raw_blocks(path: str) -> Iterator[bytes]:
  """Yields the file in blocks of whole lines, each ending in a newline."""
  carry = b""
  with open(path, "rb") as f:
    while chunk := f.read(BLOCK_BYTES):
      chunk = carry + chunk
      cut = chunk.rfind(b"\n") + 1
      carry = chunk[cut:]
      if cut:
        yield chunk[:cut]
  if carry:
    yield carry + b"\n"


def _strip(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, table: np.ndarray) -> None:
  """Moves `starts` forward and `ends` back, in place, past bytes that `table` marks."""
  active = np.flatnonzero((starts < ends) & table[data[starts]])
  while active.size:
    starts[active] += 1
    active = active[(starts[active] < ends[active]) & table[data[starts[active]]]]
  active = np.flatnonzero((starts < ends) & table[data[ends - 1]])
  while active.size:
    ends[active] -= 1
    active = active[(starts[active] < ends[active]) & table[data[ends[active] - 1]]]


def _line_blocks(path: str, *, delimiter: bytes = b"") -> Iterator[_Lines]:
  """Yields the non-blank lines of `path` block by block; raises if the file has none."""
  _check_file(path)
  # A one-byte delimiter such as a tab separates (possibly empty) fields: it is never stripped.
  strippable = _SPACES.replace(delimiter, b"") if len(delimiter) == 1 else _SPACES
  strip = _byte_table(strippable)
  seen_data = False
  first_line = 1
  for raw in _raw_blocks(path):
    if first_line == 1 and raw.startswith(b"\xef\xbb\xbf"):
      # A UTF-8 byte-order mark (spreadsheet exports) becomes spaces, keeping every offset.
      raw = b"   " + raw[3:]
    text = raw.replace(delimiter, _UNIT_DELIMITER) if len(delimiter) > 1 else raw
    data = np.frombuffer(text + bytes(_PADDING), dtype=np.uint8)  # [B + _PADDING]
    newlines = np.flatnonzero(data == ord("\n"))  # [L_all]
    starts = np.concatenate([[0], newlines[:-1] + 1])  # [L_all]
    ends = newlines.copy()  # [L_all]
    # Most machine-written blocks have nothing to strip; bytes.find is far cheaper than a pass.
    spaced = any(bytes([byte]) in raw for byte in strippable)
    if spaced:
      _strip(data, starts, ends, strip)
    keep = ends > starts  # [L_all]
    if keep.any():
      seen_data = True
      yield _Lines(
        path=path,
        raw=raw,
        first_line=first_line,
        data=data,
        starts=starts[keep],
        ends=ends[keep],
        index=np.flatnonzero(keep),
        spaced=spaced,
      )
    first_line += newlines.size
  if not seen_data:
    raise ValueError(f"{path}: the file is empty (no data lines)")


def _fields(
  lines: _Lines, *, delimiter: bytes, num_fields: int, expected: str, quotes: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """Splits every line into `num_fields` fields; returns their [L, F] start and end offsets."""
  code = ord(_UNIT_DELIMITER if len(delimiter) > 1 else delimiter)
  hits = np.flatnonzero(lines.data == code)  # [D]
  num_cuts = num_fields - 1
  # Fast check: with exactly L * (F-1) delimiters, every line has its share iff the share's
  # first and last lie inside the line (lines are disjoint and in order).
  cuts = None
  if hits.size == len(lines) * num_cuts:
    cuts = hits.reshape(len(lines), num_cuts)  # [L, F-1]
    if num_cuts and not (np.all(cuts[:, 0] >= lines.starts) and np.all(cuts[:, -1] < lines.ends)):
      cuts = None
  if cuts is None:
    # Either a line is malformed or delimiters lie outside `lines` (a dropped header).
    first = np.searchsorted(hits, lines.starts)  # [L]
    wrong = np.flatnonzero(np.searchsorted(hits, lines.ends) - first != num_cuts)
    if wrong.size:
      raise lines.error(int(wrong[0]), expected)
    cuts = hits[first[:, None] + np.arange(num_cuts)]  # [L, F-1]
  starts = np.concatenate([lines.starts[:, None], cuts + 1], axis=1)  # [L, F]
  ends = np.concatenate([cuts, lines.ends[:, None]], axis=1)  # [L, F]
  if lines.spaced:
    spaces = _byte_table(_SPACES.replace(delimiter, b""))
    # ravel() of these fresh C-ordered arrays is a view, so the strip updates them in place.
    _strip(lines.data, starts.ravel(), ends.ravel(), spaces)
  if quotes:
    quoted = (ends - starts >= 2) & (lines.data[starts] == ord('"'))
    quoted &= lines.data[np.maximum(ends - 1, 0)] == ord('"')
    starts += quoted
    ends -= quoted
  return starts, ends


def _parse_ints(
  data: np.ndarray, starts: np.ndarray, ends: np.ndarray, *, signed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """Parses decimal integers at byte extents; returns values [N] int64 and a not-a-number mask.

  `data` must end with `_PADDING` zero bytes (as `_Lines.data` does).
  """
  negative = None
  if signed:
    negative = (starts < ends) & (data[starts] == ord("-"))
    starts = starts + negative
  lengths = ends - starts  # [N]
  bad = (lengths <= 0) | (lengths > _MAX_DIGITS)  # [N]
  values = np.zeros(starts.shape, dtype=np.int64)  # [N]
  if not lengths.size:
    return values, bad
  # Digits are read left to right, one position for all fields at once; positions below the
  # shortest field need no mask, which is most of them for fixed-width columns like timestamps.
  # In-place ufuncs keep this loop, the reader's hottest, free of temporaries.
  shortest = int(lengths.min())
  position = starts.copy()  # [N]
  digit = np.empty(starts.shape, dtype=np.uint8)  # [N]
  not_digit = np.empty(starts.shape, dtype=bool)  # [N]
  for offset in range(min(int(lengths.max()), _MAX_DIGITS)):
    np.take(data, position, out=digit)
    position += 1
    digit -= ord("0")  # Bytes below '0' wrap around to large values.
    np.greater(digit, 9, out=not_digit)
    if offset < shortest:
      bad |= not_digit
      values *= 10
      values += digit
    else:
      inside = offset < lengths  # [N]
      not_digit &= inside
      bad |= not_digit
      np.multiply(values, 10, out=values, where=inside)
      np.add(values, digit, out=values, where=inside)
  if signed:
    np.negative(values, out=values, where=negative)
  return values, bad


def _int_column(
  lines: _Lines, starts: np.ndarray, ends: np.ndarray, expected: str, *, signed: bool = False
) -> np.ndarray:
  values, bad = _parse_ints(lines.data, starts, ends, signed=signed)
  if bad.any():
    raise lines.error(int(np.argmax(bad)), expected)
  return values


def _byte_strings(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """Returns the bytes at each extent as a fixed-width bytes array [N]."""
  lengths = ends - starts  # [N]
  width = max(int(lengths.max(initial=0)), 1)
  chars = np.zeros((starts.size, width), dtype=np.uint8)  # [N, W]
  last = data.size - 1
  # One column at a time keeps the temporaries at N bytes instead of an [N, W] index array.
  for position in range(width):
    column = data[np.minimum(starts + position, last)]  # [N]
    chars[:, position] = np.where(position < lengths, column, 0)
  return chars.view(f"S{width}")[:, 0]


def _text_column(lines: _Lines, starts: np.ndarray, ends: np.ndarray, expected: str) -> np.ndarray:
  """Returns the fields at the extents decoded from UTF-8 as a str array [N]."""
  raw = _byte_strings(lines.data, starts, ends)
  try:
    return np.strings.decode(raw, "utf-8")
  except UnicodeDecodeError:
    for row, value in enumerate(raw):
      try:
        value.decode("utf-8")
      except UnicodeDecodeError:
        raise lines.error(row, f"{expected} in UTF-8") from None
    raise


def _float_column(lines: _Lines, starts: np.ndarray, ends: np.ndarray, expected: str) -> np.ndarray:
  raw = _byte_strings(lines.data, starts, ends)
  try:
    return raw.astype(np.float32)
  except ValueError:
    for row, value in enumerate(raw):
      try:
        float(value)
      except ValueError:
        raise lines.error(row, expected) from None
    raise


def _id_column(lines: _Lines, starts: np.ndarray, ends: np.ndarray, expected: str) -> np.ndarray:
  """Parses an id field: int64 when every field is a plain decimal number, else str."""
  empty = np.flatnonzero(ends <= starts)
  if empty.size:
    raise lines.error(int(empty[0]), expected)
  values, bad = _parse_ints(lines.data, starts, ends)
  # '007' stays text: read as 7 it would merge with '7', and text ids must not change.
  bad |= (ends - starts > 1) & (lines.data[starts] == ord("0"))
  if not bad.any():
    return values
  return _text_column(lines, starts, ends, expected)


def _count_lines(path: str) -> int:
  """Counts the lines of `path` (a last line without a newline included)."""
  count, last = 0, b"\n"
  with open(path, "rb") as f:
    while chunk := f.read(4 * BLOCK_BYTES):
      # A vectorised compare counts about three times faster than bytes.count here.
      count += int(np.count_nonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n")))
      last = chunk[-1:]
  return count + (last != b"\n")


class _Column:
  """One output column, filled block by block.

  Numbers go straight into one array preallocated for every line of the file: per-block pieces
  would stay behind as heap fragments after joining and double the peak memory. A block of text
  ids (not all numbers) switches the column to a list of text pieces, joined at the end.
  """

  def __init__(self, capacity: int, dtype: np.dtype):
    # np.empty maps pages lazily, so capacity the data never reaches costs no memory.
    self._array = np.empty(capacity, dtype=dtype)
    self._size = 0
    self._pieces = None

  def append(self, values: np.ndarray) -> None:
    if self._pieces is None and values.dtype.kind != "U":
      self._array[self._size : self._size + values.size] = values
      self._size += values.size
      return
    if self._pieces is None:
      # Numeric ids become their decimal text, which is exact: '007' never parses as a number.
      numbers = self._array[: self._size]
      width = len(str(numbers.max())) if numbers.size else 1
      self._pieces = [numbers.astype(f"U{width}")]
      self._array = None
    self._pieces.append(values)

  def result(self) -> np.ndarray:
    """The column: a view of the filled part of the preallocated array, or the joined text."""
    if self._pieces is None:
      return self._array[: self._size]
    return np.concatenate(self._pieces)


def _header_names(lines: _Lines, delimiter: bytes) -> list[str]:
  """The fields of the block's first non-blank line, as text."""
  first = bytes(lines.data[lines.starts[0] : lines.ends[0]]).decode("utf-8", "replace")
  separator = (_UNIT_DELIMITER if len(delimiter) > 1 else delimiter).decode()
  return [name.strip().strip('"').strip() for name in first.split(separator)]


def _is_header(names: list[str]) -> bool:
  """A first line is a header when none of its fields is a number."""
  for name in names:
    try:
      float(name)
      return False
    except ValueError:
      pass
  return True


def _delimited_blocks(
  path: str, *, delimiter: bytes, num_fields: int, expected: str, header: str, quotes: bool = False
) -> Iterator[tuple[_Lines, np.ndarray, np.ndarray]]:
  """Yields (lines, field starts [L, F], field ends [L, F]) per block of a delimited file.

  `header` is 'skip' (the first line is one), 'detect' (skipped when no field is a number) or
  'none'.
  """
  first_block = True
  for lines in _line_blocks(path, delimiter=delimiter):
    if first_block and header != "none":
      if header == "skip" or _is_header(_header_names(lines, delimiter)):
        lines = lines.drop_first()
    first_block = False
    if len(lines):
      yield lines, *_fields(
        lines, delimiter=delimiter, num_fields=num_fields, expected=expected, quotes=quotes
      )


def _first_block(path: str, *, delimiter: bytes = b"") -> _Lines:
  """The first block of `path` that holds a data line; its first line is the file's first."""
  return next(_line_blocks(path, delimiter=delimiter))


def read_movielens(path: str) -> Interactions:
  """Reads MovieLens ratings: ratings.dat (ML-1M/10M), u.data (ML-100K) or ratings.csv."""
  lines = _first_block(path)
  first = bytes(lines.data[lines.starts[0] : lines.ends[0]])
  # The layout is told by the first line, so renamed files still read.
  for delimiter, layout in _MOVIELENS_LAYOUTS.items():
    if delimiter in first:
      break
  else:
    raise lines.error(0, f"a MovieLens ratings line ({', '.join(_MOVIELENS_LAYOUTS.values())})")
  capacity = _count_lines(path)
  columns = {
    "users": _Column(capacity, np.int64),
    "items": _Column(capacity, np.int64),
    "ratings": _Column(capacity, np.float32),
    "timestamps": _Column(capacity, np.int64),
  }
  for lines, starts, ends in _delimited_blocks(
    path, delimiter=delimiter, num_fields=4, expected=layout, header="detect"
  ):
    for name, column, what, signed in (
      ("users", 0, "an integer user id", False),
      ("items", 1, "an integer item id", False),
      ("timestamps", 3, "an integer timestamp", True),
    ):
      columns[name].append(
        _int_column(lines, starts[:, column], ends[:, column], f"{what} in {layout}", signed=signed)
      )
    columns["ratings"].append(
      _float_column(lines, starts[:, 2], ends[:, 2], f"a numeric rating in {layout}")
    )
  return Interactions(**{name: column.result() for name, column in columns.items()}, source=path)


def read_lightgcn(path: str) -> Interactions:
  """Reads the NGCF/LightGCN adjacency format: one line per user, 'user item item ...'."""
  users, items = [], []
  space = _byte_table(_SPACES + b"\n")
  for lines in _line_blocks(path):
    is_space = space[lines.data[: lines.data.size - _PADDING]]  # [B]
    # A token starts after a space (or at the block start) and ends before one.
    token_starts = np.flatnonzero(~is_space & np.concatenate([[True], is_space[:-1]]))  # [T]
    token_ends = np.flatnonzero(~is_space & np.concatenate([is_space[1:], [True]])) + 1  # [T]
    row = np.searchsorted(lines.ends, token_starts)  # [T]; the line holding each token
    values, bad = _parse_ints(lines.data, token_starts, token_ends)  # [T]
    if bad.any():
      raise lines.error(int(row[np.argmax(bad)]), _LIGHTGCN_LAYOUT)
    opens_line = np.concatenate([[True], row[1:] != row[:-1]])  # [T]
    line_user = values[opens_line]  # [L]; every non-blank line has a first token
    users.append(line_user[np.cumsum(opens_line) - 1][~opens_line])
    items.append(values[~opens_line])
  return Interactions(users=np.concatenate(users), items=np.concatenate(items), source=path)


def read_lightgcn_split(directory: str) -> tuple[Interactions, Interactions]:
  """Reads a LightGCN data set folder's train.txt and test.txt, keeping the published split."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such directory (expected train.txt and test.txt)")
  return tuple(read_lightgcn(os.path.join(directory, name)) for name in ("train.txt", "test.txt"))


def _column_index(spec: str, names: list[str] | None, role: str, path: str) -> int:
  """Resolves a column given by name (with a header) or by a 0-based index string."""
  if names is not None and spec in names:
    return names.index(spec)
  if spec.isdigit() and (names is None or int(spec) < len(names)):
    return int(spec)
  if names is None:
    raise ValueError(
      f"{path}: without a header the {role} column must be a 0-based index, got {spec!r}"
    )
  raise ValueError(f"{path}: no {role} column {spec!r} in the header {names}")


def _unescape(delimiter: str) -> bytes:
  """Accepts a tab written as the two characters '\\t' (as shells pass it)."""
  if not delimiter:
    raise ValueError("the delimiter must not be empty")
  return delimiter.replace("\\t", "\t").encode()


def read_table(
  path: str,
  *,
  user: str,
  item: str,
  timestamp: str = "",
  rating: str = "",
  delimiter: str = ",",
  header: bool = True,
  timestamp_unit: str = "s",
) -> Interactions:
  """Reads a CSV/TSV file (or Parquet, by the .parquet extension) with the given columns.

  Integer timestamps are in `timestamp_unit` ('s', 'ms', 'us' or 'ns') and come out as seconds,
  floored; ISO 8601 text and Parquet timestamp columns carry their own unit.
  """
  if timestamp_unit not in formats.TIMESTAMP_UNIT_DIGITS:
    raise ValueError(
      f"timestamp_unit must be one of {tuple(formats.TIMESTAMP_UNIT_DIGITS)}, "
      f"got {timestamp_unit!r}"
    )
  roles = {"user": user, "item": item, "timestamp": timestamp, "rating": rating}
  roles = {role: spec for role, spec in roles.items() if spec}
  if path.endswith(".parquet"):
    return _read_parquet(path, roles, timestamp_unit=timestamp_unit)
  separator = _unescape(delimiter)
  # The first line fixes the number of fields (and, with a header, the column names).
  lines = _first_block(path, delimiter=separator)
  fields = _header_names(lines, separator)
  names = fields if header else None
  columns = {role: _column_index(spec, names, role, path) for role, spec in roles.items()}
  num_fields = len(fields)
  if max(columns.values()) >= num_fields:
    raise lines.error(0, f"at least {max(columns.values()) + 1} fields")
  layout = f"{num_fields} fields separated by {separator.decode()!r}"
  capacity = _count_lines(path)
  dtypes = {"user": np.int64, "item": np.int64, "timestamp": np.int64, "rating": np.float32}
  chunks = {role: _Column(capacity, dtypes[role]) for role in columns}
  iso = None
  for lines, starts, ends in _delimited_blocks(
    path,
    delimiter=separator,
    num_fields=num_fields,
    expected=layout,
    header="skip" if header else "none",
    quotes=True,
  ):
    for role, column in columns.items():
      field_starts, field_ends = starts[:, column], ends[:, column]
      what = f"a {role} in column {roles[role]!r}"
      if role in ("user", "item"):
        chunks[role].append(_id_column(lines, field_starts, field_ends, what))
      elif role == "rating":
        chunks[role].append(_float_column(lines, field_starts, field_ends, f"a number as {what}"))
      else:
        seconds, iso = _time_column(
          lines, field_starts, field_ends, what, iso=iso, unit=timestamp_unit
        )
        chunks[role].append(seconds)
  return _interactions(chunks, path)


def _interactions(columns: dict[str, _Column], path: str) -> Interactions:
  """Builds the table from the columns of `read_table` or `_read_parquet`."""
  results = {role: column.result() for role, column in columns.items()}
  if not results["user"].size:
    raise ValueError(f"{path}: the file has a header but no data lines")
  return Interactions(
    users=results["user"],
    items=results["item"],
    timestamps=results.get("timestamp"),
    ratings=results.get("rating"),
    source=path,
  )


def _parse_time_ints(
  data: np.ndarray, starts: np.ndarray, ends: np.ndarray, digits: int
) -> tuple[np.ndarray, np.ndarray]:
  """Parses signed integers in units of 10**-digits seconds into seconds [N], floored.

  Returns the seconds and a not-a-number mask, like `_parse_ints`. The last `digits` characters
  are parsed apart from the rest: nanosecond times since 2001 have 19 digits, one more than
  `_parse_ints` takes, and the division then needs no arithmetic on the full value.
  """
  if not digits:
    return _parse_ints(data, starts, ends, signed=True)
  negative = (starts < ends) & (data[starts] == ord("-"))  # [N]
  starts = starts + negative
  cuts = np.maximum(ends - digits, starts)  # [N]
  seconds, bad_whole = _parse_ints(data, starts, cuts)
  fraction, bad = _parse_ints(data, cuts, ends)  # An empty field fails here.
  bad |= bad_whole & (cuts > starts)  # No whole part ('500' ms) is zero seconds.
  # Floor division: a negative time with a fraction lies one second further down.
  np.negative(seconds + (fraction > 0), out=seconds, where=negative)
  return seconds, bad


def _time_column(
  lines: _Lines,
  starts: np.ndarray,
  ends: np.ndarray,
  what: str,
  *,
  iso: bool | None,
  unit: str = "s",
) -> tuple[np.ndarray, bool]:
  """Parses integers in `unit` or ISO 8601 date-times ('2017-11-25 10:00:00') into seconds.

  `iso` is the form the file's earlier blocks used (None before the first), so that one file
  never mixes the two; returns the seconds [N] and the form used.
  """
  values, bad = _parse_time_ints(lines.data, starts, ends, formats.TIMESTAMP_UNIT_DIGITS[unit])
  if iso is None:
    iso = bool(bad.all())
  if not iso:
    if bad.any():
      raise lines.error(int(np.argmax(bad)), f"integer {_TIMESTAMP_UNIT_NAMES[unit]} as {what}")
    return values, iso
  expected = f"an ISO 8601 date-time as {what}"
  text = _text_column(lines, starts, ends, expected)
  # A bare integer would read as a year; the file's first block chose date-times.
  if not bad.all():
    raise lines.error(int(np.argmin(bad)), expected)
  try:
    return text.astype("datetime64[s]").astype(np.int64), iso
  except ValueError:
    for row, value in enumerate(text):
      try:
        np.datetime64(value, "s")
      except ValueError:
        raise lines.error(row, expected) from None
    raise


def read_user_behavior(
  path: str, *, behaviors: Sequence[str] = formats.USER_BEHAVIOR_TYPES
) -> Interactions:
  """Reads Taobao's UserBehavior.csv, keeping the rows whose behaviour type is listed."""
  names = tuple(behaviors)
  encoded = [name.encode() for name in names]
  if not names or len(set(names)) != len(names) or min(map(len, encoded)) == 0:
    raise ValueError(f"behaviors must be distinct non-empty names, got {names}")
  capacity = _count_lines(path)
  columns = {
    name: _Column(capacity, np.int8 if name == "behaviors" else np.int64)
    for name in ("users", "items", "timestamps", "behaviors")
  }
  widest = max(map(len, encoded))
  for lines, starts, ends in _delimited_blocks(
    path, delimiter=b",", num_fields=5, expected=_USER_BEHAVIOR_LAYOUT, header="detect"
  ):
    # The behaviour field's first bytes, gathered once and compared against every listed name.
    lengths = ends[:, 3] - starts[:, 3]  # [L]
    last = lines.data.size - 1
    heads = [lines.data[np.minimum(starts[:, 3] + k, last)] for k in range(widest)]  # W x [L]
    codes = np.full(len(lines), -1, dtype=np.int8)  # [L]; -1: an unlisted type, dropped
    for code, name in enumerate(encoded):
      match = lengths == len(name)
      for head, byte in zip(heads, name):
        match &= head == byte
      codes[match] = code
    keep = codes >= 0  # [L]
    # Ids are parsed before dropping rows, so a malformed id is reported whatever its type.
    for name, column, signed in (("users", 0, False), ("items", 1, False), ("timestamps", 4, True)):
      expected = f"an integer {_USER_BEHAVIOR_FIELDS[column]} in {_USER_BEHAVIOR_LAYOUT}"
      values = _int_column(lines, starts[:, column], ends[:, column], expected, signed=signed)
      columns[name].append(values[keep])
    columns["behaviors"].append(codes[keep])
  return Interactions(
    **{name: column.result() for name, column in columns.items()},
    source=path,
    behavior_names=names,
  )


def _read_parquet(path: str, roles: dict[str, str], *, timestamp_unit: str = "s") -> Interactions:
  """Reads the mapped columns of a Parquet file batch by batch (needs pyarrow).

  An integer timestamp column is in `timestamp_unit`; a timestamp-typed one in its own unit.
  """
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
      f'reading {path} needs pyarrow; install it with: pip install -e ".[parquet]"'
    ) from error
  _check_file(path)
  parquet = pq.ParquetFile(path)
  names = parquet.schema_arrow.names
  columns = {role: names[_column_index(spec, names, role, path)] for role, spec in roles.items()}
  dtypes = {"user": np.int64, "item": np.int64, "timestamp": np.int64, "rating": np.float32}
  chunks = {role: _Column(parquet.metadata.num_rows, dtypes[role]) for role in columns}
  per_unit = 10 ** formats.TIMESTAMP_UNIT_DIGITS[timestamp_unit]
  offset = 0
  for batch in parquet.iter_batches(columns=sorted(set(columns.values()))):
    for role, name in columns.items():
      array = batch.column(name)
      if array.null_count:
        row = offset + int(np.argmax(array.is_null().to_numpy(zero_copy_only=False))) + 1
        raise ValueError(f"{path}: row {row}: the {role} column {name!r} is null")
      kind = array.type
      if role == "rating":
        values = array.to_numpy(zero_copy_only=False).astype(np.float32)
      elif pa.types.is_integer(kind):
        values = array.to_numpy(zero_copy_only=False).astype(np.int64)
        if role == "timestamp" and per_unit > 1:
          values //= per_unit
      elif role == "timestamp" and pa.types.is_timestamp(kind):
        digits = formats.TIMESTAMP_UNIT_DIGITS[kind.unit]
        values = array.cast(pa.int64()).to_numpy() // 10**digits
      elif role != "timestamp" and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        # Dictionary encoding makes Python strings only for the distinct values, not per row.
        encoded = pc.dictionary_encode(array)
        values = np.array(encoded.dictionary.to_pylist(), dtype=str)[encoded.indices.to_numpy()]
      else:
        raise ValueError(f"{path}: the {role} column {name!r} has unsupported type {kind}")
      chunks[role].append(values)
    offset += batch.num_rows
  if not offset:
    raise ValueError(f"{path}: the file is empty (no rows)")
  return _interactions(chunks, path)
