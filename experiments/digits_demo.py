"""What `make demo` runs: every stage on the embedded world, sized for ~20 min on 2 CPU cores.

Command:
  make demo                      # = vidsim demo --config experiments/digits_demo.py --workdir runs/demo
Expected runtime: measured 15.6 minutes on a 2-core CPU (data 0 s when cached, else
~5 s; VAE 600 steps 6.1 min; latent cache 27 s; DiT 1000 steps 8.8 min; ten sampling
tasks 13 s; report < 1 s). Session 2 (einsum attention, global packing plan): 19.1
minutes with the test suite running beside it for 12 of them (VAE 611 s, cache 44 s,
DiT 483 s, sampling 11 s).
Expected result: runs/demo/report.html with every task's output. Measured: VAE
validation PSNR 21.9 dB (EMA); DiT flow loss 1.96 -> ~1.0, packing efficiency 0.95;
the samples are coloured blobs that move and spread, NOT recognisable digits.
This config shows the pipeline working end to end, not sample quality. These figures
predate session 3's DiT init fix (self-attention and MLP had zero gradients) and the
VAE norm change; the demo has not been re-run since.
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  # VAE: short training, higher learning rate; latents 4x4 spatial, 4x temporal.
  c.vae.latent_channels = 8
  c.vae_train.recon_loss = "l2"
  c.vae_train.steps = 600
  c.vae_train.learning_rate = 2e-3
  c.vae_train.warmup_steps = 30
  c.vae_train.ema_decay = 0.99
  c.vae_train.log_every = 10
  c.vae_train.checkpoint_every = 100
  c.vae_train.recon_every = 100
  # DiT: small enough for ~1000 steps in 8 minutes.
  c.dit.width = 128
  c.dit.depth = 4
  c.dit.heads = 4
  c.dit.attention_impl = "einsum"  # The fastest attention on a CPU (docs/benchmarks.md "## DiT").
  c.text.width = 64
  c.text.depth = 1
  c.train.steps = 1000
  c.train.rows_per_batch = 8
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.ema_decay = 0.99
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.sample_every = 0
  c.sample.steps = 20
  return c
