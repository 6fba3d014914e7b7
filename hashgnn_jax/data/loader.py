"""From a `config.data` section to a `Dataset`: the generated graph, or a prepared real log."""

import os

import ml_collections

from hashgnn_jax import config_lib
from hashgnn_jax import distributed
from hashgnn_jax.data import dataset
from hashgnn_jax.data import formats
from hashgnn_jax.data import prepare
from hashgnn_jax.data import synthetic


def load_dataset(data_config: ml_collections.ConfigDict) -> dataset.Dataset:
  """Builds the data set described by `data_config`; keys it lacks take the schema defaults."""
  data_config = config_lib.with_data_defaults(data_config)
  config_lib.validate_data(data_config)
  kind = data_config.kind
  if kind == "synthetic":
    return _build_synthetic(data_config)
  path = data_config.path
  hint = (f"data kind {kind!r} needs the path of {formats.FILE_KINDS[kind]} "
          "(pass --config.data.path=...)")
  if not path:
    raise FileNotFoundError(f"config.data.path is empty: {hint}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.path={path!r} does not exist: {hint}")
  # Every process reads the prepared cache; process 0 alone writes it when missing or stale.
  return distributed.main_first("prepared data set",
                                lambda: prepare.load_or_prepare(data_config))


def _build_synthetic(data_config: ml_collections.ConfigDict) -> dataset.Dataset:
  """Generates the planted-community graph of `data_config.synthetic` and splits it."""
  cfg = data_config.synthetic
  graph_seed, test_seed, valid_seed = dataset.split_seeds(data_config.seed)
  users, items = synthetic.generate_interactions(
    num_users=cfg.num_users,
    num_items=cfg.num_items,
    num_communities=cfg.num_communities,
    mean_items_per_user=cfg.mean_items_per_user,
    min_items_per_user=cfg.min_items_per_user,
    popularity_exponent=cfg.popularity_exponent,
    in_community_prob=cfg.in_community_prob,
    seed=graph_seed,
  )
  is_test = dataset.split_per_user(users, items, test_fraction=data_config.test_fraction,
                                   seed=test_seed)
  return dataset.with_validation("synthetic", cfg.num_users, cfg.num_items, users, items,
                                 is_test, valid_fraction=data_config.valid_fraction,
                                 valid_seed=valid_seed)
