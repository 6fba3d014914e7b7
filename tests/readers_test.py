"""Tests for the streaming interaction-log readers."""

import sys

import numpy as np
import pytest

from hashgnn_jax.data import readers


def _write(path, text: str, *, newline: str = "\n") -> str:
  path.write_bytes(text.replace("\n", newline).encode("utf-8"))
  return str(path)


@pytest.fixture(params=[readers.BLOCK_BYTES, 7], ids=["one_block", "tiny_blocks"])
def block_bytes(request, monkeypatch):
  """Runs a test with the normal block size and with blocks smaller than a line."""
  monkeypatch.setattr(readers, "BLOCK_BYTES", request.param)
  return request.param


# MovieLens.


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_movielens_dat_with_blank_lines_and_spaces(tmp_path, newline, block_bytes):
  path = _write(
    tmp_path / "ratings.dat",
    "1::1193::5::978300760\n 1::661::3::978302109  \n\n2::3068::4.5::978299000\n\n  \n",
    newline=newline,
  )
  table = readers.read_movielens(path)
  np.testing.assert_array_equal(table.users, [1, 1, 2])
  np.testing.assert_array_equal(table.items, [1193, 661, 3068])
  np.testing.assert_array_equal(table.ratings, np.array([5, 3, 4.5], dtype=np.float32))
  np.testing.assert_array_equal(table.timestamps, [978300760, 978302109, 978299000])
  assert table.users.dtype == np.int64 and table.ratings.dtype == np.float32
  assert table.source == path and table.behaviors is None


def test_movielens_u_data_and_ratings_csv(tmp_path):
  u_data = _write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742")
  table = readers.read_movielens(u_data)
  np.testing.assert_array_equal(table.users, [196, 186])
  np.testing.assert_array_equal(table.timestamps, [881250949, 891717742])
  csv = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n")
  table = readers.read_movielens(csv)
  np.testing.assert_array_equal(table.items, [2])
  np.testing.assert_array_equal(table.ratings, [3.5])


def test_movielens_error_names_file_line_and_text(tmp_path, block_bytes):
  lines = ["1::2::5::978300760"] * 16 + ["abc::12", "1::2::5::978300760"]
  path = _write(tmp_path / "ratings.dat", "\n".join(lines) + "\n")
  with pytest.raises(ValueError) as info:
    readers.read_movielens(path)
  assert str(info.value) == f"{path}:17: expected 'user::item::rating::timestamp', got 'abc::12'"


@pytest.mark.parametrize(
  "bad_line, expected",
  [
    ("1::x::5::978300760", "an integer item id"),
    ("u1::2::5::978300760", "an integer user id"),
    ("1::2::five::978300760", "a numeric rating"),
    ("1::2::5::", "an integer timestamp"),
    ("1::2::5::3::4", "'user::item::rating::timestamp'"),
  ],
)
def test_movielens_rejects_malformed_fields(tmp_path, bad_line, expected):
  path = _write(tmp_path / "ratings.dat", f"1::2::5::978300760\r\n{bad_line}\r\n")
  with pytest.raises(ValueError) as info:
    readers.read_movielens(path)
  message = str(info.value)
  assert message.startswith(f"{path}:2: expected {expected}")
  assert message.endswith(f"got {bad_line!r}")


def test_unrecognised_movielens_layout(tmp_path):
  path = _write(tmp_path / "ratings.txt", "\n1 2 3 4\n")
  with pytest.raises(ValueError, match=r"ratings.txt:2: expected a MovieLens ratings line"):
    readers.read_movielens(path)


@pytest.mark.parametrize("text", ["", "\n\n", " \r\n\t\n"])
def test_empty_file_is_named(tmp_path, text):
  path = _write(tmp_path / "ratings.dat", text)
  with pytest.raises(ValueError, match="empty") as info:
    readers.read_movielens(path)
  assert path in str(info.value)


def test_missing_file_is_named(tmp_path):
  path = str(tmp_path / "nowhere" / "UserBehavior.csv")
  for read in (readers.read_movielens, readers.read_lightgcn, readers.read_user_behavior):
    with pytest.raises(FileNotFoundError, match=path):
      read(path)
  with pytest.raises(FileNotFoundError, match=path):
    readers.read_table(path, user="user", item="item")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    readers.read_lightgcn_split(str(tmp_path / "nowhere"))


# LightGCN.


def test_lightgcn_lines_with_and_without_items(tmp_path, block_bytes):
  path = _write(
    tmp_path / "train.txt", "0 10 11 12\n1\n2  13\t14 \n\n3 15\n  \n", newline="\r\n"
  )
  table = readers.read_lightgcn(path)
  np.testing.assert_array_equal(table.users, [0, 0, 0, 2, 2, 3])
  np.testing.assert_array_equal(table.items, [10, 11, 12, 13, 14, 15])
  assert table.timestamps is None


def test_lightgcn_split_reads_both_files(tmp_path):
  _write(tmp_path / "train.txt", "0 1 2\n1 3\n")
  _write(tmp_path / "test.txt", "0 4\n1\n")
  train, test = readers.read_lightgcn_split(str(tmp_path))
  np.testing.assert_array_equal(train.items, [1, 2, 3])
  np.testing.assert_array_equal(test.users, [0])
  np.testing.assert_array_equal(test.items, [4])


def test_lightgcn_error_names_line(tmp_path, block_bytes):
  path = _write(tmp_path / "train.txt", "0 1 2\n1 3\n\n2 4 five 6\n")
  with pytest.raises(ValueError) as info:
    readers.read_lightgcn(path)
  assert str(info.value) == (
    f"{path}:4: expected 'user item item ...' with integer ids, got '2 4 five 6'"
  )


def test_lightgcn_split_needs_both_files(tmp_path):
  _write(tmp_path / "train.txt", "0 1\n")
  with pytest.raises(FileNotFoundError, match="test.txt"):
    readers.read_lightgcn_split(str(tmp_path))


# Generic tables.


def test_table_with_header_unicode_quotes_and_bom(tmp_path, block_bytes):
  path = _write(
    tmp_path / "log.csv",
    "\ufeffwho,what,when,stars\n"
    '"Zoë","東京タワー",1511539200,4.5\n'
    "\n"
    "björn , café ,1511539201, 3\n"
    "Zoë,café,1511539202,1\n",
    newline="\r\n",
  )
  table = readers.read_table(path, user="who", item="what", timestamp="when", rating="stars")
  assert table.users.tolist() == ["Zoë", "björn", "Zoë"]
  assert table.items.tolist() == ["東京タワー", "café", "café"]
  np.testing.assert_array_equal(table.timestamps, [1511539200, 1511539201, 1511539202])
  np.testing.assert_array_equal(table.ratings, [4.5, 3, 1])


def test_table_numeric_ids_are_int64_and_leading_zeros_stay_text(tmp_path, block_bytes):
  numeric = _write(tmp_path / "a.csv", "user,item\n10,20\n30,40\n")
  table = readers.read_table(numeric, user="user", item="item")
  assert table.users.dtype == np.int64
  np.testing.assert_array_equal(table.items, [20, 40])
  # A text id anywhere makes the whole column text, numbers included, exactly as written.
  mixed = _write(tmp_path / "b.csv", "user,item\n10,20\n30,40\n007,x\n")
  table = readers.read_table(mixed, user="user", item="item")
  assert table.users.tolist() == ["10", "30", "007"]
  assert table.items.tolist() == ["20", "40", "x"]


def test_table_without_header_uses_indices_and_tabs(tmp_path):
  path = _write(tmp_path / "pinterest-20.train.rating", "0\t5\t1\t99\n1\t6\t1\t98\n")
  table = readers.read_table(
    path, user="0", item="1", timestamp="3", delimiter="\\t", header=False
  )
  np.testing.assert_array_equal(table.users, [0, 1])
  np.testing.assert_array_equal(table.timestamps, [99, 98])


def test_table_multibyte_delimiter_and_iso_times(tmp_path):
  path = _write(tmp_path / "log.txt", "u||i||t\na||b||2017-11-25 10:00:00\nc||d||2017-11-26\n")
  table = readers.read_table(path, user="u", item="i", timestamp="t", delimiter="||")
  np.testing.assert_array_equal(table.timestamps, [1511604000, 1511654400])


@pytest.mark.parametrize(
  "unit, body, seconds",
  [
    # Floor division, negative times included: -1 ms is in second -1, -1001 ms in second -2.
    ("ms", "1511539200999\n1511539201000\n5\n-1\n-1000\n-1001\n",
     [1511539200, 1511539201, 0, -1, -1, -2]),
    ("us", "1511539200000001\n-1\n", [1511539200, -1]),
    # 19 digits, one more than a plain int64 parse takes.
    ("ns", "1511539200999999999\n-1500000000\n999999999\n", [1511539200, -2, 0]),
  ],
)
def test_table_integer_timestamp_units_floor_to_seconds(tmp_path, unit, body, seconds, block_bytes):
  rows = "".join(f"a,b{k},{t}\n" for k, t in enumerate(body.split()))
  path = _write(tmp_path / "log.csv", "u,i,t\n" + rows)
  table = readers.read_table(path, user="u", item="i", timestamp="t", timestamp_unit=unit)
  np.testing.assert_array_equal(table.timestamps, seconds)
  assert table.timestamps.dtype == np.int64


def test_table_timestamp_unit_leaves_iso_times_and_checks_the_unit(tmp_path):
  path = _write(tmp_path / "log.csv", "u,i,t\na,b,2017-11-25 10:00:00\nc,d,2017-11-26\n")
  table = readers.read_table(path, user="u", item="i", timestamp="t", timestamp_unit="ns")
  np.testing.assert_array_equal(table.timestamps, [1511604000, 1511654400])
  path = _write(tmp_path / "bad.csv", "u,i,t\na,b,1511539200000\nc,d,15115392x0000\n")
  with pytest.raises(ValueError) as info:
    readers.read_table(path, user="u", item="i", timestamp="t", timestamp_unit="ms")
  assert str(info.value) == (
    f"{path}:3: expected integer milliseconds as a timestamp in column 't', "
    "got 'c,d,15115392x0000'"
  )
  with pytest.raises(ValueError, match=r"timestamp_unit must be one of .* got 'min'"):
    readers.read_table(path, user="u", item="i", timestamp="t", timestamp_unit="min")


@pytest.mark.parametrize(
  "body, line, expected",
  [
    ("a,b,1\nc,d\n", 3, "3 fields separated by ','"),
    ("a,b,1\nc,d,x\n", 3, "integer seconds as a timestamp in column 't'"),
    ("a,b,1\n,d,2\n", 3, "a user in column 'u'"),
  ],
)
def test_table_errors_name_file_and_line(tmp_path, body, line, expected):
  path = _write(tmp_path / "log.csv", "u,i,t\n" + body)
  with pytest.raises(ValueError) as info:
    readers.read_table(path, user="u", item="i", timestamp="t")
  assert str(info.value).startswith(f"{path}:{line}: expected {expected}, got ")


def test_table_unknown_column(tmp_path):
  path = _write(tmp_path / "log.csv", "u,i\n1,2\n")
  with pytest.raises(ValueError, match=r"no item column 'item' in the header \['u', 'i'\]"):
    readers.read_table(path, user="u", item="item")
  with pytest.raises(ValueError, match="0-based index"):
    readers.read_table(path, user="u", item="i", header=False)


def test_table_header_only(tmp_path):
  path = _write(tmp_path / "log.csv", "u,i\n\n")
  with pytest.raises(ValueError, match="header but no data lines"):
    readers.read_table(path, user="u", item="i")


def test_table_bad_utf8_names_line(tmp_path):
  path = tmp_path / "log.csv"
  path.write_bytes(b"u,i\nab,c\n\xff\xfe,d\n")
  with pytest.raises(ValueError, match=r"log.csv:3: expected a user in column 'u' in UTF-8"):
    readers.read_table(str(path), user="u", item="i")


# UserBehavior.


def test_user_behavior_keeps_listed_types(tmp_path, block_bytes):
  path = _write(
    tmp_path / "UserBehavior.csv",
    "1,2268318,2520377,pv,1511544070\n"
    "1,2333346,2520771,buy,1511561733\n"
    "2,2576651,149192,fav,1511572885\n"
    "3,3830808,4181361,share,1511593493\n"
    "3,4365585,2520377,cart,1511596146\n\n",
    newline="\r\n",
  )
  table = readers.read_user_behavior(path)
  np.testing.assert_array_equal(table.users, [1, 1, 2, 3])
  np.testing.assert_array_equal(table.items, [2268318, 2333346, 2576651, 4365585])
  assert [table.behavior_names[code] for code in table.behaviors] == ["pv", "buy", "fav", "cart"]
  table = readers.read_user_behavior(path, behaviors=("buy", "cart"))
  np.testing.assert_array_equal(table.items, [2333346, 4365585])
  np.testing.assert_array_equal(table.timestamps, [1511561733, 1511596146])
  np.testing.assert_array_equal(table.behaviors, [0, 1])


def test_user_behavior_header_is_allowed(tmp_path):
  path = _write(
    tmp_path / "UserBehavior.csv",
    "user_id,item_id,category_id,behavior_type,timestamp\n5,6,7,pv,1511544070\n",
  )
  np.testing.assert_array_equal(readers.read_user_behavior(path).users, [5])


@pytest.mark.parametrize(
  "bad_line, expected",
  [
    ("1,abc,3,pv,1511544070", "an integer item_id in"),
    ("1,2,3,pv,151154407x", "an integer timestamp in"),
    ("1,2,3,pv", "'user_id,item_id,category_id,behavior_type,timestamp'"),
  ],
)
def test_user_behavior_errors(tmp_path, bad_line, expected, block_bytes):
  path = _write(tmp_path / "UserBehavior.csv", "1,2,3,pv,1511544070\n" * 3 + bad_line + "\n")
  with pytest.raises(ValueError) as info:
    readers.read_user_behavior(path)
  assert str(info.value).startswith(f"{path}:4: expected {expected}")
  assert str(info.value).endswith(f"got {bad_line!r}")


def test_parse_ints_round_trips_random_values():
  rng = np.random.default_rng(0)
  values = rng.integers(-(10**18) + 1, 10**18, size=2_000)
  values[:5] = [0, -1, 7, 10**18 - 1, -(10**18) + 1]
  text = b"".join(b"%d\n" % value for value in values)
  data = np.frombuffer(text + bytes(readers._PADDING), dtype=np.uint8)
  ends = np.flatnonzero(data == ord("\n"))
  starts = np.concatenate([[0], ends[:-1] + 1])
  parsed, bad = readers._parse_ints(data, starts, ends, signed=True)
  assert not bad.any()
  np.testing.assert_array_equal(parsed, values)
  _, bad = readers._parse_ints(data, starts, ends)  # Unsigned: every '-' is an error.
  np.testing.assert_array_equal(bad, values < 0)


# Parquet.


def test_parquet_needs_pyarrow_with_install_hint(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[parquet\]"'):
    readers.read_table(str(tmp_path / "log.parquet"), user="u", item="i")


def test_parquet_columns(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = str(tmp_path / "log.parquet")
  table = pa.table({
    "who": ["Zoë", "björn", "Zoë"],
    "item": pa.array([5, 6, 5], type=pa.int32()),
    "when": pa.array([1511539200_000, 1511539201_000, 1511539202_000], type=pa.timestamp("ms")),
    "stars": [1.0, 2.5, 3.0],
  })
  pq.write_table(table, path, row_group_size=2)
  read = readers.read_table(path, user="who", item="item", timestamp="when", rating="stars")
  assert read.users.tolist() == ["Zoë", "björn", "Zoë"]
  np.testing.assert_array_equal(read.items, [5, 6, 5])
  assert read.items.dtype == np.int64
  np.testing.assert_array_equal(read.timestamps, [1511539200, 1511539201, 1511539202])
  np.testing.assert_array_equal(read.ratings, [1.0, 2.5, 3.0])

  # The unit applies to an integer column only; a timestamp-typed one carries its own.
  pq.write_table(table.append_column("ms", pa.array([1511539200_999, -1, 2_000])), path)
  read = readers.read_table(path, user="who", item="item", timestamp="ms", timestamp_unit="ms")
  np.testing.assert_array_equal(read.timestamps, [1511539200, -1, 2])
  read = readers.read_table(path, user="who", item="item", timestamp="when", timestamp_unit="ms")
  np.testing.assert_array_equal(read.timestamps, [1511539200, 1511539201, 1511539202])

  pq.write_table(pa.table({"u": [1, None], "i": [2, 3]}), path)
  with pytest.raises(ValueError, match="log.parquet: row 2: the user column 'u' is null"):
    readers.read_table(path, user="u", item="i")
