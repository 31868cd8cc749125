"""Scores videos of the moving_digits world against their prompts: which digit, which
colour, which way it moves. How `experiments/digits_quality.py` and the demo report
say how good samples are with numbers, not by eye.

Only one-digit prompts are scored ("a red 3 moves right", "a blue 7 slowly falls",
"a green 0 moves up and to the left"): with two digits, which blob is which is
ambiguous. Per frame, the digit is the bright pixels (max over RGB); its position is
their intensity-weighted centroid; its crop (digit_size around that centroid,
shrunk to 8x8) goes to a linear classifier trained on the train-split digit scans
rendered and cropped the same way; the clip's digit is the majority over frames.
The direction is that of the centroid's mean step along each axis until that axis
first reverses (a bounce off an edge), named by the caption's own rule.

`tests/test_digit_score.py` checks the scorer on rendered validation scenes, whose
captions are true: it must get most of them right before it may judge samples.
"""

import functools
import re

import numpy as np
from PIL import Image

from vidsim.data import moving_digits

_PROMPT = re.compile(
    r"^an? (?P<color>[a-z]+) (?P<digit>\d) (?:slowly )?"
    r"(?P<direction>moves (?:up|down) and to the (?:left|right)|moves (?:left|right)|falls|rises)"
    r"(?: and passes behind the grey bar)?$"  # Occlusion scenes: the bar does not change what is scored.
)
_BRIGHT = 0.3  # A pixel belongs to a digit above this intensity (moving_digits.MASK_THRESHOLD).
_MIN_PIXELS = 4  # Fewer bright pixels than this: no digit in the frame.


def parse_prompt(prompt: str):
  """dict(color, digit, direction) of a one-digit video prompt, else None."""
  match = _PROMPT.match(prompt.strip())
  if match is None:
    return None
  return dict(color=match["color"], digit=int(match["digit"]), direction=match["direction"])


def _direction(step_y: float, step_x: float) -> str:
  """The caption's direction words for a per-frame step (moving_digits.direction_words without 'slowly')."""
  return moving_digits.direction_words(step_y, step_x, speed_slow=0.0)


def _crop(intensity: np.ndarray, size: int):
  """(8x8 features, centroid) of the digit in one frame's intensity [H, W], or None."""
  weights = np.where(intensity > _BRIGHT, intensity, 0.0)
  if np.count_nonzero(weights) < _MIN_PIXELS:
    return None
  ys, xs = np.indices(weights.shape)
  cy, cx = (weights * ys).sum() / weights.sum(), (weights * xs).sum() / weights.sum()
  top, left = int(round(cy - size / 2)), int(round(cx - size / 2))
  padded = np.pad(intensity, size)  # A digit at the edge still gets a full window.
  window = padded[top + size : top + 2 * size, left + size : left + 2 * size]
  small = Image.fromarray((np.clip(window, 0, 1) * 255).astype(np.uint8)).resize((8, 8), Image.BOX)
  return np.asarray(small, np.float32).reshape(-1) / 255.0, (cy, cx)


@functools.cache
def _classifier(size: int):
  """Logistic regression on train-split scans placed at random sub-pixel offsets and
  cropped like the frames (deterministic)."""
  from sklearn.linear_model import LogisticRegression

  images, labels = moving_digits.digit_scans()
  rng = np.random.default_rng(0)
  features, targets = [], []
  for instance in moving_digits.split_instances("train"):
    sprite = moving_digits.sprite(int(instance), size)
    for _ in range(3):
      canvas = np.zeros((3 * size, 3 * size), np.float32)
      y, x = rng.integers(size - 2, size + 3, size=2)
      canvas[y : y + size, x : x + size] = sprite * rng.uniform(0.6, 1.0)
      crop = _crop(canvas, size)
      if crop is not None:
        features.append(crop[0])
        targets.append(labels[instance])
  return LogisticRegression(max_iter=2000, C=1.0).fit(np.stack(features), np.asarray(targets))


def _nearest_color(rgb: np.ndarray) -> str:
  """The palette colour closest in chromaticity (brightness varies with the stroke)."""
  unit = lambda v: np.asarray(v, np.float32) / max(float(np.linalg.norm(v)), 1e-6)
  return min(moving_digits.COLORS, key=lambda name: float(np.linalg.norm(unit(rgb) - unit(moving_digits.COLORS[name]))))


def describe(video: np.ndarray, digit_size: int) -> dict:
  """What a one-digit clip uint8 [T, H, W, 3] shows: dict(digit, color, direction,
  frames_with_digit). Fields are None where nothing bright is found."""
  frames = np.asarray(video, np.float32) / 255.0
  intensity = np.where(occluder_mask(video), 0.0, frames.max(axis=-1))  # The grey bar is not a digit.
  crops = [_crop(frame, digit_size) for frame in intensity]
  found = [(t, c) for t, c in enumerate(crops) if c is not None]
  result = dict(digit=None, color=None, direction=None, frames_with_digit=len(found))
  if not found:
    return result
  votes = _classifier(digit_size).predict(np.stack([c[0] for _, c in found]))
  result["digit"] = int(np.bincount(votes, minlength=10).argmax())
  bright = intensity > 0.5
  if bright.any():
    result["color"] = _nearest_color(frames[bright].mean(axis=0) * 255)
  if len(found) >= 2:
    result["direction"] = direction_of([c[1] for _, c in found], [t for t, _ in found])
  return result


def occluder_mask(video: np.ndarray, tolerance: int = 24, share: float = 0.75) -> np.ndarray:
  """bool [H, W]: pixels that show the world's grey bar (moving_digits.OCCLUDER_RGB, within
  `tolerance` per channel) in at least `share` of the frames. The bar is static and drawn
  over the digits, so it is found from the frames alone."""
  close = np.all(np.abs(np.asarray(video, np.int16) - np.asarray(moving_digits.OCCLUDER_RGB, np.int16)) <= tolerance,
                 axis=-1)
  return close.mean(axis=0) >= share


def track(video: np.ndarray, digit_size: int) -> list:
  """Per frame of a one-digit clip uint8 [T, H, W, 3]: None where no digit is seen, else
  dict(digit, color, centroid (y, x), pixels (bright pixel count), box (y0, x0, y1, x1) of
  the bright pixels, inclusive). The grey bar (occluder_mask) is not part of any digit."""
  frames = np.asarray(video, np.float32) / 255.0
  intensity = np.where(occluder_mask(video), 0.0, frames.max(axis=-1))
  crops = [_crop(frame, digit_size) for frame in intensity]
  found = [t for t, c in enumerate(crops) if c is not None]
  reads = _classifier(digit_size).predict(np.stack([crops[t][0] for t in found])) if found else []
  result = [None] * len(crops)
  for t, digit in zip(found, reads):
    ys, xs = np.nonzero(intensity[t] > _BRIGHT)
    bright = intensity[t] > 0.5
    color = _nearest_color(frames[t][bright].mean(axis=0) * 255) if bright.any() else None
    result[t] = dict(digit=int(digit), color=color, centroid=crops[t][1], pixels=int(len(ys)),
                     box=(int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())))
  return result


def majority(values):
  """The most common of `values` that is not None (ties: the smallest), else None."""
  values = [v for v in values if v is not None]
  if not values:
    return None
  names = sorted(set(values), key=str)
  return max(names, key=values.count)


def direction_of(centroids, times=None):
  """The caption's direction words for a track of centroids [(y, x)] (digits bounce: the
  velocity before each axis first reverses), or None for fewer than two points."""
  if len(centroids) < 2:
    return None
  times = np.arange(len(centroids), dtype=np.float32) if times is None else np.asarray(times, np.float32)
  steps = np.diff(np.asarray(centroids, np.float32), axis=0) / np.diff(times)[:, None]
  return _direction(_initial_velocity(steps[:, 0]), _initial_velocity(steps[:, 1]))


def _initial_velocity(steps: np.ndarray) -> float:
  """Mean step along one axis before its first reversal: digits bounce off the edges,
  and the caption names the velocity they start with."""
  moving = np.flatnonzero(np.abs(steps) > 0.25)
  if not len(moving):
    return 0.0
  sign = np.sign(steps[moving[0]])
  reversed_ = np.flatnonzero(steps * sign < -0.25)
  return float(np.mean(steps[: reversed_[0]] if len(reversed_) else steps))


def score(videos, prompts, digit_size: int) -> dict:
  """Agreement of clips with their one-digit prompts: fraction right per attribute over
  the scored clips (prompts that parse), and the per-clip details."""
  rows = []
  for video, prompt in zip(videos, prompts):
    wanted = parse_prompt(prompt)
    if wanted is None:
      continue
    seen = describe(video, digit_size)
    rows.append(dict(prompt=prompt, **{f"seen_{k}": v for k, v in seen.items()},
                     **{f"{k}_ok": seen[k] == wanted[k] for k in ("digit", "color", "direction")}))
  fraction = lambda key: float(np.mean([r[key] for r in rows])) if rows else float("nan")
  return dict(clips=len(rows), digit=fraction("digit_ok"), color=fraction("color_ok"),
              direction=fraction("direction_ok"), rows=rows)


PROBE_DIRECTIONS = ("moves right", "moves left", "falls", "rises")


def probe_prompts(count: int, colors) -> list:
  """`count` one-digit prompts covering digits, directions and colours in turn
  (digit i % 10, direction (i // 10) % 4, colour i % len(colors)): the fixed set the
  training hook and the demo score."""
  colors = list(colors)
  prompts = []
  for i in range(count):
    color = colors[i % len(colors)]
    article = "an" if color[0] in "aeiou" else "a"
    prompts.append(f"{article} {color} {i % 10} {PROBE_DIRECTIONS[(i // 10) % len(PROBE_DIRECTIONS)]}")
  return prompts


SCORE_KEYS = ("clips", "digit", "color", "direction")


def headline(result: dict) -> dict:
  """The figures of a `score` result without its per-clip rows."""
  return {k: result[k] for k in SCORE_KEYS}


def summary(result: dict) -> str:
  """One line: how many clips show the prompt's digit, colour and direction."""
  n = result["clips"]
  count = lambda key: int(round(result[key] * n))
  return (f"{count('digit')}/{n} show the prompt's digit, {count('color')}/{n} its colour, "
          f"{count('direction')}/{n} its direction")


def reference(frames: int, height: int, width: int, md, count: int = 100) -> dict:
  """The scorer on `count` rendered one-digit validation scenes of this size, whose
  captions are true: the ceiling a sample's agreement is read against. md: the
  config's moving_digits section."""
  videos, captions = [], []
  for i in range(count):
    video, caption, _ = moving_digits.render_scene(
        np.random.default_rng(10_000 + i), split="validation", frames=frames, height=height, width=width,
        digit_size=md.digit_size, max_digits=1, speed=tuple(md.speed), colors=tuple(md.colors), paths=md.paths)
    videos.append(video)
    captions.append(caption)
  return score(videos, captions, md.digit_size)
