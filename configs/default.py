"""The embedded synthetic graph (no download, no files), with the default variant.

  python -m hashgnn_jax.main --config=configs/default.py --workdir=/tmp/hashgnn
  python -m hashgnn_jax.main --config=configs/default.py:paper --workdir=/tmp/hashgnn_paper
  python -m hashgnn_jax.main --config=configs/default.py:authors_code --workdir=/tmp/hashgnn_ac
"""

from hashgnn_jax import config_lib


def get_config(variant: str = config_lib.DEFAULT_VARIANT):
  return config_lib.apply_variant(config_lib.default_config(), variant)
