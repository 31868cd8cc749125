"""Probes of generated video on the embedded world, scored against their prompts.

`score_probe` makes text-to-video for one-digit probe prompts and reads digit, colour
and direction back with vidsim/digit_score.py (which reads only the frames).
"""

from vidsim import digit_score
from vidsim.sample.engine import generate


def score_probe(config, engine, count: int) -> dict:
  """t2v for `count` one-digit probe prompts (digit_score.probe_prompts) at the sample
  size, scored against their prompts; the result also holds the videos and prompts."""
  s = config.sample
  prompts = digit_score.probe_prompts(count, config.moving_digits.colors)
  generation = generate(engine, "t2v", prompts, frames=s.frames, height=s.height, width=s.width,
                        seed=config.seed + 1, steps=s.steps, sampler=s.sampler, guidance=s.guidance)
  result = digit_score.score(generation.videos, prompts, config.moving_digits.digit_size)
  return dict(result, videos=generation.videos, prompts=prompts)
