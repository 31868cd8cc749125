"""Datasets and input pipelines: pixels (TFDS + grain) and packed latent rows."""
