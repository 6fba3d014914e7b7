"""Paper settings on Gowalla (the NGCF/LightGCN release: 29,858 users, 40,981 items, 1,027,370).

The paper re-splits 70/30 per user: both released files are merged and split again with the seed.
`--config.data.split=published` keeps the release's own train/test instead.

  python -m hashgnn_jax.main --config=configs/gowalla.py --workdir=/tmp/gowalla \
      --config.data.path=/data/gowalla   # a folder with train.txt and test.txt
"""

from hashgnn_jax import config_lib


def get_config(variant: str = config_lib.DEFAULT_VARIANT):
  config = config_lib.apply_variant(config_lib.default_config(), variant)
  config.data.kind = "gowalla"
  config.data.path = ""
  config.data.split = "random"
  config.data.valid_fraction = 0.1
  config.train.num_epochs = 20.0
  config.eval.every_steps = 2_500  # About one epoch at batch 256.
  config.eval.user_chunk = 512
  return config
