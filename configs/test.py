"""A tiny configuration that trains and evaluates in seconds, for the end-to-end tests."""

from hashgnn_jax import config_lib


def get_config(variant: str = config_lib.DEFAULT_VARIANT):
  config = config_lib.apply_variant(config_lib.default_config(), variant)
  config.data.synthetic.num_users = 600
  config.data.synthetic.num_items = 300
  config.data.synthetic.num_communities = 8
  config.data.synthetic.mean_items_per_user = 15.0
  config.data.synthetic.min_items_per_user = 5
  config.model.embed_dim = 16
  config.model.input_dense = min(config.model.input_dense, 16)
  # lightgcn's layers keep the embedding's width.
  config.model.hidden_dims = (16, 16) if config.model.aggregator == "lightgcn" else (32, 16)
  config.sampler.fanouts = (4, 3)
  config.train.batch_size = 128
  config.train.num_steps = 600
  config.train.learning_rate = 1e-2
  config.train.log_every_steps = 100
  config.guidance.transition_steps = 100 if variant != "authors_code" else -2
  config.eval.num_candidates = 150
  config.eval.paper_candidates = 100
  config.eval.cutoffs = (10, 50)
  config.eval.user_chunk = 128
  config.eval.edge_chunk = 2_048
  config.checkpoint.every_steps = 200
  return config
