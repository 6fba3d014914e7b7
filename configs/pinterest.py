"""Paper settings on Pinterest (Table 1: 55,187 users, 9,916 items, 1,500,809 interactions).

  python -m hashgnn_jax.main --config=configs/pinterest.py --workdir=/tmp/pinterest \
      --config.data.path=/data/pinterest
"""

from hashgnn_jax import config_lib


def get_config(variant: str = config_lib.DEFAULT_VARIANT):
  config = config_lib.apply_variant(config_lib.default_config(), variant)
  config.data.kind = "pinterest"
  config.data.path = ""
  config.data.split = "random"
  config.data.valid_fraction = 0.1
  config.train.num_epochs = 20.0
  config.eval.every_steps = 4_000
  config.eval.user_chunk = 1_024
  return config
