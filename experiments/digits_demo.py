"""What `make demo` runs: every stage on the embedded world, on 2 CPU cores.

Command:
  make demo                      # = vidsim demo --config experiments/digits_demo.py --workdir runs/demo
Expected runtime: 23.3 minutes (1,400 s) for `vidsim demo` from an empty workdir and data
directory on 2 cores of an AMD EPYC (Zen 4, `lscpu` family 25 model 17, AVX-512), nothing
else running, in-process matmul rate 177-209 GFLOP/s (`vidsim bench` the same day):
dataset 8 s, VAE 2,000 steps 520 s, latent cache 40 s, DiT 3,000 steps 807 s (0.25 s a
step), ten sampling tasks 20 s, the probe 6 s, report < 1 s.
Expected result: VAE 28.2 dB PSNR over the whole validation split (EMA); DiT flow loss
2.00 -> 0.42, packing efficiency 0.86; probe 12/20 digit, 20/20 colour, 19/20 direction
(the scorer reads true clips at 0.93 / 1.00 / 0.97).
The samples are digit-shaped strokes in the prompt's colour that move in the prompt's
direction and are the prompt's digit more than half of the time: this config shows the
pipeline working end to end, not sample quality (experiments/digits_quality.py does).
At step 3,000 the held-out loss at t = 0.9 rises by 0.191 without the caption, by 0.327
with the direction flipped and by 0.014 with the digit changed (0.033 at t = 0.6). What
the world's settings, the packing and the schedule below did is in docs/generate.md ("The
demo and its report").
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  # As in experiments/digits_quality.py, whose model learns to follow its prompts:
  # one digit a scene (one digit, colour and direction a caption to bind), on paths that
  # stay inside the frame (the caption's direction holds for the whole clip).
  c.moving_digits.max_digits = 1
  c.moving_digits.paths = "inside"
  # Digits that move 12-16 px over the 9 frames (the base world: 4-20): the direction is a
  # larger change between latent frames, which the DiT follows sooner (docs/generate.md).
  c.moving_digits.speed = (1.5, 2.0)
  # 16 px digits (base: 12) span 4 latent pixels instead of 3: the DiT binds the digit
  # word sooner (docs/generate.md).
  c.moving_digits.digit_size = 16
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
  # DiT: small enough for 3,000 steps in 12.5-13.5 minutes on the Zen 4 (0.22-0.25 s a
  # step at a matmul rate of ~200 GFLOP/s, on the blocks below).
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
  # The digit word binds last: its held-out gain at t = 0.6 was 0.016 at step 2,000 and
  # 0.027 at 3,000; the probe's digit 5/20 after 2,000 steps, 10/20 after 3,000.
  c.train.steps = 3000
  # Two CPU devices, each running half of every batch on its own thread: on 2 cores the
  # VAE step is ~27% shorter than on one device, the DiT's ~6% (docs/benchmarks.md,
  # "Devices per core").
  c.mesh.cpu_devices = 2
  # Rows of 4 blocks of 48 tokens, one clip (45-48 tokens) or image (15-16) a block: every
  # batch takes the DiT's blocked path (each clip attends within its own block and reads
  # only its own caption), 40 samples a step as 8 first-fit rows of 256 held.
  c.train.row_tokens = 192
  c.dit.segment_blocks = 4
  c.train.rows_per_batch = 10
  c.train.learning_rate = 1e-3
  # The cosine ends at half the peak, not a tenth: the digit word binds while the rate is
  # high (probe digit 27/40 at step 3,000, against 20/40 ending at 0.1; docs/generate.md).
  c.train.end_lr_fraction = 0.5
  c.train.warmup_steps = 50
  c.train.ema_decay = 0.99
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.sample_every = 0
  c.sample.steps = 20
  return c
