"""vidsim: pretraining Sora-style video generation models in JAX/Flax."""

__version__ = "0.1.0"
