"""Probe cases: for each world probe, its inputs and the real clip that answers them.

A case is one rendered validation scene of the moving_digits world (one digit, the
config's speeds, colours and paths) cut into what a task is given (a first frame, a
source clip, two clips to connect) and the real clip that continues, connects or edits
it. The probes generate from the inputs; scored on the real clips instead, the same
criteria give the ceiling (what the frame reader makes of the truth), and scored on
the real clip of the *next* case (realistic, but not an answer to these inputs) they
give the measured chance level.
"""

import dataclasses

import numpy as np

from vidsim import sizes, tasks
from vidsim.data import moving_digits

# One rng stream per probe, so adding a probe does not change another's scenes.
_STREAMS = {"t2v": 1, "permanence": 2, "i2v": 3, "extend-forward": 4, "extend-backward": 5, "loop": 6,
            "connect": 7, "edit": 8, "long-extension": 9}


@dataclasses.dataclass
class Case:
  """prompt: the caption of the scene (edit: recoloured); real: uint8 [T, H, W, 3], the
  true output; inputs: generate()'s size and input arguments; info: what the probe's
  criterion reads besides the output (source clips, the new colour)."""

  prompt: str
  real: np.ndarray
  inputs: dict
  info: dict = dataclasses.field(default_factory=dict)


def scene(config, probe: str, index: int, frames: int, height: int, width: int, occluder_width=None):
  """(video uint8, caption) of one-digit validation scene `index` of a probe's stream;
  with the grey bar when the config trains on the occlusion preset (or occluder_width > 0)."""
  md = config.moving_digits
  if occluder_width is None:
    occluder_width = md.occluder_width if config.data.builder_config == "occlusion" else 0
  rng = np.random.default_rng([int(config.seed), _STREAMS[probe], index])
  video, caption, _ = moving_digits.render_scene(
      rng, split=config.data.eval_split, frames=frames, height=height, width=width, digit_size=md.digit_size,
      max_digits=1, speed=tuple(md.speed), colors=tuple(md.colors), occluder_width=occluder_width, paths=md.paths)
  return video, caption


def longer(frames: int) -> int:
  """An extension's total length: the source and as much again (valid whenever `frames` is)."""
  return 1 + 2 * (frames - 1)


def long_length(frames: int, factor: int = 4) -> int:
  """The shortest 1 + k * (frames - 1) >= factor * frames: whole windows sharing a frame."""
  return 1 + int(np.ceil((factor * frames - 1) / (frames - 1))) * (frames - 1)


def recolour(video, old: str, new: str):
  """The clip with its digit drawn in colour `new` instead of `old`, as the renderer
  would draw it: a digit is alpha x its colour over black, under the grey bar."""
  old_rgb, new_rgb = (np.asarray(moving_digits.COLORS[c], np.float32) for c in (old, new))
  channel = int(np.argmax(old_rgb))
  alpha = np.asarray(video, np.float32)[..., channel : channel + 1] / old_rgb[channel]
  recoloured = np.clip(np.rint(alpha * new_rgb), 0, 255).astype(np.uint8)
  bar = np.all(np.asarray(video) == np.asarray(moving_digits.OCCLUDER_RGB, np.uint8), axis=-1, keepdims=True)
  return np.where(bar, video, recoloured)  # The grey bar is drawn over the digit: it stays grey.


def next_color(color: str, colors) -> str:
  colors = list(colors)
  return colors[(colors.index(color) + 1) % len(colors)]


def caption_color(caption: str, colors) -> str:
  """The colour word of a one-digit caption."""
  return next(c for c in colors if f" {c} " in f" {caption} ")


def make_case(config, probe: str, index: int) -> Case:
  """Case `index` of a probe (not t2v, whose cases are prompts: vidsim/digit_score.py)."""
  s, md = config.sample, config.moving_digits
  t, h, w = s.frames, s.height, s.width
  size = dict(height=h, width=w)
  if probe == "permanence":
    frames, height, width = (int(v) for v in md.occlusion_shape)
    video, caption = scene(config, probe, index, frames, height, width, occluder_width=md.occluder_width)
    return Case(caption, video, dict(frames=frames, height=height, width=width))
  if probe == "i2v":
    video, caption = scene(config, probe, index, t, h, w)
    return Case(caption, video, dict(frames=t, image=video[0], **size), dict(image=video[0]))
  if probe in ("extend-forward", "extend-backward"):
    total = longer(t)
    video, caption = scene(config, probe, index, total, h, w)
    source = video[:t] if probe == "extend-forward" else video[total - t :]
    return Case(caption, video, dict(frames=total, video=source, **size), dict(source=source))
  if probe == "long-extension":
    total = long_length(t)
    video, caption = scene(config, probe, index, total, h, w, occluder_width=0)
    if config.data.builder_config == "occlusion":
      # The renderer aims one pass behind the bar at mid-clip, slowing a long clip's digit
      # to a crawl; a free path with the bar drawn over it (as the renderer draws it) is as true.
      video = video.copy()
      x0 = max((w - md.occluder_width) // 2, 0)
      video[:, :, x0 : x0 + md.occluder_width] = moving_digits.OCCLUDER_RGB
    return Case(caption, video, dict(frames=total, video=video[:t], **size), dict(source=video[:t]))
  if probe == "loop":
    video, caption = scene(config, probe, index, t, h, w)
    # A clip played forward then back loops seamlessly: the truth a loop is held to.
    return Case(caption, np.concatenate([video, video[-2:0:-1]]), dict(frames=t, **size), dict(plain=video))
  if probe == "connect":
    window = s.window_frames or t
    video, caption = scene(config, probe, index, 2 * t + window - 2, h, w)
    first, second = video[:t], video[t + window - 2 :]
    # The window holds `overlap` latent frames of each clip; at its start they decode to
    # 1 + (overlap - 1) * ct pixel frames (the causal VAE's first latent is one frame).
    ct = config.vae.temporal_compression
    overlap = tasks.resolve_overlap(sizes.latent_frames(config, window), s.overlap_latent_frames, ends=2)
    return Case(caption, video[t - 1 : t - 1 + window], dict(frames=window, video=first, video2=second, **size),
                dict(first=first, second=second, given_frames=1 + (overlap - 1) * ct))
  if probe == "edit":
    video, caption = scene(config, probe, index, t, h, w)
    old = caption_color(caption, md.colors)
    new = next_color(old, md.colors)
    prompt = f" {caption} ".replace(f" {old} ", f" {new} ", 1).strip()
    prompt = ("an " if new[0] in "aeiou" else "a ") + prompt.split(" ", 1)[1]
    return Case(prompt, recolour(video, old, new), dict(frames=t, video=video, strength=s.edit_strength, **size),
                dict(source=video, new_color=new))
  raise ValueError(f"no cases for probe {probe!r}")
