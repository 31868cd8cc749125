"""`vidsim sample`: reads and checks every input and flag, then runs one task.

All checks happen before any model is loaded, so a typo costs no compile; each names
the flag, the file or the valid choices. The tasks themselves are vidsim/tasks.py's
registry; the engine is vidsim/sample/engine.py.
"""

import os

from vidsim import flow
from vidsim import mesh as mesh_lib
from vidsim import sizes
from vidsim import tasks as tasks_lib
from vidsim.data import video_io
from vidsim.errors import UsageError
from vidsim.log import get_logger, is_chief
from vidsim.sample.engine import Engine, generate

log = get_logger("sample")


def resolve_task(args) -> str:
  """The task from --task and the given inputs; UsageError for combinations that make no sense."""
  frames = args.frames
  task = args.task or ("i2v" if args.image else "t2i" if frames == 1 else "t2v")
  given = {"image": bool(args.image), "video": bool(args.video), "video2": bool(args.video2)}
  tasks_lib.check_given_inputs(tasks_lib.get(task), given, args.strength, frames)
  if args.strength is not None:
    tasks_lib.check_strength(args.strength)
  return task


def _read_image(path):
  if not os.path.isfile(path):
    raise UsageError(f"input image not found: {path}")
  try:
    return video_io.read_image(path)
  except Exception as e:  # PIL raises several types for unreadable files.
    raise UsageError(f"cannot read image {path}: {e}") from e


def _read_video(path, config, flag):
  if not os.path.isfile(path):
    raise UsageError(f"{flag} not found: {path}")
  try:
    frames, fps = video_io.read_video(path)
  except Exception as e:  # PyAV raises FFmpegError subclasses, ValueError for no stream/frames.
    raise UsageError(f"cannot read video {path} ({flag}): {e}") from e
  ct = config.vae.temporal_compression
  keep = sizes.usable_frames(config, len(frames))
  if keep < 1:
    raise UsageError(f"{flag} {path} has {len(frames)} frames: too short for the VAE (needs 1 + k*{ct})")
  if keep < len(frames):
    log.info("%s %s: using its first %d of %d frames (frames must be 1 + k*%d)", flag, path, keep, len(frames), ct)
  return frames[:keep], fps


def check_inputs(args, config, task):
  """Reads and checks every input file and the output size before any model work.

  Returns (size dict frames/height/width, inputs dict image/video/video2, fps)."""
  image = _read_image(args.image) if args.image else None
  video, fps = _read_video(args.video, config, "--video") if args.video else (None, 0.0)
  video2 = _read_video(args.video2, config, "--video2")[0] if args.video2 else None
  source = image if image is not None else (video[0] if video is not None else None)
  height = args.height or (source.shape[0] if source is not None else config.sample.height)
  width = args.width or (source.shape[1] if source is not None else config.sample.width)
  if source is not None and (height, width) != source.shape[:2]:
    raise UsageError(
        f"the input is {source.shape[0]}x{source.shape[1]} (HxW) but --height/--width ask for {height}x{width}: "
        "outputs keep the input's size, so omit --height/--width or resize the input"
    )
  if video2 is not None and video2.shape[1:3] != video.shape[1:3]:
    raise UsageError(f"--video2 is {video2.shape[1]}x{video2.shape[2]}, --video is {video.shape[1]}x{video.shape[2]}: "
                     "connect needs two clips of one size")
  spec = tasks_lib.get(task)
  if spec.length == "one":
    frames = 1
  elif spec.length == "source":
    frames = len(video)
  else:
    frames = args.frames or config.sample.frames
  try:
    sizes.check_output_size(config, frames, height, width)
  except UsageError as e:
    if source is None:
      raise
    raise UsageError(f"the input's frames are {source.shape[0]}x{source.shape[1]} (HxW); {e}") from e
  if spec.extends and frames <= len(video):
    raise UsageError(
        f"--frames {frames} is the extended length; the input video already has {len(video)} usable frames: "
        f"ask for more (e.g. --frames {len(video) + config.vae.temporal_compression * 2})"
    )
  _check_out(args.out, frames)
  fps = args.fps or fps or config.sample.fps
  return dict(frames=frames, height=height, width=width), dict(image=image, video=video, video2=video2), fps


def _check_out(out, frames):
  extension = os.path.splitext(out)[1].lower()
  if frames == 1 and extension != ".png":
    raise UsageError(f"one frame is an image: write it as PNG (--out {os.path.splitext(out)[0]}.png), not {out}")
  if frames > 1 and extension not in video_io.OUTPUT_VIDEO_EXTENSIONS:
    raise UsageError(f"--out {out}: a video needs one of {', '.join(video_io.OUTPUT_VIDEO_EXTENSIONS)} (or --frames 1 for a PNG)")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise UsageError(f"--out {out}: directory {parent} does not exist")


def run_sample(args, config):
  task = resolve_task(args)
  size, inputs, fps = check_inputs(args, config, task)
  s = config.sample
  steps = s.steps if args.steps is None else args.steps
  sampler = args.sampler or s.sampler
  if sampler not in flow.SAMPLERS:
    raise UsageError(f"--sampler {sampler!r}; valid: {', '.join(flow.SAMPLERS)}")
  if steps < 1 or args.num_samples < 1:
    raise UsageError(f"--steps ({steps}) and --num-samples ({args.num_samples}) must be >= 1")
  guidance = s.guidance if args.guidance is None else args.guidance
  strength = s.edit_strength if args.strength is None else args.strength
  if tasks_lib.get(task).takes_strength:
    tasks_lib.check_strength(strength)
  engine = Engine.from_workdir(config, args.workdir, mesh_lib.job_mesh(config))
  generation = generate(
      engine, task, [args.prompt] * args.num_samples, **size, seed=config.seed if args.seed is None else args.seed,
      steps=steps, sampler=sampler, guidance=guidance, strength=strength, **inputs,
  )
  if is_chief():
    for path in video_io.write_outputs(args.out, generation.videos, generation.given, fps):
      print(path)
