"""What each world probe checks in a clip, reading only its frames (vidsim/digit_score.py).

Every function takes uint8 clips [T, H, W, 3] (and the world's digit size) and returns
one row: dict(passed=bool, <criterion>=bool ..., <details>). No render metadata is
read, so the same criteria score any model's output of this world, and real clips of
the world (the ceilings, vidsim/eval/cases.py).

Positions are the centroids of the bright pixels (the grey bar's pixels, found from the
frames, are not bright); a frame is *clear* when a digit is seen there whole: at least
CLEAR_SHARE of the bright pixels of the clip's clearest frame. Position tolerances are
`position_tolerance(digit_size)` pixels.
"""

import numpy as np

from vidsim import digit_score

# A frame shows its digit whole with at least this share of the bright pixels of the clip's
# clearest frame (a digit half behind the bar has about half; the world's sprites do not change size).
CLEAR_SHARE = 0.8
# Motion criteria: speed ratios inside [1 / SPEED_RATIO, SPEED_RATIO] count as the same speed.
SPEED_RATIO = 1.5
# Loop: the jump from the last frame to the first may be this many typical steps (plus 1 px of rounding).
LOOP_JUMP_STEPS = 1.5
# ... and its digit must move: a mean step of at least this many pixels (the world's slowest digits move 0.5 px a frame).
LOOP_MIN_STEP = 0.25


def position_tolerance(digit_size: int) -> float:
  """Pixels a position may be off and still count: a quarter of the digit, at least 2 px."""
  return max(2.0, 0.25 * digit_size)


def permanence_tolerance(digit_size: int) -> float:
  """Pixels a position extrapolated across the bar may be off: half the digit (a straight
  line fitted to a few integer positions, extrapolated over the hidden frames, is off by
  up to 4.2 px on true 13-frame scenes with 12 px digits)."""
  return 0.5 * digit_size


def _clear(reads):
  """bool [T]: frames whose digit is seen whole (see the module docstring)."""
  most = max((r["pixels"] for r in reads if r is not None), default=0)
  return np.asarray([r is not None and r["pixels"] >= CLEAR_SHARE * most for r in reads], bool)


def _summary(reads, frames) -> dict:
  """Majority digit and colour, direction words, and per-axis speed over the given frames' reads."""
  seen = [(t, reads[t]) for t in frames if reads[t] is not None]
  centroids = [r["centroid"] for _, r in seen]
  times = [t for t, _ in seen]
  steps = np.diff(np.asarray(centroids, np.float32), axis=0) / np.diff(times)[:, None] if len(seen) >= 2 else None
  return dict(
      digit=digit_score.majority([r["digit"] for _, r in seen]),
      color=digit_score.majority([r["color"] for _, r in seen]),
      direction=digit_score.direction_of(centroids, times) if len(seen) >= 2 else None,
      abs_velocity=None if steps is None else np.abs(steps).mean(axis=0).tolist(),  # (|vy|, |vx|) px a frame.
      seen=len(seen),
  )


def _axis_class(abs_velocity) -> str:
  """horizontal / vertical / diagonal by the captions' 2x rule: what a bounce off an edge keeps."""
  vy, vx = abs_velocity
  if vx > 2 * vy:
    return "horizontal"
  if vy > 2 * vx:
    return "vertical"
  return "diagonal"


def _same_motion(a, b) -> bool:
  """Same axis class and a speed within SPEED_RATIO (digits bounce: the signs may flip, the speeds stay)."""
  if a is None or b is None:
    return False
  speed_a, speed_b = float(np.hypot(*a)), float(np.hypot(*b))
  if min(speed_a, speed_b) < 0.25:  # Standing still: the same only if both are.
    return max(speed_a, speed_b) < 0.25
  return _axis_class(a) == _axis_class(b) and 1 / SPEED_RATIO <= speed_a / speed_b <= SPEED_RATIO


def _distance(a, b) -> float:
  return float(np.hypot(a[0] - b[0], a[1] - b[1]))


# ------------------------------------------------------------------ text to video


def identity_changes(video, digit_size: int):
  """(changes, pairs): how often the digit read in one clear frame differs from the next clear frame's."""
  reads = digit_score.track(video, digit_size)
  clear = _clear(reads)
  pairs = [(t, t + 1) for t in range(len(reads) - 1) if clear[t] and clear[t + 1]]
  changes = sum(reads[a]["digit"] != reads[b]["digit"] for a, b in pairs)
  return changes, len(pairs)


# ------------------------------------------------------------------ object permanence


def permanence(video, digit_size: int) -> dict:
  """The digit that comes out from behind the grey bar is the one that went in: the same
  digit and colour (majority over the clear frames on each side) where its motion before
  the bar says it is (a straight-line fit of the clear positions before, extrapolated to
  the first clear frame after, within permanence_tolerance)."""
  row = dict(passed=False, digit_kept=False, color_kept=False, position_kept=False, reason="")
  mask = digit_score.occluder_mask(video)
  if not mask.any():
    return dict(row, reason="no grey bar in the frames")
  reads = digit_score.track(video, digit_size)
  clear = _clear(reads)
  hidden = np.asarray([r is None for r in reads])
  first_clear = np.flatnonzero(clear)
  if not len(first_clear):
    return dict(row, reason="no clear digit")
  after_start = np.flatnonzero(hidden & (np.arange(len(reads)) > first_clear[0]))
  if not len(after_start):
    return dict(row, reason="the digit is never fully hidden")
  went_in = after_start[0]
  came_out = np.flatnonzero(~hidden & (np.arange(len(reads)) > went_in))
  before = [t for t in np.flatnonzero(clear) if t < went_in]
  after = [t for t in np.flatnonzero(clear) if len(came_out) and t >= came_out[0]]
  if len(before) < 2 or not after:
    return dict(row, reason=f"{len(before)} clear frames before it hides, {len(after)} after it comes out")
  a, b = _summary(reads, before), _summary(reads, after)
  times = np.asarray(before, np.float32)
  positions = np.asarray([reads[t]["centroid"] for t in before], np.float32)
  fit = np.polyfit(times, positions, 1)  # [2 (slope, offset), 2 (y, x)]
  predicted = fit[0] * after[0] + fit[1]
  error = _distance(predicted, reads[after[0]]["centroid"])
  row.update(digit_kept=a["digit"] == b["digit"], color_kept=a["color"] == b["color"],
             position_kept=error <= permanence_tolerance(digit_size), position_error_px=round(error, 2),
             went_in=int(went_in), came_out=int(after[0]), digit_before=a["digit"], digit_after=b["digit"],
             color_before=a["color"], color_after=b["color"])
  row["passed"] = bool(row["digit_kept"] and row["color_kept"] and row["position_kept"])
  return row


# ------------------------------------------------------------------ conditioned tasks


def image_to_video(image, output, digit_size: int) -> dict:
  """The given frame's digit and colour persist: the majority over the generated frames
  (all but the first) equals what the reader sees in the image."""
  given = digit_score.track(np.asarray(image)[None], digit_size)[0]
  reads = digit_score.track(output, digit_size)
  made = _summary(reads, range(1, len(reads)))
  digit_kept = given is not None and made["digit"] == given["digit"]
  color_kept = given is not None and made["color"] == given["color"]
  return dict(passed=bool(digit_kept and color_kept), digit_kept=bool(digit_kept), color_kept=bool(color_kept),
              given_digit=given and given["digit"], made_digit=made["digit"])


def extension(source, output, digit_size: int, forward: bool) -> dict:
  """Digit, colour and direction continue across the window boundary: the new frames
  (with the boundary frame) read as the same digit and colour as the source, and the
  direction on each side of the boundary is the same. Each side's velocity is read from
  the boundary outwards up to its first bounce (so a bounce further away does not count),
  in the forward direction of time on both sides."""
  n, total = len(source), len(output)
  src_reads, reads = digit_score.track(source, digit_size), digit_score.track(output, digit_size)
  if forward:
    src, new = _summary(src_reads, range(n - 1, -1, -1)), _summary(reads, range(n - 1, total))
  else:
    src, new = _summary(src_reads, range(n)), _summary(reads, range(total - n, -1, -1))
  src_dir, new_dir = src["direction"], new["direction"]
  row = dict(digit_kept=src["digit"] is not None and new["digit"] == src["digit"],
             color_kept=src["color"] is not None and new["color"] == src["color"],
             direction_kept=src_dir is not None and new_dir == src_dir,
             source_direction=src_dir, new_direction=new_dir)
  row["passed"] = bool(row["digit_kept"] and row["color_kept"] and row["direction_kept"])
  return row


def loop(output, digit_size: int) -> dict:
  """The jump from the last frame back to the first is no larger than a typical step:
  the centroid moves at most LOOP_JUMP_STEPS x the median frame-to-frame step + 1 px,
  in a clip whose digit moves (mean step >= LOOP_MIN_STEP px)."""
  reads = digit_score.track(output, digit_size)
  if reads[0] is None or reads[-1] is None:
    return dict(passed=False, reason="no digit in the first or last frame")
  steps = [_distance(reads[t]["centroid"], reads[t + 1]["centroid"])
           for t in range(len(reads) - 1) if reads[t] is not None and reads[t + 1] is not None]
  typical = float(np.median(steps)) if steps else 0.0
  jump = _distance(reads[-1]["centroid"], reads[0]["centroid"])
  moves = bool(steps) and float(np.mean(steps)) >= LOOP_MIN_STEP  # A clip that stands still loops trivially.
  return dict(passed=bool(moves and jump <= LOOP_JUMP_STEPS * typical + 1.0), moves=moves, jump_px=round(jump, 2),
              typical_step_px=round(typical, 2))


def connect(first, second, output, digit_size: int, given_frames: int) -> dict:
  """Starts as the first video's end, arrives at the second's start: the output's first
  and last `given_frames` frames read as the same digit and colour as the first video's
  last and the second video's first `given_frames` frames, and its first (last) frame's
  position is within position_tolerance of the first video's last (second's first) frame."""
  k, tol = given_frames, position_tolerance(digit_size)
  a, b, out = (digit_score.track(v, digit_size) for v in (first, second, output))
  ends = dict(start=(_summary(a, range(len(a) - k, len(a))), _summary(out, range(k)), a[-1], out[0]),
              end=(_summary(b, range(k)), _summary(out, range(len(out) - k, len(out))), b[0], out[-1]))
  row = {}
  for name, (want, got, want_frame, got_frame) in ends.items():
    row[f"{name}_digit"] = want["digit"] is not None and got["digit"] == want["digit"]
    row[f"{name}_color"] = want["color"] is not None and got["color"] == want["color"]
    row[f"{name}_position"] = (want_frame is not None and got_frame is not None
                               and _distance(want_frame["centroid"], got_frame["centroid"]) <= tol)
  row["passed"] = bool(all(row.values()))
  return row


def edit(source, output, new_color: str, digit_size: int) -> dict:
  """The prompt's new colour appears (the output's majority colour), the digit stays,
  and the motion is the source's: the mean centroid distance over the frames where both
  show a digit is within position_tolerance."""
  src, out = digit_score.track(source, digit_size), digit_score.track(output, digit_size)
  both = [t for t in range(min(len(src), len(out))) if src[t] is not None and out[t] is not None]
  drift = float(np.mean([_distance(src[t]["centroid"], out[t]["centroid"]) for t in both])) if both else float("inf")
  made = _summary(out, range(len(out)))
  row = dict(color_changed=made["color"] == new_color,
             digit_kept=made["digit"] is not None and made["digit"] == _summary(src, range(len(src)))["digit"],
             motion_kept=bool(drift <= position_tolerance(digit_size)), track_distance_px=round(drift, 2),
             made_color=made["color"])
  row["passed"] = bool(row["color_changed"] and row["digit_kept"] and row["motion_kept"])
  return row


def long_extension(source, output, digit_size: int) -> dict:
  """Identity and motion per window of len(source) frames after the source (windows share
  their boundary frame): each window's digit and colour are the source's, and its motion
  has the source's axis class (horizontal / vertical / diagonal) and speed within
  SPEED_RATIO (bounces flip a direction's sign, never these). identity[k] and motion[k]
  are window k + 1's (window 0 is the source); None where the window has fewer than two
  clear frames while the clip has more (a digit behind the grey bar for most of the
  window), which is not judged; a clip passes when it has a judged window and every
  judged window passes."""
  n = len(source)
  src = _summary(digit_score.track(source, digit_size), range(n))
  reads = digit_score.track(output, digit_size)
  clear = _clear(reads)
  windows = [range(k * (n - 1), k * (n - 1) + n) for k in range(1, 1 + (len(reads) - n) // (n - 1))]
  identity, motion = [], []
  for frames in windows:
    if clear[list(frames)].sum() < 2 and clear.sum() >= 2:
      identity.append(None), motion.append(None)  # Behind the bar most of the window: nothing to judge.
      continue
    got = _summary(reads, frames)
    identity.append(bool(src["digit"] is not None and got["digit"] == src["digit"] and got["color"] == src["color"]))
    motion.append(_same_motion(src["abs_velocity"], got["abs_velocity"]))
  judged = [v for v in identity + motion if v is not None]
  return dict(passed=bool(judged and all(judged)), identity=identity, motion=motion)
