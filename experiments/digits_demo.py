"""What `make demo` runs: every stage on the embedded world, on 2 CPU cores.

Command:
  make demo                      # = vidsim demo --config experiments/digits_demo.py --workdir runs/demo
Expected runtime: 26.9 minutes (1,611 s) for `vidsim demo` from an empty workdir and data
directory on 2 cores of an AMD EPYC (Zen 4, `lscpu` family 25 model 17, AVX-512), nothing
else running, in-process matmul rate 177-195 GFLOP/s (`vidsim bench` right after): dataset
8 s, VAE 2,000 steps 741 s, latent cache 60 s, DiT 2,000 steps 780 s (0.39 s a step), ten
sampling tasks 16 s, the probe 6 s, report < 1 s.
Expected result: VAE 28.8 dB PSNR over the whole validation split (EMA); DiT flow loss
1.85 -> 0.56, packing efficiency 0.95; probe 4/20 digit, 20/20 colour, 0/20 direction.
The samples are digit-sized strokes in the prompt's colour that move and change shape;
they are NOT reliably the prompt's digit or direction: this config shows the pipeline
working end to end, not sample quality (experiments/digits_quality.py does).
What it lacks is training steps. At step 2,000 the held-out loss at t = 0.9 rises by
0.123 without the caption, by 0.020 with the direction flipped and by 0.001 with the
digit changed: the model follows the colour word, has begun to follow the direction
(the gain was 0.006 at step 1,500) and not the digit. With one key per caption byte
instead of per word (--config.text.units=bytes) the direction gain was 0.0026 at step
2,000 (probe 2/20 digit, 3/20 direction). The DiT alone, trained again on this demo's
latent cache with --config.seed=1 --config.train.steps=3000 (~21 minutes on the Zen 4),
bound the direction sooner: 40 probe prompts read direction 4, 3, 8, 16, 19, 22 / 40 at
steps 500 to 3,000, digit 2, 3, 6, 5, 5, 2 / 40 (docs/text.md, "Word keys").
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  # The world of experiments/digits_quality.py, whose model learns to follow its prompts:
  # one digit a scene (one digit, colour and direction a caption to bind), on paths that
  # stay inside the frame (the caption's direction holds for the whole clip).
  c.moving_digits.max_digits = 1
  c.moving_digits.paths = "inside"
  # Twice the default: the DiT sees each scene ~20 times (on 2,000 scenes the quality
  # config's model began to memorise them), and encoding them takes under a minute.
  c.moving_digits.train_examples = 4000
  # VAE: experiments/digits_vae.py's recipe on a shorter schedule; latents 4x4
  # spatial, 4x temporal.
  c.vae.latent_channels = 8
  c.vae.spatial_only_levels = 3  # More PSNR per step (docs/benchmarks.md, VAE design notes).
  c.vae_train.recon_loss = "l2"
  c.data.batch_size = 8
  c.vae_train.steps = 2000
  c.vae_train.learning_rate = 3e-3
  c.vae_train.warmup_steps = 50
  c.vae_train.end_lr_fraction = 0.3
  c.vae_train.ema_decay = 0.99
  c.vae_train.log_every = 20
  c.vae_train.checkpoint_every = 250
  c.vae_train.recon_every = 250
  # DiT: small enough for 2,000 steps in 7-13 minutes (0.20 s a step at a matmul rate of
  # ~450 GFLOP/s, 0.36 s at ~200).
  c.dit.width = 128
  c.dit.depth = 4
  c.dit.heads = 4
  c.dit.mlp = "swiglu"  # Faster than GELU on XLA:CPU at the same FLOPs.
  c.dit.attention_impl = "einsum"  # The fastest attention on a CPU (docs/benchmarks.md, DiT design notes).
  # As in experiments/digits_quality.py: sincos positions say where the left of the frame
  # is, and the timestep shift trains more at the high noise where the start is decided.
  c.dit.position_embedding = "sincos"
  c.flow.shift_base_tokens = 8
  c.text.width = 64
  c.text.depth = 1
  # One cross-attention key per word: on byte keys the attention stays near uniform over
  # the caption's ~20 bytes for thousands of steps, so the direction words reach the tokens
  # diluted (docs/text.md, "Word keys").
  c.text.units = "words"
  c.train.steps = 2000
  c.train.rows_per_batch = 8
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.ema_decay = 0.99
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.sample_every = 0
  c.sample.steps = 20
  return c
