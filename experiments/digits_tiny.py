"""A tiny everything-config for CI smoke tests on 8 fake CPU devices.

Command:
  vidsim config --config experiments/digits_tiny.py
  vidsim demo --config experiments/digits_tiny.py --workdir /tmp/tiny
Expected runtime: a few minutes on a 2-core CPU for the whole pipeline.
Expected result: the pipeline runs end to end; the models are too small and too
briefly trained to produce recognisable digits. Use it to check plumbing, not quality.
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  c.moving_digits.train_examples = 64
  c.moving_digits.eval_examples = 16
  c.moving_digits.frames = 5
  c.moving_digits.height = 16
  c.moving_digits.width = 16
  c.moving_digits.digit_size = 8
  c.moving_digits.mixed_shapes = ((5, 16, 16), (9, 16, 16), (5, 16, 24), (5, 24, 16), (1, 16, 16))
  c.moving_digits.occlusion_shape = (9, 16, 32)
  c.moving_digits.occluder_width = 10
  c.data.buckets = ((5, 16, 16), (5, 16, 24), (1, 16, 16))
  c.data.batch_size = 8
  c.vae.widths = (8, 16, 16)
  c.vae.latent_channels = 4
  c.vae_train.steps = 4
  c.vae_train.log_every = 1
  c.vae_train.checkpoint_every = 2
  c.vae_train.recon_every = 4
  c.dit.width = 32
  c.dit.depth = 2
  c.dit.heads = 2
  c.text.width = 32
  c.text.depth = 1
  c.text.heads = 2
  c.text.max_length = 32
  c.train.steps = 4
  c.train.row_tokens = 64
  c.train.rows_per_batch = 8
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.sample_every = 0
  c.sample.steps = 4
  c.sample.frames = 5
  c.sample.height = 16
  c.sample.width = 16
  c.sample.window_frames = 9  # 3 latent frames: room for a loop's bridge (1 clean at each end).
  return c
