"""The moving_digits world: real handwritten digits moving, bouncing and hiding.

Pure numpy (plus PIL for the sprite upscale), deterministic from a seed. Digits are
scikit-learn's bundled 8x8 scans (1797 of them, no download), upscaled to sprites,
coloured, moving with constant velocity and bouncing off the frame edges, optionally
passing behind a grey bar. Every scene comes with a caption and the metadata needed
to score generated videos: labels, colours, per-frame positions, visibility and the
frame intervals in which a digit is fully hidden.

Train, validation and test draw from disjoint digit instances (instance % 10).
"""

import functools

import re

import numpy as np
from PIL import Image

from vidsim.errors import UsageError

COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 220, 40),
    "cyan": (40, 220, 230),
    "magenta": (220, 50, 220),
    "white": (240, 240, 240),
    "orange": (245, 140, 30),
}
OCCLUDER_RGB = (128, 128, 128)
SPLITS = ("train", "validation", "test")
# A sprite pixel counts as part of the digit (for visibility) above this alpha.
MASK_THRESHOLD = 0.3


def split_instances(split: str) -> np.ndarray:
  """Indices of the sklearn digits that belong to `split` (disjoint across splits)."""
  if split not in SPLITS:
    raise UsageError(f"moving_digits has splits {SPLITS}, not {split!r}")
  ids = np.arange(len(digit_scans()[1]))
  rest = ids % 10
  if split == "train":
    return ids[rest < 8]
  return ids[rest == (8 if split == "validation" else 9)]


@functools.cache
def digit_scans():
  """scikit-learn's 8x8 digit scans in [0, 1] [1797, 8, 8] and their labels [1797]."""
  from sklearn.datasets import load_digits

  data = load_digits()
  return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@functools.cache
def sprite(instance: int, size: int) -> np.ndarray:
  """Alpha mask [size, size] in [0, 1] of one digit scan, upscaled smoothly."""
  image = Image.fromarray((digit_scans()[0][instance] * 255).astype(np.uint8))
  return np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255.0


PATHS = ("bounce", "inside")


def _start_inside(fraction, velocity, frames, limit):
  """The start at `fraction` of the range of starts whose straight path of `frames`
  frames stays inside [0, limit]; the edge behind the digit when none does."""
  travel = velocity * (frames - 1)
  low, high = max(0.0, -travel), min(float(limit), limit - travel)
  if low > high:
    return 0.0 if velocity > 0 else float(limit)
  return low + fraction * (high - low)


def _bounce(start, velocity, frames, limit):
  """Per-frame positions of a point moving at constant velocity inside [0, limit]."""
  positions, p, v = [], float(start), float(velocity)
  for _ in range(frames):
    positions.append(p)
    p += v
    if p < 0:
      p, v = -p, -v
    elif p > limit:
      p, v = 2 * limit - p, -v
    p = min(max(p, 0.0), float(limit))
  return np.asarray(positions)


def direction_words(vy, vx, speed_slow):
  """The caption's words for a per-frame velocity (y down, x right), e.g. "slowly falls"."""
  speed = np.hypot(vy, vx)
  slowly = "slowly " if speed < speed_slow else ""
  horizontal = "right" if vx > 0 else "left"
  if abs(vx) > 2 * abs(vy):
    return f"{slowly}moves {horizontal}"
  if abs(vy) > 2 * abs(vx):
    return f"{slowly}falls" if vy > 0 else f"{slowly}rises"
  vertical = "down" if vy > 0 else "up"
  return f"{slowly}moves {vertical} and to the {horizontal}"


_OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up", "falls": "rises", "rises": "falls"}


def flip_directions(caption: str) -> str:
  """The caption with every motion reversed ("a red 3 moves left" -> "a red 3 moves right")."""
  return re.sub(r"\b(right|left|up|down|falls|rises)\b", lambda m: _OPPOSITE[m.group(1)], caption)


def change_digits(caption: str) -> str:
  """The caption with every digit d named as (d + 5) % 10."""
  return re.sub(r"\b(\d)\b", lambda m: str((int(m.group(1)) + 5) % 10), caption)


# Captions that each get one attribute wrong: the DiT's held-out loss with them, minus
# with the true caption, says how much it has learnt to use that attribute (vidsim/train/dit_hooks.py).
COUNTERFACTUALS = {"direction": flip_directions, "digit": change_digits}


def _place(y, x, height, width, size):
  """Where a digit sits in a still image, in words."""
  cy, cx = (y + size / 2) / height, (x + size / 2) / width
  row = "top" if cy < 1 / 3 else ("bottom" if cy > 2 / 3 else "middle")
  col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "centre")
  if row == "middle" and col == "centre":
    return "in the centre"
  if row == "middle":
    return f"on the {col}"
  if col == "centre":
    return f"at the {row}"
  return f"at the {row} {col}"


def _join(phrases, word):
  if len(phrases) == 1:
    return phrases[0]
  if len(phrases) == 2:
    return f"{phrases[0]} {word} {phrases[1]}"
  return ", ".join(phrases[:-1]) + f" and {phrases[-1]}"


def render_scene(
    rng: np.random.Generator,
    *,
    split: str,
    frames: int,
    height: int,
    width: int,
    digit_size: int = 12,
    max_digits: int = 2,
    speed=(0.5, 2.5),
    colors=tuple(COLORS),
    occluder_width: int = 0,
    paths: str = "bounce",
    captions: str = "default",
):
  """One scene: (video uint8 [frames, height, width, 3], caption str, metadata dict).

  paths: "bounce" draws each digit's start anywhere, so a fast digit often bounces off
  an edge early and spends most of the clip moving against its caption (which names the
  start velocity); "inside" draws the start so the straight path stays in the frame for
  the whole clip (from the edge behind it when the path is longer than the frame), so
  the caption's direction holds for the whole clip. Both draw the same random numbers.

  captions: the caption style (CAPTION_STYLES, `caption_text`). The styles other than
  "default" draw their choices after everything else, so the video is the same in every style.

  occluder_width > 0 adds a vertical grey bar in the middle that digits pass behind
  (drawn over them); each digit's path is aimed so it is fully hidden at some frame
  when the bar is at least as wide as the sprite.
  """
  if paths not in PATHS:
    raise UsageError(f"moving_digits.paths={paths!r}; valid: {', '.join(PATHS)}")
  if captions not in CAPTION_STYLES:
    raise UsageError(f"moving_digits.captions={captions!r}; valid: {', '.join(CAPTION_STYLES)}")
  if min(height, width) < digit_size:
    raise UsageError(f"moving_digits: frame {height}x{width} is smaller than digit_size={digit_size}")
  unknown = [c for c in colors if c not in COLORS]
  if unknown or not colors:
    raise UsageError(f"moving_digits.colors: unknown {unknown}; valid: {sorted(COLORS)}")
  images, labels = digit_scans()
  pool = split_instances(split)
  num = int(rng.integers(1, max_digits + 1))
  picked_colors = rng.choice(len(colors), size=num, replace=num > len(colors))
  lo, hi = float(speed[0]), float(speed[1])
  ylim, xlim = height - digit_size, width - digit_size
  occluder = None
  if occluder_width > 0:
    x0 = max((width - occluder_width) // 2, 0)
    occluder = dict(y0=0, y1=height, x0=x0, x1=min(x0 + occluder_width, width))

  digits = []
  for d in range(num):
    instance = int(rng.choice(pool))
    speed_d = rng.uniform(lo, hi) if frames > 1 else 0.0
    angle = rng.uniform(0, 2 * np.pi)
    vy, vx = speed_d * np.sin(angle), speed_d * np.cos(angle)
    y0, x0 = rng.uniform(0, ylim), rng.uniform(0, xlim)
    if paths == "inside":
      y0, x0 = _start_inside(y0 / max(ylim, 1), vy, frames, ylim), _start_inside(x0 / max(xlim, 1), vx, frames, xlim)
    if occluder is not None and frames > 2:
      # Horizontal pass behind the bar: centred behind it at frame `hide`, as fast as the
      # frame allows, so it enters visible on one side and comes out on the other.
      hide = int(rng.integers(max(1, frames // 2 - 1), min(frames - 1, frames // 2 + 2)))
      x_hidden = occluder["x0"] + (occluder["x1"] - occluder["x0"] - digit_size) // 2
      sign = 1 if rng.random() < 0.5 else -1
      before, after = (x_hidden, xlim - x_hidden) if sign > 0 else (xlim - x_hidden, x_hidden)
      vx = sign * min(before / hide, after / (frames - 1 - hide))
      vy = vy * 0.2
      x0 = x_hidden - vx * hide
    ys = np.rint(_bounce(y0, vy, frames, ylim)).astype(int)
    xs = np.rint(_bounce(x0, vx, frames, xlim)).astype(int)
    name = colors[int(picked_colors[d])]
    digits.append(dict(label=int(labels[instance]), instance=instance, color=name, rgb=list(COLORS[name]),
                       velocity=[float(vy), float(vx)], positions=np.stack([ys, xs], 1).tolist()))

  video = np.zeros((frames, height, width, 3), np.float32)
  for digit in digits:
    alpha = sprite(digit["instance"], digit_size)[..., None]
    rgb = np.asarray(digit["rgb"], np.float32)
    for t, (y, x) in enumerate(digit["positions"]):
      patch = video[t, y : y + digit_size, x : x + digit_size]
      patch[:] = patch * (1 - alpha) + alpha * rgb
  if occluder is not None:
    video[:, occluder["y0"] : occluder["y1"], occluder["x0"] : occluder["x1"]] = OCCLUDER_RGB

  for digit in digits:
    digit.update(_visibility(digit, digit_size, height, width, occluder))
  caption = _caption(digits, frames, height, width, digit_size, speed_slow=lo + 0.25 * (hi - lo))
  if captions != "default":
    caption = caption_text(rng, captions, digits, frames, height, width, digit_size, (lo, hi), occluder is not None)
  metadata = dict(frames=frames, height=height, width=width, digit_size=digit_size, occluder=occluder, digits=digits)
  return np.clip(np.rint(video), 0, 255).astype(np.uint8), caption, metadata


def _visibility(digit, size, height, width, occluder):
  """Fraction of the digit's mask not covered by the occluder, per frame, and hidden intervals."""
  mask = sprite(digit["instance"], size) > MASK_THRESHOLD
  total = max(int(mask.sum()), 1)
  fractions = []
  for y, x in digit["positions"]:
    covered = np.zeros((height, width), bool)
    if occluder is not None:
      covered[occluder["y0"] : occluder["y1"], occluder["x0"] : occluder["x1"]] = True
    hidden = covered[y : y + size, x : x + size] & mask
    fractions.append(round(1.0 - float(hidden.sum()) / total, 4))
  intervals, start = [], None
  for t, f in enumerate(fractions + [1.0]):
    if f == 0.0 and start is None:
      start = t
    elif f > 0.0 and start is not None:
      intervals.append([start, t])  # [start, end): frames where the digit is fully hidden.
      start = None
  return dict(visible_fraction=fractions, occluded_intervals=intervals)


def _caption(digits, frames, height, width, size, speed_slow):
  phrases = []
  for digit in digits:
    article = "an" if digit["color"][0] in "aeiou" else "a"
    subject = f"{article} {digit['color']} {digit['label']}"
    if frames == 1:
      y, x = digit["positions"][0]
      phrases.append(f"{subject} {_place(y, x, height, width, size)}")
      continue
    phrase = f"{subject} {direction_words(*digit['velocity'], speed_slow)}"
    if digit["occluded_intervals"]:
      phrase += " and passes behind the grey bar"
    phrases.append(phrase)
  return _join(phrases, "and" if frames == 1 else "while")


# ------------------------------------------------------------------ captions that teach

CAPTION_STYLES = ("default", "short", "descriptive", "mixed")
# Paraphrases of one digit's short phrase: {a} article, {color}, {digit}, {motion} ("moves right").
_SHORT = (
    "{a} {color} {digit} {motion}",
    "{a} {color} digit {digit} {motion}",
    "the {color} number {digit} {motion}",
    "{a} {digit} in {color} {motion}",
)
_SHORT_STILL = ("{a} {color} {digit} {place}", "{a} {color} digit {digit} {place}", "the {color} number {digit} {place}")
_JOIN = (" while ", " and ", "; ")
# Descriptive: where it starts, where it goes and how fast, and what it passes.
_DESCRIPTIVE = (
    "{a} {color} handwritten {digit} starts {start} and {motion} {speed}",
    "starting {start}, {a} {color} handwritten {digit} {motion} {speed}",
    "the digit {digit}, drawn in {color}, begins {start} and {motion} {speed}",
)
_OPENINGS = ("{count} on a black background: ", "a black scene with {count}: ")
_COUNTS = ("one handwritten digit", "two handwritten digits", "three handwritten digits", "four handwritten digits")
_BAR = ("a grey bar stands in the middle of the frame. ", "a vertical grey bar covers the middle. ")
_STILL = ("a still image of {a} {color} handwritten {digit} {place} on a black background",
          "{a} {color} {digit} sits {place} on a black background")


def _speed_words(speed, speed_range):
  low, high = speed_range
  third = (high - low) / 3
  if speed < low + third:
    return "slowly"
  return "at a steady pace" if speed < low + 2 * third else "quickly"


def caption_text(rng, style, digits, frames, height, width, size, speed_range, occluder):
  """A caption of `style` (CAPTION_STYLES, not "default") for the scene's digits, its wording
  drawn from rng. short: the default's facts in paraphrase ("the red number 3 moves right");
  descriptive: colour, digit, start position, direction, speed, the grey bar and every other
  digit ("two handwritten digits on a black background: a red handwritten 3 starts at the top
  left and moves right quickly, passing behind the grey bar; ...")."""
  if style == "mixed":
    style = ("short", "descriptive")[int(rng.integers(2))]
  pick = lambda options: options[int(rng.integers(len(options)))]
  phrases = []
  for digit in digits:
    words = dict(a="an" if digit["color"][0] in "aeiou" else "a", color=digit["color"], digit=digit["label"])
    y, x = digit["positions"][0]
    place = _place(y, x, height, width, size)
    if frames == 1:
      phrases.append(pick(_SHORT_STILL if style == "short" else _STILL).format(place=place, **words))
      continue
    vy, vx = digit["velocity"]
    if style == "short":
      slow = speed_range[0] + 0.25 * (speed_range[1] - speed_range[0])  # As the default captions.
      phrases.append(pick(_SHORT).format(motion=direction_words(vy, vx, slow), **words))
      continue
    phrase = pick(_DESCRIPTIVE).format(start=place, motion=direction_words(vy, vx, 0.0),
                                       speed=_speed_words(float(np.hypot(vy, vx)), speed_range), **words)
    if digit["occluded_intervals"]:
      phrase += pick((", passing behind the grey bar", ", hiding behind the grey bar for a moment",
                      " and disappears behind the grey bar before coming out on the other side"))
    phrases.append(phrase)
  if style == "short":
    return pick(_JOIN).join(phrases)
  count = _COUNTS[len(digits) - 1] if len(digits) <= len(_COUNTS) else f"{len(digits)} handwritten digits"
  opening = pick(_OPENINGS).format(count=count) if frames > 1 or len(digits) > 1 else ""
  return (pick(_BAR) if occluder else "") + opening + "; ".join(phrases)
