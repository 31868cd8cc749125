"""The VAE of the embedded world (moving_digits/mixed), on a 2-core CPU.

Command:
  vidsim data prepare --config experiments/digits_vae.py
  vidsim train-vae --config experiments/digits_vae.py --workdir runs/digits_vae
  vidsim eval-vae  --config experiments/digits_vae.py --workdir runs/digits_vae
Expected runtime: 5,500 steps of 8 clips; 19.1 minutes (~4.9 steps/s) on 2 cores of an
AMD EPYC (Zen 5), nothing else running, with 4 KB pages (the default huge pages make
the step ~25% faster), including data loading, validation, checkpoints and the final
whole-split evaluation.
Expected result: 31.1 dB PSNR (EMA weights) over the whole validation split, printed
at the end and in W/eval/vae_psnr_validation.json (`vidsim eval-vae` recomputes it);
32.1 dB on the training hook's validation batch. Curve and design notes in
docs/benchmarks.md ("VAE").
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  c.vae.latent_channels = 8  # What the DiT configs use; 16 was not shown to beat it (docs/benchmarks.md).
  c.vae.spatial_only_levels = 3  # Time mixes only in the stride-2 time convs: more PSNR per step.
  c.vae_train.recon_loss = "l2"
  c.data.batch_size = 8  # More PSNR per clip seen than 16 (docs/benchmarks.md).
  c.vae_train.steps = 5500
  c.vae_train.learning_rate = 3e-3
  c.vae_train.warmup_steps = 50
  c.vae_train.end_lr_fraction = 0.3  # Keeps the rate up: cosine to 5% ended 0.6 dB lower.
  c.vae_train.ema_decay = 0.99
  c.vae_train.log_every = 20
  c.vae_train.checkpoint_every = 500
  c.vae_train.recon_every = 250  # Also the validation PSNR interval.
  return c
