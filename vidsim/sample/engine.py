"""The sampling engine: text -> packed rows -> one jitted ODE with CFG over the mesh -> VAE decode.

`Engine` holds a DiT and a VAE (from a workdir's checkpoints, or training's live EMA
weights) and turns windows of given and generated latent frames into latents;
`generate` runs any task of the registry (vidsim/tasks.py) through it. Latents are
normalised (z - shift) / scale for the DiT and denormalised before decoding, as in
the latent cache.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vidsim import flow
from vidsim import mesh as mesh_lib
from vidsim import patches, sizes
from vidsim import tasks as tasks_lib
from vidsim import text_cache
from vidsim.errors import UsageError
from vidsim.log import get_logger
from vidsim.models import t5_loader
from vidsim.models import text as text_lib
from vidsim.models import vae_tiling
from vidsim.trained import TrainedDiT, TrainedVAE

log = get_logger("sample")


class Engine:
  """A DiT and a VAE ready to generate: windows -> latents (jitted ODE, CFG, mesh), video <-> latents.

  dit_params may be sharded jax.Arrays (training's EMA) or host arrays; vae_* come
  from TrainedVAE (host params, per-channel shift and scale)."""

  def __init__(self, config, mesh, dit_graphdef, dit_params, vae_graphdef, vae_params, shift, scale):
    self.text_encoder = None  # bytes: the DiT encodes the prompt itself.
    if config.text.encoder == "precomputed":
      if not config.text.t5_path:
        raise UsageError(
            "sampling with text.encoder='precomputed' embeds each prompt with the encoder the training "
            "captions were embedded with: set text.t5_path to its directory"
        )
      self.text_encoder = t5_loader.load_text_encoder(config, mesh)
    self.config, self.mesh = config, mesh
    self.dit_graphdef, self.dit_params = dit_graphdef, dit_params
    self.vae_graphdef, self.vae_params = vae_graphdef, vae_params
    self.shift = np.asarray(shift, np.float32)
    self.scale = np.asarray(scale, np.float32)
    self.patch_size = tuple(int(p) for p in config.dit.patch_size)
    self._ode, self._encode, self._decode = _compiled(config, dit_graphdef, vae_graphdef)

  @classmethod
  def from_workdir(cls, config, workdir, mesh):
    if config.text.encoder == "precomputed" and (text_cache.text_dir(workdir) / "manifest.json").exists():
      text_cache.load_manifest(workdir, config)  # Refuses a text.t5_path other than the one training saw.
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
    n, length = x_init.shape[:2]
    rows = dict(
        eps=eps, x_init=x_init, clean=clean, x_clean=x_init,
        positions=np.broadcast_to(positions, (n, length, 3)),
        segment_ids=np.ones((n, length), np.int32),
        **{k: v[:, None] for k, v in self.prompt_text(prompts).items()},  # One text slot per row.
    )
    tokens = self._run_rows(rows, steps=steps, sampler=sampler, guidance=float(guidance), start_t=float(start_t))
    # The ODE holds given tokens bit for bit; (un)patchify only moves values, so the
    # given latent frames come back exactly (tested).
    return np.asarray(patches.unpatchify_batch(jnp.asarray(tokens), self.patch_size, grid_shape))

  def prompt_text(self, prompts) -> dict:
    """The text features of prompts, as the text encoder of the DiT reads them: byte tokens, or
    the embeddings of text.t5_path (float32 [N, S, E]); with text_mask [N, S]."""
    if self.text_encoder is None:
      ids, mask = text_lib.tokenize_bytes(list(prompts), self.config.text.max_length)
      return {"text_tokens": ids, "text_mask": mask}
    embeddings, mask = self.text_encoder.embed(list(prompts))
    return {"text_embeddings": embeddings, "text_mask": mask}

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
      text = {k: batch[k] for k in ("text_tokens", "text_embeddings", "text_mask") if k in batch}
      tokens = self._ode(self.dit_params, batch["eps"], batch["x_init"], batch["clean"], batch["x_clean"],
                         batch["positions"], batch["segment_ids"], text, **static)
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


def _ode(config, graphdef, params, eps, x_init, clean, x_clean, positions, segment_ids, text,
         *, steps, sampler, guidance, start_t):
  """Rows of tokens -> sampled tokens: CFG velocity (both branches in one pass) in one fori_loop.
  text: the DiT's text dict (text_tokens or text_embeddings, and text_mask), one slot per row."""

  def model_fn(x, t, drop_text, rows):
    pos, seg, row_text = rows
    # Merged here, inside the ODE loop body: NNX modules must live at the trace level they run in.
    model = nnx.merge(graphdef, params)
    # One sample a row: never in dit.segment_blocks' blocks, so the general path alone is
    # compiled (the "auto" choice would compile the blocked one too and check every step).
    return model(x, t, pos, seg, row_text, drop_text, path="dense")

  velocity = flow.cfg_velocity(model_fn, guidance, row_inputs=(positions, segment_ids, text))
  t_grid = flow.sample_time_grid(steps, x_init.shape[1], config, start_t)
  x_T = flow.noise_tokens(x_init, eps, start_t)  # start_t = 1: pure noise.
  return flow.sample_ode(velocity, x_T, t_grid, clean, x_clean, sampler)


@dataclasses.dataclass
class Generation:
  """What a task made: videos uint8 [N, T, H, W, 3], normalised latents [N, t, h, w, c],
  and which frames were given as conditions (bool [T] pixel frames, bool [t] latent frames).
  A loop's videos leave out the first pixel frame its latents decode to (tasks.loop)."""

  videos: np.ndarray
  latents: np.ndarray
  given: np.ndarray
  given_latent: np.ndarray


def generate(engine: Engine, task: str, prompts, *, frames: int, height: int, width: int, seed: int = 0,
             steps: int = 30, sampler: str = "euler", guidance: float = 4.0, image=None, video=None,
             video2=None, strength: float = 1.0, window_frames: int = 0, overlap: int = 0) -> Generation:
  """Runs one task for len(prompts) samples. Inputs are uint8: image [H, W, 3], video and
  video2 [T, H, W, 3], already of a valid size (vidsim/sample/command.py checks them).

  frames: the output length of t2v, t2i and i2v; the total length of an extension;
  the t2v clip length of loop; the window length of connect; edit keeps the source's. window_frames (pixel
  frames, 0 = config.sample.window_frames or sample.frames) sets the sliding window
  of extend and loop's bridge; overlap is in latent frames (0 = auto).
  """
  config = engine.config
  spec = tasks_lib.get(task)
  prompts = list(prompts)
  if spec.length == "source":
    frames = len(video)  # An edit keeps its source's length.
  for name, source in (("image", image), ("video", video), ("video2", video2)):
    if source is not None and tuple(source.shape[-3:-1]) != (height, width):
      raise UsageError(f"{name} is {source.shape[-3]}x{source.shape[-2]} (HxW); this generation is {height}x{width}")
  grid = sizes.check_output_size(config, frames, height, width)
  window_frames = window_frames or config.sample.window_frames or config.sample.frames
  if spec.windowed:
    sizes.check_output_size(config, window_frames, height, width)
  calls = iter(range(1 << 30))
  base_key = jax.random.key(seed)

  def sample(windows):
    # Each window of a task gets fresh noise: key = fold_in(seed, call index).
    key = jax.random.fold_in(base_key, next(calls))
    return engine.sample_windows(windows, prompts, key, steps=steps, sampler=sampler, guidance=guidance)

  def encode(clip):
    return np.repeat(engine.encode(clip[None]), len(prompts), axis=0)

  result = spec.run(tasks_lib.TaskRun(
      grid=grid, window=sizes.latent_frames(config, window_frames), overlap=overlap, strength=strength,
      num_samples=len(prompts), sample=sample, encode=encode, image=image, video=video, video2=video2))
  drop = result.drop_first_frames
  videos = engine.decode(result.latents)[:, drop:]
  given = tasks_lib.pixel_given(result.given, config.vae.temporal_compression)[drop:]
  return Generation(videos, result.latents, given, result.given)
