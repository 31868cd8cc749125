"""Which latent frames are given clean: every generation task as one mechanism.

A `Window` is one generation of a latent grid [t, h, w, c]: the frames in `clean`
are held at `values` exactly (time 0, as the DiT saw conditioning frames in
training), the rest are integrated from noise. Tasks only differ in the windows
they build and how they stitch the results (DESIGN.md, "Representation"):

  t2v / t2i        nothing clean (t2i is one latent frame)
  i2v              latent frame 0 = the encoded image
  extend-forward   windows whose first frames are the last frames made so far
  extend-backward  windows whose last frames are the first frames made so far
  connect          first frames = V1's end, last frames = V2's start
  loop             a t2v clip, then a connect window from its end back to its start
  edit             nothing clean; start from the source noised to time `strength` (SDEdit)

Everything here is numpy and pure; the sequential tasks take a `generate` callback
(list of Windows -> latents [N, t, h, w, c]) so they are testable without a model.
All latents are in the DiT's normalised space.
"""

import dataclasses

import numpy as np

from vidsim.errors import UsageError

TASKS = ("t2v", "t2i", "i2v", "extend-forward", "extend-backward", "loop", "edit", "connect")


@dataclasses.dataclass(frozen=True)
class Window:
  """One generation: clean bool [t] latent frames held at values [t, h, w, c].

  start_t < 1 (edit): integrate from `values` noised to start_t instead of pure noise.
  """

  clean: np.ndarray
  values: np.ndarray
  start_t: float = 1.0

  @property
  def frames(self) -> int:
    return self.values.shape[0]


@dataclasses.dataclass(frozen=True)
class Stitched:
  """A task's latents [N, t, h, w, c] and which latent frames came from the inputs."""

  latents: np.ndarray
  given: np.ndarray  # bool [t]


# ------------------------------------------------------------------ windows


def empty_window(grid_shape) -> Window:
  """t2v / t2i: a (t, h, w, c) grid, all generated."""
  grid_shape = tuple(int(s) for s in grid_shape)
  return Window(np.zeros(grid_shape[0], bool), np.zeros(grid_shape, np.float32))


def prefix_window(context, frames: int) -> Window:
  """The first len(context) latent frames given (i2v, extend-forward)."""
  return bridge_window(context, None, frames)


def suffix_window(context, frames: int) -> Window:
  """The last len(context) latent frames given (extend-backward)."""
  return bridge_window(None, context, frames)


def bridge_window(before, after, frames: int) -> Window:
  """`before` [a, h, w, c] clean at the start, `after` [b, h, w, c] clean at the end (connect, loop)."""
  parts = [np.asarray(p, np.float32) for p in (before, after) if p is not None]
  if not parts:
    raise ValueError("bridge_window needs a context at one end at least")
  a = 0 if before is None else len(before)
  b = 0 if after is None else len(after)
  if a + b >= frames:
    raise UsageError(
        f"a window of {frames} latent frames cannot hold {a} + {b} given frames and still generate one: "
        "use a longer window (sample.window_frames) or fewer overlap frames (sample.overlap_latent_frames)"
    )
  values = np.zeros((frames,) + parts[0].shape[1:], np.float32)
  clean = np.zeros(frames, bool)
  if a:
    values[:a], clean[:a] = before, True
  if b:
    values[frames - b :], clean[frames - b :] = after, True
  return Window(clean, values)


def edit_window(source, strength: float) -> Window:
  """SDEdit: start from the source latents noised to time `strength`, nothing held."""
  check_strength(strength)
  source = np.asarray(source, np.float32)
  return Window(np.zeros(source.shape[0], bool), source, float(strength))


def check_strength(strength: float) -> None:
  if not 0.0 < strength <= 1.0:
    raise UsageError(f"--strength must be in (0, 1] (the SDEdit start time; 1 = ignore the source), got {strength}")


def clean_tokens(clean_frames, patch_grid, pt: int) -> np.ndarray:
  """bool [n] per patch token (patchify order) from bool [t] latent frames.

  A patch spans pt latent frames, so the given frames must fill whole patches."""
  clean_frames = np.asarray(clean_frames, bool)
  per_patch = clean_frames.reshape(-1, pt)
  if np.any(per_patch.any(axis=1) != per_patch.all(axis=1)):
    raise UsageError(
        f"given latent frames {np.flatnonzero(clean_frames).tolist()} split a patch of dit.patch_size[0]={pt} "
        "frames: the overlap must be a multiple of the temporal patch size"
    )
  t, h, w = patch_grid
  return np.repeat(per_patch[:, 0], h * w)


# ------------------------------------------------------------------ tasks over several windows


def resolve_overlap(window: int, overlap: int, ends: int) -> int:
  """Overlap latent frames per end (0 = auto), checked so a window still generates a frame."""
  overlap = overlap or max(1, window // 3)
  if overlap < 1 or ends * overlap >= window:
    raise UsageError(
        f"overlap of {overlap} latent frames at {ends} end(s) leaves nothing to generate in a window of "
        f"{window} latent frames: lower sample.overlap_latent_frames or raise sample.window_frames"
    )
  return overlap


def extend(generate, source, total: int, window: int, overlap: int, forward: bool) -> Stitched:
  """Extends source [N, t0, h, w, c] to `total` latent frames by sliding windows.

  Each window gives its `overlap` frames nearest the new side clean (copied from what
  exists so far) and generates the rest; the new frames are appended (forward) or
  prepended (backward). Source frames are kept exactly.
  """
  source = np.asarray(source, np.float32)
  t0 = source.shape[1]
  if total <= t0:
    raise UsageError(
        f"extension needs more latent frames ({total}) than the input video has ({t0}): raise --frames"
    )
  overlap = min(resolve_overlap(window, overlap, ends=1), t0)
  sequence = source
  while sequence.shape[1] < total:
    missing = total - sequence.shape[1]
    if forward:
      new = generate([prefix_window(s[-overlap:], window) for s in sequence])[:, overlap:]
      sequence = np.concatenate([sequence, new[:, :missing]], axis=1)
    else:
      new = generate([suffix_window(s[:overlap], window) for s in sequence])[:, : window - overlap]
      sequence = np.concatenate([new[:, max(0, new.shape[1] - missing) :], sequence], axis=1)
  given = np.zeros(total, bool)
  if forward:
    given[:t0] = True
  else:
    given[total - t0 :] = True
  return Stitched(sequence, given)


def connect(generate, first, second, window: int, overlap: int) -> Stitched:
  """A transition window: first's last `overlap` frames, new frames, second's first ones."""
  first, second = np.asarray(first, np.float32), np.asarray(second, np.float32)
  overlap = min(resolve_overlap(window, overlap, ends=2), first.shape[1], second.shape[1])
  windows = [bridge_window(a[-overlap:], b[:overlap], window) for a, b in zip(first, second)]
  given = windows[0].clean.copy()
  return Stitched(generate(windows), given)


def loop(generate, num_samples: int, clip_frames: int, grid_hwc, window: int, overlap: int) -> Stitched:
  """Clips that play seamlessly in a loop: a t2v clip A, then a bridge window from A's
  last `overlap` frames back to A's first ones; the output is A followed by the
  bridge's new frames, so its end leads into its start."""
  overlap = resolve_overlap(window, overlap, ends=2)
  if clip_frames < overlap:
    raise UsageError(f"a loop clip of {clip_frames} latent frames is shorter than the overlap {overlap}")
  clip = generate([empty_window((clip_frames,) + tuple(grid_hwc)) for _ in range(num_samples)])
  bridge = generate([bridge_window(c[-overlap:], c[:overlap], window) for c in clip])
  latents = np.concatenate([clip, bridge[:, overlap : window - overlap]], axis=1)
  return Stitched(latents, np.zeros(latents.shape[1], bool))


def pixel_given(given_latent, temporal_compression: int) -> np.ndarray:
  """bool [T] pixel frames from bool [t] latent frames (latent 0 = pixel 0; then ct each)."""
  given_latent = np.asarray(given_latent, bool)
  return np.concatenate([given_latent[:1], np.repeat(given_latent[1:], temporal_compression)])
