"""Sample quality on the embedded world within about 2 hours of a 2-core CPU.

The VAE is experiments/digits_vae.py's recipe, trained on this config's 30,000 scenes;
the DiT is sized so that a few thousand steps fit the remaining budget.

Command:
  vidsim data prepare --config experiments/digits_quality.py
  vidsim train-vae --config experiments/digits_quality.py --workdir runs/digits_quality
  vidsim encode    --config experiments/digits_quality.py --workdir runs/digits_quality
  vidsim train     --config experiments/digits_quality.py --workdir runs/digits_quality
  vidsim sample    --config experiments/digits_quality.py --workdir runs/digits_quality \\
      --prompt "a red 3 moves right" --out red3.mp4
  (or `vidsim demo --config experiments/digits_quality.py --workdir runs/digits_quality`,
  which runs every stage, every task and writes report.html)
Expected runtime: ~111 min from an empty workdir with `vidsim demo`, on 2 cores of an AMD
EPYC (Zen 5; docs/benchmarks.md, "The machine behind these figures"): data 28 s, VAE
16.7 min, latent cache 90 s, DiT 1.20-1.24 s a step with the hooks (~92 min for 4,500),
sampling every task 13 s, probe 6 s. The run is deterministic: a rerun gives the same
held-out losses and probe scores.
Expected result (step 4,500, EMA, Euler 30 steps, guidance 4): recognisable
digits in the prompt's colour that move in the prompt's direction. Probe scores
(W/dit/samples/scores.jsonl, 40 prompts: every digit in each of 4 directions) digit
39/40, colour 40/40, direction 39/40; the scorer reads true rendered clips of this
world at digit 0.92, direction 0.95. 80 more prompts at 32x32: 79 / 80 / 79; 40 wide
(24x40): 37 / 40 / 40; 40 vertical (40x24): 39 / 40 / 39; text-to-image 34/40 digits.
The digit comes from step ~2,000 (21/40), the direction from ~3,000 (17/40 there, 33/40
at 3,500). The conditioned tasks keep the given frames, colour and motion better than
the digit's shape. docs/generate.md ("What the outputs look like") has every task's
command and still, the training progress, and why each setting below is what it is.
Trained on moving_digits.captions=mixed (short and descriptive captions) instead, it had
bound neither the digit nor the direction word by step 3,500 (6/40, 3/40; the run above:
34/40, 33/40): docs/text.md, "Do descriptive training captions raise prompt following?".
"""

import os

from vidsim.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_vae.py"))
  # 2,000 scenes let the DiT memorise them: at 4,500 steps its loss at t = 0.3 was 0.31 on
  # train and 0.57 on validation. The world is procedural, so draw 15x more.
  c.moving_digits.train_examples = 30000
  # With paths that start anywhere, a fast digit bounces off an edge early: its clip moved
  # against its caption (the start velocity) 27% of the time, and the 4,500-step DiT never
  # learnt the sign of the motion (a flipped direction word changed its loss by 0.0002).
  # Inside paths keep the caption true for the whole clip.
  c.moving_digits.paths = "inside"
  # One digit a scene: every caption binds one digit, colour and direction, as the probe asks.
  c.moving_digits.max_digits = 1
  # DiT: latents of 9x32x32 clips are 3x8x8x8; patches of 1x2x2 give 48 tokens a clip.
  c.dit.width = 256
  c.dit.depth = 6
  c.dit.heads = 4
  c.dit.mlp = "swiglu"  # Faster than GELU on XLA:CPU at the same FLOPs (docs/benchmarks.md, DiT design notes).
  c.dit.attention_impl = "einsum"
  # Where a digit that "moves right" starts (on the left) is the largest thing its
  # direction tells the model at high noise, and RoPE alone cannot say where the left is.
  c.dit.position_embedding = "sincos"
  # ... and it tells most at the highest noise (t > 0.9), which the default shift trains
  # on 2% of the time: a shift of sqrt(48 / 8) = 2.45 for a 48-token clip makes it ~10%.
  c.flow.shift_base_tokens = 8
  c.text.width = 128
  c.text.depth = 2
  c.train.row_tokens = 256
  c.train.rows_per_batch = 12  # ~60 clips a step; 2.2 s/step at 16 rows left too few steps.
  c.train.steps = 4500  # ~92 min at ~1.22 s a step with the hooks (huge-page malloc, einsum attention backward).
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
