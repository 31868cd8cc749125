"""The VAE of the embedded world, trained to a clean reconstruction on a 2-core CPU.

Command:
  vidsim data prepare --config experiments/digits_vae.py
  vidsim train-vae --config experiments/digits_vae.py --workdir runs/digits_vae
Expected runtime: about 15-20 minutes on a 2-core CPU (XLA:CPU), 8 fake-free devices = 1.
Expected result: validation PSNR (EMA weights) at or above 30 dB on moving_digits/mixed;
see docs/benchmarks.md for the measured curve.
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  c.vae.latent_channels = 8
  c.vae_train.recon_loss = "l2"
  c.vae_train.steps = 1500
  c.vae_train.learning_rate = 2e-3
  c.vae_train.warmup_steps = 50
  c.vae_train.ema_decay = 0.99
  c.vae_train.log_every = 20
  c.vae_train.checkpoint_every = 200
  c.vae_train.recon_every = 100
  return c
