"""Training stages: the VAE (stage 1) and the DiT (stage 2), and what they share."""
