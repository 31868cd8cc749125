"""Sample quality on the embedded world within about 2 hours of a 2-core CPU.

The VAE is experiments/digits_vae.py's (same keys, so the same weights and latent
statistics); the DiT is sized so that a few thousand steps fit the remaining budget.

Command:
  vidsim data prepare --config experiments/digits_quality.py
  vidsim train-vae --config experiments/digits_quality.py --workdir runs/digits_quality
  vidsim encode    --config experiments/digits_quality.py --workdir runs/digits_quality
  vidsim train     --config experiments/digits_quality.py --workdir runs/digits_quality
  vidsim sample    --config experiments/digits_quality.py --workdir runs/digits_quality \\
      --prompt "a red 3 moves right" --out red3.mp4
  (or `vidsim demo --config experiments/digits_quality.py --workdir runs/digits_quality`,
  which runs every stage, every task and writes report.html)
Expected runtime: at most about 2 hours on a 2-core CPU. Measured (session 3): VAE 19.1 min
(digits_vae.py's run), latent cache 20 s, DiT 1,500 steps 47.5 min (~1.7 s/step; the
test suite ran beside it for ~30 min), every sampling task and the probe 16 s. That
leaves ~50 minutes of the budget: about 1,900 more steps (train.steps ~3,400).
Expected result, measured at 1,500 steps: NOT yet recognisable digits. Samples show
one digit-sized stroke shape in the prompt's colour that drifts and changes shape.
Probe scores (W/dit/samples/scores.jsonl, 40 prompts): colour 40/40 from step 500,
digit 5/40 (chance 4/40), direction 3/40; the scorer reads true clips at digit 0.92,
direction 0.89. Stills and commands: docs/generate.md ("What the outputs look like").
"""

import os

from vidsim.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_vae.py"))
  # DiT: latents of 9x32x32 clips are 3x8x8x8; patches of 1x2x2 give 48 tokens a clip.
  c.dit.width = 256
  c.dit.depth = 6
  c.dit.heads = 4
  c.dit.mlp = "swiglu"  # Faster than GELU on XLA:CPU at the same FLOPs (docs/benchmarks.md "## DiT").
  c.dit.attention_impl = "einsum"
  c.text.width = 128
  c.text.depth = 2
  c.train.row_tokens = 256
  c.train.rows_per_batch = 12  # ~60 clips a step; 2.2 s/step at 16 rows left too few steps.
  c.train.steps = 4500
  c.train.learning_rate = 8e-4
  c.train.warmup_steps = 100
  c.train.ema_decay = 0.999
  c.train.log_every = 20
  c.train.checkpoint_every = 250
  c.train.sample_every = 500
  c.train.sample_prompts = ("a red 3 moves right", "a blue 7 falls", "a green 0 moves left")
  c.train.score_samples = 40  # Every digit in each of 4 directions, scored (W/dit/samples/scores.jsonl).
  c.sample.steps = 30
  return c
