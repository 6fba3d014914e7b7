"""What the data stage accepts: data kinds, splits, timestamp units and behaviour types.

A leaf module (it imports nothing of the package) so that the config schema can validate
`config.data` against the same names the readers and `prepare` act on, without importing them.
"""

# What each file-backed kind reads from `config.data.path`, quoted when the path is missing.
FILE_KINDS = {
  "movielens": "a MovieLens ratings file (ratings.dat, u.data or ratings.csv) or its folder",
  "gowalla": "a LightGCN-format Gowalla folder (train.txt and test.txt) or adjacency file",
  "pinterest": "a LightGCN-format Pinterest folder (train.txt and test.txt) or adjacency file",
  "alibaba": "a UserBehavior.csv-format file",
  "lightgcn": "a folder holding LightGCN-format train.txt and test.txt, or one such file",
  "csv": "a CSV, TSV or Parquet file of interactions (columns set by config.data.columns)",
}
KINDS = ("synthetic",) + tuple(FILE_KINDS)
# random: per user, seeded; published: the files' own train/test; temporal: timestamp windows.
SPLITS = ("random", "published", "temporal")
# Decimal digits below one second in each unit of integer timestamps.
TIMESTAMP_UNIT_DIGITS = {"s": 0, "ms": 3, "us": 6, "ns": 9}
USER_BEHAVIOR_TYPES = ("pv", "buy", "cart", "fav")  # Taobao's four behaviour types.
