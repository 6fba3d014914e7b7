"""Paper settings on MovieLens-1M (Table 1: 6,040 users, 3,952 items, 1,000,209 ratings).

  python -m hashgnn_jax.main --config=configs/movielens.py --workdir=/tmp/ml1m \
      --config.data.path=/data/ml-1m/ratings.dat
"""

from hashgnn_jax import config_lib


def get_config(variant: str = config_lib.DEFAULT_VARIANT):
  config = config_lib.apply_variant(config_lib.default_config(), variant)
  config.data.kind = "movielens"
  config.data.path = ""  # ratings.dat (ML-1M / ML-10M) or u.data (ML-100K).
  config.data.split = "random"  # Paper: 70/30 per user, 10% of train for validation.
  config.data.valid_fraction = 0.1
  # Every rating counts as an interaction, as in the paper; --config.data.min_rating=4.0 would
  # keep only 4 and 5 stars as implicit positives.
  config.data.min_rating = float("-inf")
  config.train.num_epochs = 20.0
  config.eval.every_steps = 2_000
  return config
