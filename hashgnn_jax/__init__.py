"""HashGNN in JAX/Flax: learning binary codes for recommendation from a user-item graph."""

__version__ = "0.1.0"
