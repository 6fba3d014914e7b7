"""Paper settings at Alibaba scale (WWW 2020, Table 1: 601,946 users, 4,167,708 items).

Data in the Taobao UserBehavior.csv layout (user,item,category,behaviour,timestamp); the first six
days train, the last day tests, users with fewer than 10 interactions are dropped.

  python -m hashgnn_jax.main --config=configs/alibaba.py --workdir=/tmp/alibaba \
      --config.data.path=/data/UserBehavior.csv
"""

from hashgnn_jax import config_lib


def get_config(variant: str = "paper"):
  config = config_lib.apply_variant(config_lib.default_config(), variant)
  config.data.kind = "alibaba"
  config.data.path = ""  # A UserBehavior.csv-format file: user,item,category,behaviour,timestamp.
  config.data.split = "temporal"
  config.data.train_days = 6.0
  config.data.test_days = 1.0
  config.data.min_user_interactions = 10
  config.data.valid_fraction = 0.1
  config.eval.every_steps = 20_000
  config.train.batch_size = 1_024
  config.eval.user_chunk = 64  # Each chunk scores against ~4.2M items.
  config.eval.edge_chunk = 1_048_576
  config.checkpoint.every_steps = 5_000
  return config
