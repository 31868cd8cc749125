"""What `make demo` runs: every stage on the embedded world, sized for ~20 min on 2 CPU cores.

Command:
  make demo                      # = vidsim demo --config experiments/digits_demo.py --workdir runs/demo
Expected runtime: 14.5 minutes (871 s) for `make demo`, 2 cores of an AMD EPYC (Zen 5),
nothing else running, in-process matmul rate ~450 GFLOP/s
(docs/benchmarks.md, "The machine behind these figures"): VAE 2,000 steps 401 s, latent
cache 24 s, DiT 2,000 steps 429 s (0.20 s a step), ten sampling tasks 12 s, the probe
4 s, report < 1 s; building the dataset, where it is not in the data directory, adds ~3 s.
Expected result: runs/demo/report.html with every task's output. Measured: VAE 27.4 dB
PSNR over the whole validation split (EMA); DiT flow loss 2.02 -> 0.53, packing
efficiency 0.94; probe 3/20 digit, 20/20 colour, 0/20 direction. The samples are
coloured blobs and strokes that move, NOT recognisable digits: this config shows the
pipeline working end to end, not sample quality (experiments/digits_quality.py does).
The quality config's world and DiT settings do not change that at this budget: one
digit a scene on inside paths (10,000 scenes), sincos positions and
flow.shift_base_tokens=8, with this VAE and 2,000 DiT steps, scored digit 2/20, colour
20/20, direction 1/20; the held-out direction-word gain at t = 0.9 only starts at step
2,000 (+0.023). With that world, a 1,000-step VAE of this recipe (26.6 dB; its
reconstructions read digit 0.88 against 0.90 on true clips) and this DiT for 3,000 steps
(~19 minutes with its hooks on a Zen 4 with a matmul rate of ~190 GFLOP/s), 40 probe
prompts read digit 6, 3, 8, 10, 14, 12 / 40 at steps 500 to 3,000 and direction 3, 0, 0,
1, 2, 2 / 40. What the demo lacks is training steps.
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
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
  # DiT: small enough for 2,000 steps in about 9 minutes.
  c.dit.width = 128
  c.dit.depth = 4
  c.dit.heads = 4
  c.dit.mlp = "swiglu"  # Faster than GELU on XLA:CPU at the same FLOPs.
  c.dit.attention_impl = "einsum"  # The fastest attention on a CPU (docs/benchmarks.md, DiT design notes).
  c.text.width = 64
  c.text.depth = 1
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
