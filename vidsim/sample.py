"""Generation: `vidsim sample`, periodic training samples, and the engine under both.

Reads top to bottom: sizes, the trained DiT (EMA weights), the engine (text ->
packed rows -> one jitted ODE with CFG over the mesh -> VAE decode), `generate`
(every task of vidsim/tasks.py), output files (video, PNG, contact sheet), then the
command and the training hook. Latents are normalised (z - shift) / scale for the
DiT and denormalised before decoding, as in the latent cache.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from vidsim import digit_score
from vidsim import flow
from vidsim import mesh as mesh_lib
from vidsim import patches
from vidsim import tasks as tasks_lib
from vidsim.data import video_io
from vidsim.errors import UsageError
from vidsim.log import get_logger, is_chief, progress
from vidsim.models import text as text_lib
from vidsim.models import vae as vae_lib
from vidsim.models import vae_tiling

log = get_logger("sample")

GIVEN_COLOR = (255, 140, 0)  # Contact-sheet border of frames given as conditions.
GENERATED_COLOR = (48, 48, 48)  # Border of generated frames.
SHEET_MAX_COLUMNS = 24  # Longer videos are shown at evenly spaced frames.
SHEET_BORDER = 3  # Pixels of the coloured frame border (thick enough to see at a glance).
VIDEO_OUTPUTS = (".mp4", ".gif", ".webm")

# ------------------------------------------------------------------ sizes


def check_size(config, frames: int, height: int, width: int):
  """The latent grid (t, h, w, c) of an output size, or a UsageError with the nearest valid sizes.

  Valid: frames = 1 + k*ct with a latent frame count divisible by pt; height and
  width multiples of cs * ph (cs * pw)."""
  ct, cs = config.vae.temporal_compression, config.vae.spatial_compression
  pt, ph, pw = (int(p) for p in config.dit.patch_size)
  problems = []
  t_latent = 1 + (frames - 1) // ct if frames >= 1 else 0
  if frames < 1 or (frames - 1) % ct or t_latent % pt:
    problems.append(f"--frames {frames} -> nearest valid: {_nearest_frames(frames, ct, pt)}")
  for flag, size, step in (("--height", height, cs * ph), ("--width", width, cs * pw)):
    if size < step or size % step:
      below, above = (size // step) * step, (size // step + 1) * step
      valid = f"{below} or {above}" if below > 0 else f"{above}"
      problems.append(f"{flag} {size} -> nearest valid: {valid} (multiples of {step})")
  if problems:
    raise UsageError(
        f"size (frames={frames}, height={height}, width={width}) cannot be made by the VAE "
        f"(temporal x{ct}, spatial x{cs}) with dit.patch_size {tuple(config.dit.patch_size)}: "
        + "; ".join(problems)
    )
  return vae_lib.latent_shape(config, frames, height, width)


def _nearest_frames(frames, ct, pt):
  valid = [1 + (t - 1) * ct for t in range(pt, 4096, pt)]
  below = [v for v in valid if v <= frames]
  above = [v for v in valid if v >= frames]
  return " or ".join(str(v) for v in sorted({below[-1] if below else valid[0], above[0]}))


def latent_frames_to_pixels(config, t: int) -> int:
  return 1 + (t - 1) * config.vae.temporal_compression


def pixels_to_latent_frames(config, frames: int) -> int:
  return 1 + (frames - 1) // config.vae.temporal_compression


# ------------------------------------------------------------------ the trained DiT


class TrainedDiT:
  """The EMA weights of the latest DiT checkpoint in W/dit/checkpoints, sharded like training."""

  def __init__(self, config, workdir, mesh):
    from vidsim.train.checkpoint import open_latest
    from vidsim.train.dit_loop import abstract_dit

    reader, step = open_latest(epath.Path(workdir) / "dit" / "checkpoints", "DiT",
                               f"run `vidsim train --config ... --workdir {workdir}` first")
    self.graphdef, abstract_params, shardings = abstract_dit(config, mesh)
    target = {"ema": jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings)}
    restored = reader.restore_subset(step, target)
    reader.close()
    self.params = restored["ema"]
    self.step = step


# ------------------------------------------------------------------ the engine


class Engine:
  """A DiT and a VAE ready to generate: windows -> latents (jitted ODE, CFG, mesh), video <-> latents.

  dit_params may be sharded jax.Arrays (training's EMA) or host arrays; vae_* come
  from TrainedVAE (host params, per-channel shift and scale)."""

  def __init__(self, config, mesh, dit_graphdef, dit_params, vae_graphdef, vae_params, shift, scale):
    if config.text.encoder != "bytes":
      raise UsageError(
          f"sampling needs text.encoder='bytes' (new prompts are encoded by the model); "
          f"text.encoder={config.text.encoder!r} would need precomputed embeddings of each prompt"
      )
    self.config, self.mesh = config, mesh
    self.dit_graphdef, self.dit_params = dit_graphdef, dit_params
    self.vae_graphdef, self.vae_params = vae_graphdef, vae_params
    self.shift = np.asarray(shift, np.float32)
    self.scale = np.asarray(scale, np.float32)
    self.patch_size = tuple(int(p) for p in config.dit.patch_size)
    self._ode, self._encode, self._decode = _compiled(config, dit_graphdef, vae_graphdef)

  @classmethod
  def from_workdir(cls, config, workdir, mesh):
    from vidsim.train.vae_loop import TrainedVAE

    vae = TrainedVAE(config, workdir, mesh)
    dit = TrainedDiT(config, workdir, mesh)
    log.info("sampling with DiT step %d (EMA) and VAE step %d", dit.step, vae.step)
    return cls(config, mesh, dit.graphdef, dit.params, vae.graphdef, vae.params, vae.shift, vae.scale)

  def sample_windows(self, windows, prompts, key, *, steps, sampler, guidance):
    """Windows (same shape; one per prompt) -> normalised latents float32 [N, t, h, w, c].

    Sample i's noise is drawn from fold_in(key, i), so it does not depend on how many
    samples share the batch or on the mesh."""
    if len(windows) != len(prompts):
      raise ValueError(f"{len(windows)} windows for {len(prompts)} prompts")
    grid_shape = windows[0].values.shape
    start_t = windows[0].start_t
    if any(w.values.shape != grid_shape or w.start_t != start_t for w in windows):
      raise ValueError("windows of one batch must share their shape and start time")
    patch_grid = patches.patch_grid_shape(grid_shape, self.patch_size)
    positions = patches.grid_positions(patch_grid)
    values = np.stack([w.values for w in windows])
    x_init = np.asarray(patches.patchify_batch(jnp.asarray(values), self.patch_size))
    clean = np.stack([tasks_lib.clean_tokens(w.clean, patch_grid, self.patch_size[0]) for w in windows])
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), x_init.shape[1:], jnp.float32))
                    for i in range(len(windows))])
    ids, mask = text_lib.tokenize_bytes(list(prompts), self.config.text.max_length)
    n, length = x_init.shape[:2]
    rows = dict(
        eps=eps, x_init=x_init, clean=clean, x_clean=x_init,
        positions=np.broadcast_to(positions, (n, length, 3)),
        segment_ids=np.ones((n, length), np.int32),
        text_tokens=ids[:, None], text_mask=mask[:, None],
    )
    tokens = self._run_rows(rows, steps=steps, sampler=sampler, guidance=float(guidance), start_t=float(start_t))
    # The ODE holds given tokens bit for bit; (un)patchify only moves values, so the
    # given latent frames come back exactly (tested).
    return np.asarray(patches.unpatchify_batch(jnp.asarray(tokens), self.patch_size, grid_shape))

  def _run_rows(self, rows, **static):
    """Pads rows to a multiple of the data-parallel size, shards them, runs the ODE, gathers."""
    n = rows["eps"].shape[0]
    multiple = mesh_lib.data_parallel_size(self.mesh, self.config) * jax.process_count()
    pad = -n % multiple
    rows = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) if pad else np.asarray(v) for k, v in rows.items()}
    per_process = (n + pad) // jax.process_count()
    start = jax.process_index() * per_process
    local = {k: v[start : start + per_process] for k, v in rows.items()}
    with mesh_lib.activate(self.mesh, self.config):
      batch = mesh_lib.make_global_batch(local, self.mesh, self.config)
      tokens = self._ode(self.dit_params, batch["eps"], batch["x_init"], batch["clean"], batch["x_clean"],
                         batch["positions"], batch["segment_ids"], batch["text_tokens"], batch["text_mask"], **static)
    if jax.process_count() > 1:
      tokens = multihost_utils.process_allgather(tokens, tiled=True)
    return np.asarray(tokens)[:n]

  # -------------------------------------------------------------- the VAE

  def encode(self, video_uint8):
    """uint8 [N, T, H, W, 3] -> normalised latents [N, t, h, w, c] (posterior means)."""
    video = np.asarray(video_uint8, np.float32) / 127.5 - 1.0
    enc = self.config.encode
    if enc.tile_frames > 0 or enc.tile_size > 0:
      model = nnx.merge(self.vae_graphdef, self.vae_params)
      mean = vae_tiling.tiled_encode(model, jnp.asarray(video), enc.tile_frames, enc.tile_size, self._overlap())[0]
    else:
      mean = self._encode(self.vae_params, jnp.asarray(video))
    return (np.asarray(mean, np.float32) - self.shift) / self.scale

  def decode(self, latents):
    """Normalised latents [N, t, h, w, c] -> uint8 video [N, T, H, W, 3]; tiled when configured."""
    z = jnp.asarray(np.asarray(latents, np.float32) * self.scale + self.shift)
    enc = self.config.encode
    if enc.tile_frames > 0 or enc.tile_size > 0:
      model = nnx.merge(self.vae_graphdef, self.vae_params)
      video = vae_tiling.tiled_decode(model, z, enc.tile_frames, enc.tile_size, self._overlap())
    else:
      video = self._decode(self.vae_params, z)
    return np.clip((np.asarray(video) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)

  def _overlap(self):
    return self.config.sample.decode_tile_overlap or self.config.encode.tile_size // 2


# One set of jitted functions per (config, models): engines made again (each training
# sample hook, each test) reuse the compiled ODE and decoder instead of recompiling.
_COMPILED = {}


def _compiled(config, dit_graphdef, vae_graphdef):
  # The traced code reads only config.flow (time shift) and the mesh rules; the models are their graphdefs.
  key = (json.dumps([config.flow.to_dict(), config.mesh.rules.to_dict()], sort_keys=True), dit_graphdef, vae_graphdef)
  if key not in _COMPILED:
    ode = jax.jit(functools.partial(_ode, config, dit_graphdef),
                  static_argnames=("steps", "sampler", "guidance", "start_t"))
    encode = jax.jit(lambda p, v: nnx.merge(vae_graphdef, p).encode(v)[0])
    decode = jax.jit(lambda p, z: nnx.merge(vae_graphdef, p).decode(z))
    _COMPILED[key] = (ode, encode, decode)
  return _COMPILED[key]


def _ode(config, graphdef, params, eps, x_init, clean, x_clean, positions, segment_ids, text_tokens, text_mask,
         *, steps, sampler, guidance, start_t):
  """Rows of tokens -> sampled tokens: CFG velocity (both branches in one pass) in one fori_loop."""

  def model_fn(x, t, drop_text, rows):
    pos, seg, ids, mask = rows
    # Merged here, inside the ODE loop body: NNX modules must live at the trace level they run in.
    model = nnx.merge(graphdef, params)
    return model(x, t, pos, seg, {"text_tokens": ids, "text_mask": mask}, drop_text)

  velocity = flow.cfg_velocity(model_fn, guidance, row_inputs=(positions, segment_ids, text_tokens, text_mask))
  t_grid = flow.sample_time_grid(steps, x_init.shape[1], config, start_t)
  x_T = flow.noise_tokens(x_init, eps, start_t)  # start_t = 1: pure noise.
  return flow.sample_ode(velocity, x_T, t_grid, clean, x_clean, sampler)


# ------------------------------------------------------------------ every task


@dataclasses.dataclass
class Generation:
  """What a task made: videos uint8 [N, T, H, W, 3], normalised latents [N, t, h, w, c],
  and which frames were given as conditions (bool [T] pixel frames, bool [t] latent frames)."""

  videos: np.ndarray
  latents: np.ndarray
  given: np.ndarray
  given_latent: np.ndarray


def generate(engine: Engine, task: str, prompts, *, frames: int, height: int, width: int, seed: int = 0,
             steps: int = 30, sampler: str = "euler", guidance: float = 4.0, image=None, video=None,
             video2=None, strength: float = 1.0, window_frames: int = 0, overlap: int = 0) -> Generation:
  """Runs one task for len(prompts) samples. Inputs are uint8: image [H, W, 3], video and
  video2 [T, H, W, 3], already of a valid size (see `check_inputs`).

  frames: the output length of t2v, t2i and i2v; the total length of an extension;
  the t2v clip length of loop; the window length of connect; edit keeps the source's. window_frames (pixel
  frames, 0 = config.sample.window_frames or sample.frames) sets the sliding window
  of extend and loop's bridge; overlap is in latent frames (0 = auto).
  """
  config = engine.config
  if task not in tasks_lib.TASKS:
    raise UsageError(f"unknown task {task!r}; valid: {', '.join(tasks_lib.TASKS)}")
  prompts = list(prompts)
  n = len(prompts)
  if task == "edit":
    frames = len(video)  # An edit keeps its source's length.
  for name, source in (("image", image), ("video", video), ("video2", video2)):
    if source is not None and tuple(source.shape[-3:-1]) != (height, width):
      raise UsageError(f"{name} is {source.shape[-3]}x{source.shape[-2]} (HxW); this generation is {height}x{width}")
  grid = check_size(config, frames, height, width)
  window_frames = window_frames or config.sample.window_frames or config.sample.frames
  window = pixels_to_latent_frames(config, window_frames)
  calls = iter(range(1 << 30))
  base_key = jax.random.key(seed)

  def run(windows):
    # Each window of a task gets fresh noise: key = fold_in(seed, call index).
    key = jax.random.fold_in(base_key, next(calls))
    return engine.sample_windows(windows, prompts, key, steps=steps, sampler=sampler, guidance=guidance)

  def batch_of(clip):
    return np.repeat(engine.encode(clip[None]), n, axis=0)

  if task in ("t2v", "t2i"):
    result = tasks_lib.Stitched(run([tasks_lib.empty_window(grid)] * n), np.zeros(grid[0], bool))
  elif task == "i2v":
    first = batch_of(image[None])[0, :1]
    windows = [tasks_lib.prefix_window(first, grid[0]) for _ in range(n)]
    result = tasks_lib.Stitched(run(windows), windows[0].clean.copy())
  elif task in ("extend-forward", "extend-backward"):
    check_size(config, window_frames, height, width)
    result = tasks_lib.extend(run, batch_of(video), grid[0], window, overlap, forward=task == "extend-forward")
  elif task == "connect":
    result = tasks_lib.connect(run, batch_of(video), batch_of(video2), grid[0], overlap)
  elif task == "loop":
    check_size(config, window_frames, height, width)
    result = tasks_lib.loop(run, n, grid[0], grid[1:], window, overlap)
  else:  # edit
    source = batch_of(video)
    edited = run([tasks_lib.edit_window(s, strength) for s in source])
    result = tasks_lib.Stitched(edited, np.zeros(source.shape[1], bool))
  videos = engine.decode(result.latents)
  given = tasks_lib.pixel_given(result.given, config.vae.temporal_compression)
  return Generation(videos, result.latents, given, result.given)


# ------------------------------------------------------------------ output files


def contact_sheet(videos, given, min_side: int = 64) -> np.ndarray:
  """uint8 [rows*H', cols*W', 3]: one row per sample, frames left to right, each framed
  by a SHEET_BORDER-pixel border, orange where the frame was given as a condition."""
  videos = np.asarray(videos, np.uint8)
  n, t, h, w, _ = videos.shape
  columns = np.unique(np.linspace(0, t - 1, min(t, SHEET_MAX_COLUMNS)).round().astype(int))
  zoom = max(1, -(-min_side // min(h, w)))  # Nearest-neighbour upscale so small frames stay visible.
  border = SHEET_BORDER
  cell_h, cell_w = h * zoom + 2 * border, w * zoom + 2 * border
  sheet = np.full((n * cell_h, len(columns) * cell_w, 3), 255, np.uint8)
  for i in range(n):
    for j, f in enumerate(columns):
      y, x = i * cell_h, j * cell_w
      sheet[y : y + cell_h, x : x + cell_w] = GIVEN_COLOR if given[f] else GENERATED_COLOR
      frame = videos[i, f].repeat(zoom, axis=0).repeat(zoom, axis=1)
      sheet[y + border : y + border + h * zoom, x + border : x + border + w * zoom] = frame
  return sheet


def sheet_path(out) -> str:
  """O.mp4 -> O.sheet.png."""
  return os.path.splitext(str(out))[0] + ".sheet.png"


def output_paths(out, num_samples: int) -> list:
  """One file per sample: O.ext for one sample, O_0.ext, O_1.ext, ... for several."""
  if num_samples == 1:
    return [str(out)]
  stem, extension = os.path.splitext(str(out))
  return [f"{stem}_{i}{extension}" for i in range(num_samples)]


def write_outputs(out, generation: Generation, fps: float) -> list:
  """Writes every sample (video by extension, or PNG for one frame) and the contact sheet.

  Each file is written under a temporary name and renamed, so a failure leaves no
  half-written output. Returns the paths written (samples, then the sheet)."""
  videos = generation.videos
  written = []
  for path, video in zip(output_paths(out, len(videos)), videos):
    if path.lower().endswith(".png"):
      _atomic(path, lambda tmp, v=video: video_io.write_png(tmp, v[0]))
    else:
      _atomic(path, lambda tmp, v=video: video_io.write_video(tmp, v, fps))
    written.append(path)
  sheet = sheet_path(out)
  _atomic(sheet, lambda tmp: video_io.write_png(tmp, contact_sheet(videos, generation.given)))
  written.append(sheet)
  return written


def _atomic(path, write):
  stem, extension = os.path.splitext(path)
  tmp = f"{stem}.tmp-{os.getpid()}{extension}"  # Same extension: the writer picks the format by it.
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ------------------------------------------------------------------ `vidsim sample`


def resolve_task(args) -> str:
  """The task from --task and the given inputs; UsageError for combinations that make no sense."""
  frames = args.frames
  task = args.task or ("i2v" if args.image else "t2i" if frames == 1 else "t2v")
  needs_video = ("extend-forward", "extend-backward", "edit", "connect")
  if args.image and task != "i2v":
    raise UsageError(f"--image is the first frame of image-to-video: use it with --task i2v (or no --task), not {task}")
  if task == "i2v" and not args.image:
    raise UsageError("--task i2v needs --image I.png")
  if task in needs_video and not args.video:
    raise UsageError(f"--task {task} needs --video V.mp4")
  if args.video and task not in needs_video:
    raise UsageError(f"--video is an input of {', '.join(needs_video)}; --task {task} takes no video")
  if task == "connect" and not args.video2:
    raise UsageError("--task connect needs --video V1.mp4 and --video2 V2.mp4")
  if args.video2 and task != "connect":
    raise UsageError(f"--video2 is the second clip of --task connect; --task {task} takes no second video")
  if args.strength is not None and task != "edit":
    raise UsageError(f"--strength is the SDEdit noise level of --task edit; --task {task} does not use it")
  if args.strength is not None:
    tasks_lib.check_strength(args.strength)
  if task == "t2i" and frames not in (None, 1):
    raise UsageError(f"--task t2i makes one frame; drop --frames {frames} or use --frames 1")
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
  usable = 1 + (len(frames) - 1) // ct
  pt = int(config.dit.patch_size[0])
  usable -= usable % pt
  if usable < 1:
    raise UsageError(f"{flag} {path} has {len(frames)} frames: too short for the VAE (needs 1 + k*{ct})")
  keep = 1 + (usable - 1) * ct
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
  if task == "t2i":
    frames = 1
  elif task == "edit":
    frames = len(video)
  else:
    frames = args.frames or config.sample.frames
  try:
    check_size(config, frames, height, width)
  except UsageError as e:
    if source is None:
      raise
    raise UsageError(f"the input's frames are {source.shape[0]}x{source.shape[1]} (HxW); {e}") from e
  if task in ("extend-forward", "extend-backward") and frames <= len(video):
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
  if frames > 1 and extension not in VIDEO_OUTPUTS:
    raise UsageError(f"--out {out}: a video needs one of {', '.join(VIDEO_OUTPUTS)} (or --frames 1 for a PNG)")
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
  if task == "edit":
    tasks_lib.check_strength(strength)
  from vidsim.train.loop import job_mesh

  mesh = job_mesh(config)
  engine = Engine.from_workdir(config, args.workdir, mesh)
  generation = generate(
      engine, task, [args.prompt] * args.num_samples, **size, seed=config.seed if args.seed is None else args.seed,
      steps=steps, sampler=sampler, guidance=guidance, strength=strength, **inputs,
  )
  if is_chief():
    for path in write_outputs(args.out, generation, fps):
      print(path)


# ------------------------------------------------------------------ during training


def training_samples(config, workdir, mesh, graphdef, state, step):
  """The train loop's hook: t2v for each config.train.sample_prompts with the EMA
  params, written to W/dit/samples/step_XXXXXX_<i>.gif (and one contact sheet)."""
  from vidsim.train.vae_loop import TrainedVAE

  s = config.sample
  prompts = list(config.train.sample_prompts)
  try:
    check_size(config, s.frames, s.height, s.width)
    vae = TrainedVAE(config, workdir, mesh)
    engine = Engine(config, mesh, graphdef, state["ema"], vae.graphdef, vae.params, vae.shift, vae.scale)
    generation = generate(engine, "t2v", prompts, frames=s.frames, height=s.height, width=s.width, seed=config.seed,
                          steps=s.steps, sampler=s.sampler, guidance=s.guidance)
  except UsageError as e:
    # A bad sample setting must not end hours of training: say so loudly and train on.
    log.error("step %d: no training samples: %s", step, e)
    return
  out_dir = epath.Path(workdir) / "dit" / "samples"
  if is_chief():
    out_dir.mkdir(parents=True, exist_ok=True)
    extension = ".png" if s.frames == 1 else ".gif"
    paths = write_outputs(str(out_dir / f"step_{step:06d}{extension}"), generation, s.fps)
    log.info("step %d: samples %s", step, ", ".join(os.path.basename(p) for p in paths))
  if config.train.score_samples and s.frames > 1 and config.data.builder == "moving_digits":
    result = score_probe(config, engine, config.train.score_samples)
    log.info("step %d: probe samples (EMA): %s", step, digit_score.summary(result))
    if is_chief():
      line = {"step": step, **digit_score.headline(result)}
      with (out_dir / "scores.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def score_probe(config, engine, count: int) -> dict:
  """t2v for `count` one-digit probe prompts (digit_score.probe_prompts) at the sample
  size, scored against their prompts; the result also holds the videos and prompts."""
  s = config.sample
  prompts = digit_score.probe_prompts(count, config.moving_digits.colors)
  generation = generate(engine, "t2v", prompts, frames=s.frames, height=s.height, width=s.width,
                        seed=config.seed + 1, steps=s.steps, sampler=s.sampler, guidance=s.guidance)
  result = digit_score.score(generation.videos, prompts, config.moving_digits.digit_size)
  return dict(result, videos=generation.videos, prompts=prompts)


# ------------------------------------------------------------------ the demo's samples


def _demo_shapes(config):
  """(frames, height, width) of square, wide and vertical t2v: the sample size and the
  first wide / tall video buckets the model trained on (None if it saw neither)."""
  s = config.sample
  square = (s.frames, s.height, s.width)
  videos = [tuple(b) for b in config.data.buckets if b[0] > 1]
  wide = next((b for b in videos if b[2] > b[1]), None)
  tall = next((b for b in videos if b[1] > b[2]), None)
  # Without a bucket of one orientation, the other turned on its side (RoPE takes any shape).
  wide = wide or (tall and (tall[0], tall[2], tall[1]))
  tall = tall or (wide and (wide[0], wide[2], wide[1]))
  return square, wide, tall


def _demo_scene(config, seed, frames, height, width):
  from vidsim.data import moving_digits

  md = config.moving_digits
  video, caption, _ = moving_digits.render_scene(
      np.random.default_rng(seed), split=config.data.eval_split, frames=frames, height=height, width=width,
      digit_size=md.digit_size, max_digits=1, speed=tuple(md.speed), colors=tuple(md.colors), paths=md.paths)
  return video, caption


def _recolour(caption, colors):
  """The caption with its first colour word swapped for another (the edit prompt)."""
  for i, colour in enumerate(colors):
    if f" {colour} " in f" {caption} ":
      return f" {caption} ".replace(f" {colour} ", f" {colors[(i + 1) % len(colors)]} ", 1).strip()
  return caption


def demo_samples(config, workdir, mesh) -> list:
  """Every task once on the embedded world (for `vidsim demo`), under W/samples/.

  Inputs are rendered moving_digits validation scenes (written next to the outputs);
  outputs are GIFs (they play in any browser) or PNGs, each with a contact sheet.
  Existing outputs are kept, so a re-run resumes. Returns the report's items:
  dicts with task, prompt, output, sheet, inputs, note."""
  s = config.sample
  out_dir = epath.Path(workdir) / "samples"
  (out_dir / "inputs").mkdir(parents=True, exist_ok=True)
  square, wide, tall = _demo_shapes(config)
  frames, height, width = square
  scene_a, caption_a = _demo_scene(config, 1, frames, height, width)
  scene_b, caption_b = _demo_scene(config, 2, frames, height, width)
  inputs = {"a.gif": scene_a, "b.gif": scene_b}
  for name, video in inputs.items():
    _atomic(str(out_dir / "inputs" / name), lambda tmp, v=video: video_io.write_video(tmp, v, s.fps))
  _atomic(str(out_dir / "inputs" / "a_first.png"), lambda tmp: video_io.write_png(tmp, scene_a[0]))
  a, b, a_first = (str(out_dir / "inputs" / n) for n in ("a.gif", "b.gif", "a_first.png"))
  longer = 1 + 2 * (frames - 1)
  prompt = config.train.sample_prompts[0] if config.train.sample_prompts else caption_a
  size = dict(height=height, width=width)
  jobs = [
      ("t2v", "t2v_square.gif", prompt, dict(frames=frames, **size), [], "square"),
      ("t2i", "t2i.png", prompt, dict(frames=1, **size), [], "one frame"),
      ("i2v", "i2v.gif", caption_a, dict(frames=frames, image=scene_a[0], **size), [a_first],
       "the first frame is given"),
      ("extend-forward", "extend_forward.gif", caption_a, dict(frames=longer, video=scene_a, **size), [a],
       f"{frames} given frames continued to {longer}"),
      ("extend-backward", "extend_backward.gif", caption_a, dict(frames=longer, video=scene_a, **size), [a],
       f"{longer - frames} frames made before the input"),
      ("loop", "loop.gif", prompt, dict(frames=frames, **size), [], "the end leads back into the start"),
      ("edit", "edit.gif", _recolour(caption_a, tuple(config.moving_digits.colors)),
       dict(frames=frames, video=scene_a, strength=s.edit_strength, **size), [a],
       f"SDEdit at strength {s.edit_strength}"),
      ("connect", "connect.gif", f"{caption_a}, then {caption_b}",
       dict(frames=s.window_frames or frames, video=scene_a, video2=scene_b, **size), [a, b],
       "starts from the first clip's end, arrives at the second's start"),
  ]
  for i, (name, shape) in enumerate((("wide", wide), ("vertical", tall))):
    if shape is not None:
      jobs.insert(1 + i, ("t2v", f"t2v_{name}.gif", prompt, dict(frames=shape[0], height=shape[1], width=shape[2]), [],
                      f"{name} {shape[2]}x{shape[1]}"))
  engine = None
  items = []
  for task, file_name, text, kwargs, input_paths, note in progress(jobs, total=len(jobs), desc="sample tasks"):
    out = out_dir / file_name
    if not out.exists():
      engine = engine or Engine.from_workdir(config, workdir, mesh)
      generation = generate(engine, task, [text], seed=config.seed, steps=s.steps, sampler=s.sampler,
                            guidance=s.guidance, **kwargs)
      if is_chief():
        write_outputs(str(out), generation, s.fps)
    items.append(dict(task=task, prompt=text, output=str(out), sheet=sheet_path(out), inputs=input_paths, note=note))
  return items


def demo_probe(config, workdir, mesh, count: int = 20):
  """The demo's sample-quality figures: t2v for `count` probe prompts, scored against
  them and against the scorer's reading of true clips of the same size. Writes
  W/samples/probe.sheet.png and W/eval/probe_scores.json (kept: a re-run reads it).
  Returns (report item, honest-summary lines); (None, []) off the moving_digits world."""
  if config.data.builder != "moving_digits" or config.sample.frames == 1:
    return None, []
  s = config.sample
  sheet = epath.Path(workdir) / "samples" / "probe.sheet.png"
  scores = epath.Path(workdir) / "eval" / "probe_scores.json"
  if scores.exists() and sheet.exists():
    saved = json.loads(scores.read_text())
  else:
    result = score_probe(config, Engine.from_workdir(config, workdir, mesh), count)
    truth = digit_score.reference(s.frames, s.height, s.width, config.moving_digits)
    saved = dict(samples=digit_score.headline(result), true_clips=digit_score.headline(truth),
                 rows=result["rows"], steps=s.steps, guidance=s.guidance)
    if is_chief():
      scores.parent.mkdir(parents=True, exist_ok=True)
      _atomic(str(sheet), lambda tmp: video_io.write_png(tmp, contact_sheet(result["videos"], np.zeros(s.frames, bool))))
      _atomic(str(scores), lambda tmp: epath.Path(tmp).write_text(json.dumps(saved, indent=2) + "\n"))
  samples, truth = saved["samples"], saved["true_clips"]
  note = (f"Scored automatically (vidsim/digit_score.py) on {samples['clips']} one-digit probe prompts: "
          f"{digit_score.summary(samples)}. The same scorer on true clips of this size reads "
          f"digit {truth['digit']:.2f}, colour {truth['color']:.2f}, direction {truth['direction']:.2f}; "
          f"chance is about 0.10, 0.12 and 0.25.")
  item = dict(task="t2v probe", prompt=f"{samples['clips']} prompts: digit i % 10, direction and colour in turn",
              output=str(sheet), sheet="", inputs=[], note=digit_score.summary(samples))
  return item, [note]

