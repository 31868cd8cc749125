"""The VAE of the embedded world (moving_digits/mixed), on a 2-core CPU.

Command:
  vidsim data prepare --config experiments/digits_vae.py
  vidsim train-vae --config experiments/digits_vae.py --workdir runs/digits_vae
Expected runtime: 4,500 steps of 8 clips; measured 17.6 minutes on a quiet 2-core CPU
(~4.4 steps/s), including data loading, validation and checkpoints.
Expected result: validation PSNR (EMA weights) 30.35 dB on the training hook's
validation batch, 29.3 dB over the whole validation split (the issue's >= 30 dB holds
for the first, not the second); curve and comparisons in docs/benchmarks.md ("## VAE").
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  c.vae.latent_channels = 8  # What the DiT configs use; 16 was not shown to beat it (docs/benchmarks.md).
  c.vae_train.recon_loss = "l2"
  c.data.batch_size = 8  # More PSNR per clip seen than 16 (docs/benchmarks.md).
  c.vae_train.steps = 4500
  c.vae_train.learning_rate = 3e-3
  c.vae_train.warmup_steps = 50
  c.vae_train.end_lr_fraction = 0.3  # Keeps the rate up longer than cosine to 10%.
  c.vae_train.ema_decay = 0.99
  c.vae_train.log_every = 20
  c.vae_train.checkpoint_every = 500
  c.vae_train.recon_every = 250  # Also the validation PSNR interval.
  return c
