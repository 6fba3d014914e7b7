"""Paper settings on the embedded synthetic graph (no download, no files).

  python -m hashgnn_jax.main --config=configs/default.py --workdir=/tmp/hashgnn
  python -m hashgnn_jax.main --config=configs/default.py:authors_code --workdir=/tmp/hashgnn_ac
"""

from hashgnn_jax import config_lib


def get_config(variant: str = "paper"):
  return config_lib.apply_variant(config_lib.default_config(), variant)
