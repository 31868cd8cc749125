"""Generation tasks: which latent frames are given clean, and the registry of tasks.

A `Window` is one generation of a latent grid [t, h, w, c]: the frames in `clean`
are held at `values` exactly (time 0, as the DiT saw conditioning frames in
training), the rest are integrated from noise. Tasks only differ in the windows
they build and how they stitch the results:

  t2v / t2i        nothing clean (t2i is one latent frame)
  i2v              latent frame 0 = the encoded image
  extend-forward   windows whose first frames are the last frames made so far
  extend-backward  windows whose last frames are the first frames made so far
  connect          first frames = V1's end, last frames = V2's start
  loop             a t2v clip, then a bridge as long as the clip from its end back to its frame 1
  edit             nothing clean; start from the source noised to time `strength` (SDEdit)

The causal VAE's latent frame 0 is one pixel frame encoded as an image; each later
latent frame is `temporal_compression` (ct) frames that follow the ones before. So a
loop's bridge ends on the clip's latent frame 1, not 0: a frame 0 at a window's end
decodes to ct frames, which leaves the loop's end about ct frames short of its start.

Everything here is numpy and pure; the sequential tasks take a `generate` callback
(list of Windows -> latents [N, t, h, w, c]) so they are testable without a model.
All latents are in the DiT's normalised space.

`TASKS` is the registry that `vidsim sample`, the demo and the tests read: one `Task`
per name, declaring its inputs, its output length, whether it slides a window, and
how it runs. Adding a task is one entry (and its test).
"""

import dataclasses
from typing import Callable, Optional

import numpy as np

from vidsim.errors import UsageError


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
  """A task's latents [N, t, h, w, c] and which latent frames came from the inputs;
  the first `drop_first_frames` pixel frames they decode to are not part of the output."""

  latents: np.ndarray
  given: np.ndarray  # bool [t]
  drop_first_frames: int = 0


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
  """Clips that play seamlessly in a loop: a t2v clip A, then a bridge from A's last
  `overlap` latent frames to its frames 1..overlap with clip_frames - 1 new latent frames
  between them. The output is A and the bridge's new frames, less A's first pixel frame,
  whose place the bridge's last frame takes: the output's end leads into its first
  frame, A's frame 1.

  The way back is as long as the way out, so what moved through the clip can return at
  the pace it left. (A bridge of one sliding window, `window` - 2 x overlap new frames,
  was shorter than the clip: the digit had to jump back, and the loop probe on the
  permanence world scored 0.15; with this length 0.80, docs/eval.md.) `window` only
  sets the overlap when `overlap` is 0 (auto)."""
  overlap = resolve_overlap(window, overlap, ends=2)
  if clip_frames < 1 + overlap:
    raise UsageError(
        f"a loop clip of {clip_frames} latent frames is too short to hold latent frame 0 and an overlap of {overlap}"
    )
  clip = generate([empty_window((clip_frames,) + tuple(grid_hwc)) for _ in range(num_samples)])
  bridge_frames = clip_frames - 1 + 2 * overlap
  bridge = generate([bridge_window(c[-overlap:], c[1 : 1 + overlap], bridge_frames) for c in clip])
  latents = np.concatenate([clip, bridge[:, overlap : bridge_frames - overlap]], axis=1)
  return Stitched(latents, np.zeros(latents.shape[1], bool), drop_first_frames=1)


def pixel_given(given_latent, temporal_compression: int) -> np.ndarray:
  """bool [T] pixel frames from bool [t] latent frames (latent 0 = pixel 0; then ct each)."""
  given_latent = np.asarray(given_latent, bool)
  return np.concatenate([given_latent[:1], np.repeat(given_latent[1:], temporal_compression)])


# ------------------------------------------------------------------ the registry


@dataclasses.dataclass(frozen=True)
class TaskRun:
  """What a task's `run` gets: the output's latent grid, the window settings, and the
  engine's two callbacks (noise -> latents for windows; a uint8 clip -> its latents,
  repeated for every sample)."""

  grid: tuple  # (t, h, w, c) of the output (extensions: the whole extended length).
  window: int  # Latent frames of one sliding window (extend, loop's bridge).
  overlap: int  # Latent frames two windows share (0 = a third of the window).
  strength: float  # SDEdit start time (edit).
  num_samples: int
  sample: Callable  # [Window] -> latents [N, t, h, w, c]
  encode: Callable  # uint8 [T, H, W, 3] -> latents [N, t, h, w, c]
  image: Optional[np.ndarray] = None  # uint8 [H, W, 3]
  video: Optional[np.ndarray] = None  # uint8 [T, H, W, 3]
  video2: Optional[np.ndarray] = None


# Input name -> (command-line flag, example file, what it is).
INPUTS = {
    "image": ("--image", "I.png", "the first frame"),
    "video": ("--video", "V.mp4", "the source clip"),
    "video2": ("--video2", "V2.mp4", "the second clip"),
}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  help: str
  run: Callable[[TaskRun], Stitched]
  inputs: tuple = ()  # Names from INPUTS, all required.
  length: str = "frames"  # The output's pixel frames: "frames" (--frames), "one" (an image), "source" (the video's).
  windowed: bool = False  # Slides windows of sample.window_frames, which must be a valid size too.
  extends: bool = False  # --frames must be longer than the input video.
  takes_strength: bool = False  # Reads --strength (SDEdit).


def _t2v(run: TaskRun) -> Stitched:
  return Stitched(run.sample([empty_window(run.grid)] * run.num_samples), np.zeros(run.grid[0], bool))


def _i2v(run: TaskRun) -> Stitched:
  first = run.encode(run.image[None])[0, :1]
  windows = [prefix_window(first, run.grid[0]) for _ in range(run.num_samples)]
  return Stitched(run.sample(windows), windows[0].clean.copy())


def _extend(forward: bool):
  return lambda run: extend(run.sample, run.encode(run.video), run.grid[0], run.window, run.overlap, forward)


def _connect(run: TaskRun) -> Stitched:
  return connect(run.sample, run.encode(run.video), run.encode(run.video2), run.grid[0], run.overlap)


def _loop(run: TaskRun) -> Stitched:
  return loop(run.sample, run.num_samples, run.grid[0], run.grid[1:], run.window, run.overlap)


def _edit(run: TaskRun) -> Stitched:
  source = run.encode(run.video)
  edited = run.sample([edit_window(s, run.strength) for s in source])
  return Stitched(edited, np.zeros(source.shape[1], bool))


TASKS = {
    task.name: task
    for task in (
        Task("t2v", "text to video", _t2v),
        Task("t2i", "text to image (one frame)", _t2v, length="one"),
        Task("i2v", "image to video: the image is the first frame", _i2v, inputs=("image",)),
        Task("extend-forward", "continue a video to --frames", _extend(True), inputs=("video",), windowed=True,
             extends=True),
        Task("extend-backward", "make what came before a video, to --frames", _extend(False), inputs=("video",),
             windowed=True, extends=True),
        Task("loop", "a clip whose end leads back into its start", _loop, windowed=True),
        Task("edit", "SDEdit a video towards the prompt", _edit, inputs=("video",), length="source",
             takes_strength=True),
        Task("connect", "a transition from the end of --video to the start of --video2", _connect,
             inputs=("video", "video2")),
    )
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise UsageError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
  return TASKS[name]


def check_given_inputs(task: Task, given: dict, strength, frames) -> None:
  """UsageError for inputs a task needs but was not given, or was given but does not read.
  given: {input name: bool}; strength and frames: the flags' values (None = not set)."""
  for name, (flag, example, what) in INPUTS.items():
    if name in task.inputs and not given.get(name):
      needed = " and ".join(f"{INPUTS[n][0]} {INPUTS[n][1]}" for n in task.inputs)
      raise UsageError(f"--task {task.name} needs {needed}")
    if given.get(name) and name not in task.inputs:
      readers = ", ".join(t.name for t in TASKS.values() if name in t.inputs)
      raise UsageError(f"{flag} is {what} of --task {readers}; --task {task.name} takes no {flag}")
  if strength is not None and not task.takes_strength:
    readers = ", ".join(t.name for t in TASKS.values() if t.takes_strength)
    raise UsageError(f"--strength is the SDEdit noise level of --task {readers}; --task {task.name} does not use it")
  if task.length == "one" and frames not in (None, 1):
    raise UsageError(f"--task {task.name} makes one frame; drop --frames {frames} or use --frames 1")
