"""Paper settings at Alibaba scale (WWW 2020, Table 1: 601,946 users, 4,167,708 items).

The UserBehavior-format loader comes with the real-data issue; until then this config parses and
stops with a message naming config.data.path.

  python -m hashgnn_jax.main --config=configs/alibaba.py --workdir=/tmp/alibaba \
      --config.data.path=/data/UserBehavior.csv
"""

from hashgnn_jax import config_lib


def get_config(variant: str = "paper"):
  config = config_lib.apply_variant(config_lib.default_config(), variant)
  config.data.kind = "alibaba"
  config.data.path = ""  # A UserBehavior.csv-format file: user,item,category,behaviour,timestamp.
  config.train.batch_size = 1_024
  config.eval.user_chunk = 64  # Each chunk scores against ~4.2M items.
  config.eval.edge_chunk = 1_048_576
  config.checkpoint.every_steps = 5_000
  return config
