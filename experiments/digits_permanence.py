"""Object permanence on the embedded world: every clip has a digit passing behind a grey bar.

Trains on the `occlusion` preset (13x32x48 clips, a 14 px bar in the middle, captions
"a red 3 moves right and passes behind the grey bar"), one digit a scene with paths
that stay inside the frame, so every probe of `vidsim eval` (docs/eval.md) scores the
model: text to video, identity consistency, permanence behind the bar, and every
conditioned task, all at the clip size 13x32x48.

Command:
  vidsim data prepare --config experiments/digits_permanence.py
  vidsim train-vae --config experiments/digits_permanence.py --workdir runs/digits_permanence
  vidsim encode    --config experiments/digits_permanence.py --workdir runs/digits_permanence
  vidsim train     --config experiments/digits_permanence.py --workdir runs/digits_permanence
  vidsim eval      --config experiments/digits_permanence.py --workdir runs/digits_permanence
Expected runtime: about 1 h 30 min from an empty workdir on 2 cores of an AMD EPYC (Zen 5,
AVX-512, matmul rate ~450 GFLOP/s): data 29 s, VAE 4,000 steps ~20 min alone (3.5
steps/s; the measured run took 59 min because a test suite ran beside it), latent cache
103 s, DiT 4,000 steps of 16 rows x 192 tokens 62 min (0.79 s a step, the probes every
1,000 steps included), `vidsim eval` 143 s.
Result (measured, step 4,000, EMA, Euler 30 steps, guidance 4, 20 validation cases a
probe; W/eval/probes.json): VAE 38.3 dB PSNR, SSIM 0.989 over the validation split;
held-out flow loss 0.134. Probe scores (ceiling): t2v 0.30 (0.84; digit 0.35 of 0.86,
colour 1.0, direction 0.80 of 0.98), identity 0.71 (0.96), permanence 0.40 (0.94; the
digit kept 0.45, colour 0.95, position 0.85), i2v 0.45 (0.94), extend-forward 0.10
(0.72), extend-backward 0.05 (0.73), loop 0.80 (0.99), connect 0.45 (0.97), edit 0.85
(0.97; SDEdit strength 0.4, below), long-extension 0.00 (0.40). The loop and the edit
meet their targets (>= 80% of the ceiling: 81% and 88%); the others do not (identity
and direction >= 90% of their ceilings, permanence >= 85%, every conditioned task
>= 80%): direction is at 82% of its ceiling, the rest far below. At step 4,000 it was
still learning: from step 3,000 to 4,000 t2v rose 0.10 -> 0.30, permanence 0.30 ->
0.40, i2v 0.30 -> 0.45, and the held-out direction-word gain at t = 0.9 0.023 -> 0.167
(edit at strength 0.6 0.55 -> 0.60, inside training); the digit's shape is what it
lacks most (digit reads 0.35 in t2v, 0.45 kept behind the bar, where position is
already 0.85). docs/eval.md has the curve. Twice the DiT steps (--config.train.steps=8000;
2 h 8 min, 0.87 s a step, partly beside other jobs) did not close the gap: held-out loss
0.134 -> 0.118, i2v 0.45 -> 0.75 and edit (strength 0.6) 0.60 -> 0.85, but t2v stayed at 0.30,
permanence fell to 0.20 and the extensions to 0; the digit word still barely moves the
loss (docs/eval.md, "A longer schedule").
"""

import os

from vidsim.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_vae.py"))
  c.data.builder_config = "occlusion"
  c.data.buckets = ((13, 32, 48),)
  c.vae_train.steps = 4000  # Clips of 13x32x48 cost about twice the mixed world's: 4,000 steps fit the budget.
  c.moving_digits.train_examples = 20000
  c.moving_digits.eval_examples = 200
  c.moving_digits.occlusion_shape = (13, 32, 48)
  c.moving_digits.occluder_width = 14  # Wider than the 12 px digit: it hides whole.
  c.moving_digits.max_digits = 1  # One digit a scene: the probes read one digit.
  c.moving_digits.paths = "inside"  # Captions' directions hold for the whole clip.
  c.dit.width = 256
  c.dit.depth = 6
  c.dit.heads = 4
  c.dit.mlp = "swiglu"
  c.dit.attention_impl = "einsum"
  c.dit.position_embedding = "sincos"  # Where the bar is, and which side the digit starts on.
  c.flow.shift_base_tokens = 16
  # Every clip is 96 tokens: rows of two fill 192 exactly, and aligned in two blocks they
  # take the blocked path (dit.segment_blocks): 0.58 s a step against 1.21 s for 12 rows
  # of 256 on the general path (docs/benchmarks.md, "DiT"), where a quarter is padding.
  c.train.row_tokens = 192
  c.dit.segment_blocks = 2
  c.train.rows_per_batch = 16  # 32 clips a step.
  c.train.steps = 4000
  c.train.learning_rate = 8e-4
  c.train.warmup_steps = 100
  c.train.log_every = 20
  c.train.checkpoint_every = 250
  c.train.sample_every = 500
  c.train.eval_every = 500
  c.train.probe_every = 1000  # The world probes inside training (metrics.jsonl: probe_<name>).
  c.train.sample_prompts = ("a red 3 moves right and passes behind the grey bar",
                            "a blue 7 moves left and passes behind the grey bar")
  c.sample.frames, c.sample.height, c.sample.width = 13, 32, 48
  c.sample.window_frames = 13
  c.sample.steps = 30
  # A colour edit needs little noise: at SDEdit strength 0.6 the digit came back as another
  # digit in 8 of 20 edit probes; at 0.4 in 3 (and 4 of 20 on the cases of --config.seed=5),
  # the new colour in all of them (docs/eval.md). A change of digit wants more (--strength).
  c.sample.edit_strength = 0.4
  c.eval.probe_count = 20
  return c
