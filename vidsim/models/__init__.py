"""Flax NNX models: the video VAE, the diffusion transformer and its text encoders."""
