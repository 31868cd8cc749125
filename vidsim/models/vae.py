"""Causal 3D convolutional video VAE (Flax NNX): encoder, decoder, loss, FLOPs, latent stats.

Shapes: video [B, T, H, W, 3] in [-1, 1] <-> latents [B, t, h, w, c] with
t = 1 + (T - 1) / ct and h, w = H / cs, W / cs. The first frame is encoded on its
own, so an image (T = 1) is a one-frame video with one latent frame.

Causality: every conv pads time only at the front, with copies of the first frame
(`vae.causal_padding = "replicate"`, the default, so the first frame looks like a
still video) or zeros. Norms take statistics within each frame (FrameNorm) and
attention runs within a frame, so nothing mixes information backwards in time.

Temporal chunks: `encode_chunk` / `decode_chunk` take and return the causal state
(each time conv's last input frames), so a long video can be processed chunk by
chunk with the same result as one pass (see vae_tiling.py).
"""

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidsim.config import base_config
from vidsim.errors import UsageError
from vidsim.models import attention
from vidsim.mesh import constrain

VALID_TEMPORAL = (1, 2, 4)
VALID_SPATIAL = (4, 8, 16)
_LOGVAR_RANGE = (-30.0, 20.0)  # Keeps exp(logvar) finite early in training.

# ------------------------------------------------------------------ shapes and policy


def check_config(config) -> None:
  """Raises UsageError when config.vae is not a buildable VAE."""
  v = config.vae
  if v.temporal_compression not in VALID_TEMPORAL:
    raise UsageError(f"vae.temporal_compression={v.temporal_compression}; valid: {VALID_TEMPORAL}")
  if v.spatial_compression not in VALID_SPATIAL:
    raise UsageError(f"vae.spatial_compression={v.spatial_compression}; valid: {VALID_SPATIAL}")
  levels = int(math.log2(v.spatial_compression)) + 1
  if len(v.widths) != levels:
    raise UsageError(
        f"vae.widths={tuple(v.widths)} has {len(v.widths)} levels; spatial_compression="
        f"{v.spatial_compression} needs log2(cs)+1 = {levels} widths"
    )
  if v.causal_padding not in ("replicate", "zeros"):
    raise UsageError(f"vae.causal_padding={v.causal_padding!r}; valid: replicate, zeros")
  if v.dtype not in ("float32", "bfloat16"):
    raise UsageError(f"vae.dtype={v.dtype!r}; valid: float32, bfloat16")
  if v.blocks_per_level < 0 or v.latent_channels < 1:
    raise UsageError("vae.blocks_per_level must be >= 0 and vae.latent_channels >= 1")


def _nearest(value, step, offset=0):
  """The valid sizes offset + k*step (k >= 0, size >= 1) just below and above value."""
  below = offset + max((value - offset) // step, 0) * step
  if below < 1:
    below += step
  above = below if below >= value else below + step
  return sorted({below, above})


def check_video_shape(config, frames: int, height: int, width: int) -> None:
  """Bad-input policy (issue 4 item 5): a clip whose size the VAE cannot tile exactly is
  an error naming the dimension and the nearest valid sizes, never silently cropped.

  Valid: frames = 1 + k*ct (k >= 0), height and width positive multiples of cs.
  """
  ct, cs = config.vae.temporal_compression, config.vae.spatial_compression
  problems = []
  if frames < 1 or (frames - 1) % ct:
    problems.append(f"frames={frames} is not 1 + k*{ct} (nearest valid: {_nearest(frames, ct, 1)})")
  for name, size in (("height", height), ("width", width)):
    if size < cs or size % cs:
      problems.append(f"{name}={size} is not a multiple of {cs} (nearest valid: {_nearest(size, cs)})")
  if problems:
    raise UsageError(
        f"video of shape (T={frames}, H={height}, W={width}) does not fit the VAE "
        f"(temporal_compression={ct}, spatial_compression={cs}): " + "; ".join(problems)
    )


def latent_shape(config, frames: int, height: int, width: int):
  """(t, h, w, c) of the latents of a (frames, height, width) clip."""
  check_video_shape(config, frames, height, width)
  ct, cs = config.vae.temporal_compression, config.vae.spatial_compression
  return (1 + (frames - 1) // ct, height // cs, width // cs, config.vae.latent_channels)


def pixel_shape(config, t: int, h: int, w: int):
  """(T, H, W) of the clip that decodes from a (t, h, w) latent grid."""
  if t < 1 or h < 1 or w < 1:
    raise UsageError(f"latent grid (t={t}, h={h}, w={w}) must be at least 1 in every dimension")
  ct, cs = config.vae.temporal_compression, config.vae.spatial_compression
  return (1 + (t - 1) * ct, h * cs, w * cs)


# ------------------------------------------------------------------ FLOP recording

# While set, every layer appends a record here while traced (vae_flops, receptive_radius):
# dict(kind, flops, radius = spatial kernel reach in input positions, width = input width).
_LAYER_LOG = contextvars.ContextVar("vae_layer_log", default=None)


@contextlib.contextmanager
def _recording_layers():
  log = []
  token = _LAYER_LOG.set(log)
  try:
    yield log
  finally:
    _LAYER_LOG.reset(token)


def _record(kind, flops=0.0, radius=0, width=0):
  log = _LAYER_LOG.get()
  if log is not None:
    log.append({"kind": kind, "flops": float(flops), "radius": radius, "width": width})


# ------------------------------------------------------------------ causal state


class ChunkState:
  """Causal state between temporal chunks: each time conv's trailing input frames,
  in call order (the module tree runs its convs in the same order every call)."""

  def __init__(self, previous=None):
    self.previous = None if previous is None else list(previous)
    self.next = []

  @property
  def first_chunk(self) -> bool:
    return self.previous is None

  def take(self):
    return None if self.previous is None else self.previous[len(self.next)]

  def put(self, frames):
    self.next.append(frames)


# ------------------------------------------------------------------ layers


def _dtype(config):
  return jnp.bfloat16 if config.vae.dtype == "bfloat16" else jnp.float32


class CausalConv(nnx.Module):
  """Conv over (T, H, W), causal in time, 'same' in space (stride 1 or 2).

  Computed as a sum over time taps of 2D convs on (B*T) frames: on XLA:CPU this is
  ~3x faster than conv_general_dilated with 3 spatial dims (measured, 9x32x32x32).
  """

  def __init__(self, cin, cout, kernel, stride=(1, 1, 1), *, config, rngs, out_axis="conv_out"):
    self.kernel_size = tuple(kernel)
    self.stride = tuple(stride)
    self.replicate = config.vae.causal_padding == "replicate"
    self.dtype = _dtype(config)
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, None, "conv_in", out_axis))
    self.kernel = nnx.Param(init(rngs.params(), (*kernel, cin, cout)))
    self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, (out_axis,))(rngs.params(), (cout,)))

  def __call__(self, x, state: ChunkState):
    kt, kh, kw = self.kernel_size
    st, sh, sw = self.stride
    if kt > 1 or st > 1:
      cache = state.take()
      if cache is None:
        pad = x[:, :1] if self.replicate else jnp.zeros_like(x[:, :1])
        x = jnp.concatenate([jnp.repeat(pad, kt - 1, axis=1), x], axis=1)
      else:
        x = jnp.concatenate([cache, x], axis=1)
      keep = kt - st  # Input frames the next chunk's first outputs still need.
      state.put(x[:, x.shape[1] - keep :])
    b, t, h, w, cin = x.shape
    t_out = (t - kt) // st + 1
    kernel = self.kernel[...].astype(self.dtype)
    pads = [((k - s) // 2, (k - s) - (k - s) // 2) for k, s in ((kh, sh), (kw, sw))]
    y = None
    for tap in range(kt):
      frames = x[:, tap : tap + (t_out - 1) * st + 1 : st].astype(self.dtype)
      out = jax.lax.conv_general_dilated(
          frames.reshape(b * t_out, h, w, cin), kernel[tap], (sh, sw), pads,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      y = out if y is None else y + out
    y = y.reshape(b, t_out, *y.shape[1:]) + self.bias[...].astype(self.dtype)
    _record("conv", 2 * kt * kh * kw * cin * y.shape[-1] * math.prod(y.shape[:-1]), radius=kw // 2, width=w)
    return y


class FrameNorm(nnx.Module):
  """Group norm within each frame: statistics over (H, W, channels of a group) of one
  frame, never across time, so the encoder stays causal.

  A per-pixel norm over channels alone (tried first: exact under spatial tiling)
  erases each pixel's magnitude; on moving digits, mostly black, the VAE then cannot
  even overfit one batch (17 dB, the all-black score). Per-frame statistics learn
  (22.7 dB after 200 steps on the same batch) at the price of spatial tiles that are
  only approximately equal to the untiled pass (see vae_tiling.py).
  """

  def __init__(self, channels, *, rngs, groups=8):
    self.groups = math.gcd(groups, channels)
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("norm",))(rngs.params(), (channels,)))
    self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("norm",))(rngs.params(), (channels,)))

  def __call__(self, x):
    # Per-channel means first, then groups of those small [B, T, C] stats: reshaping the
    # full activation into (groups, channels per group) made XLA:CPU's reductions and
    # their gradients several times slower. Two passes (mean, then squared deviations):
    # E[x^2] - E[x]^2 loses the variance when the mean is large against the spread, and
    # a run trained with it blew up.
    b, t, h, w, c = x.shape
    x32 = x.astype(jnp.float32)
    per_channel = lambda s: jnp.repeat(s, c // self.groups, axis=-1)[:, :, None, None]
    group_mean = lambda s: jnp.mean(s.reshape(b, t, self.groups, -1), axis=-1)
    centred = x32 - per_channel(group_mean(jnp.mean(x32, axis=(2, 3))))
    var = group_mean(jnp.mean(jnp.square(centred), axis=(2, 3)))
    y = centred * per_channel(jax.lax.rsqrt(var + 1e-6))
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResBlock(nnx.Module):
  def __init__(self, cin, cout, time_kernel, *, config, rngs):
    k = (time_kernel, 3, 3)
    self.norm1 = FrameNorm(cin, rngs=rngs)
    self.conv1 = CausalConv(cin, cout, k, config=config, rngs=rngs)
    self.norm2 = FrameNorm(cout, rngs=rngs)
    self.conv2 = CausalConv(cout, cout, k, config=config, rngs=rngs)
    self.skip = CausalConv(cin, cout, (1, 1, 1), config=config, rngs=rngs) if cin != cout else None

  def __call__(self, x, state):
    h = self.conv1(jax.nn.silu(self.norm1(x)), state)
    h = self.conv2(jax.nn.silu(self.norm2(h)), state)
    return (x if self.skip is None else self.skip(x, state)) + h


class FrameAttention(nnx.Module):
  """Single-head self-attention over the positions of each frame (causal-safe)."""

  def __init__(self, channels, *, config, rngs):
    self.impl = attention.check_impl(config.vae.attention_impl, "vae.attention_impl")
    self.norm = FrameNorm(channels, rngs=rngs)
    self.qkv = CausalConv(channels, 3 * channels, (1, 1, 1), config=config, rngs=rngs)
    self.proj = CausalConv(channels, channels, (1, 1, 1), config=config, rngs=rngs)

  def __call__(self, x, state):
    b, t, h, w, c = x.shape
    q, k, v = jnp.split(self.qkv(self.norm(x), state).reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
    every = jnp.ones((b * t, h * w), jnp.int32)  # One segment per frame: no padding.
    y = attention.attend(q, k, v, every, every, impl=self.impl, context_parallel=None).reshape(b, t, h, w, c)
    _record("attention", 2 * 2 * b * t * (h * w) ** 2 * c)  # QK^T and AV.
    return x + self.proj(y, state)


def _time_kernels(config):
  """Time taps per level: (1,3,3) spatial convs on the first `spatial_only_levels`
  (highest-resolution, most expensive) levels, causal 3x3x3 below."""
  levels = len(config.vae.widths)
  return [1 if level < config.vae.spatial_only_levels else 3 for level in range(levels)]


def _halves_time(config, stage):
  """Whether the downsampling stage from level `stage` to `stage + 1` also halves time."""
  return stage < int(math.log2(config.vae.temporal_compression))


class Encoder(nnx.Module):
  def __init__(self, config, *, rngs):
    widths, kts = list(config.vae.widths), _time_kernels(config)
    self.conv_in = CausalConv(3, widths[0], (kts[0], 3, 3), config=config, rngs=rngs)
    self.blocks, self.downs = nnx.List(), nnx.List()
    for level, width in enumerate(widths):
      self.blocks.append(
          nnx.List([ResBlock(width, width, kts[level], config=config, rngs=rngs) for _ in range(config.vae.blocks_per_level)])
      )
      if level + 1 < len(widths):
        halve = _halves_time(config, level)
        kernel, stride = ((3, 3, 3), (2, 2, 2)) if halve else ((kts[level], 3, 3), (1, 2, 2))
        self.downs.append(CausalConv(width, widths[level + 1], kernel, stride, config=config, rngs=rngs))
    self.attention = FrameAttention(widths[-1], config=config, rngs=rngs) if config.vae.attention else None
    self.norm_out = FrameNorm(widths[-1], rngs=rngs)
    self.conv_out = CausalConv(widths[-1], 2 * config.vae.latent_channels, (kts[-1], 3, 3), config=config, rngs=rngs)

  def __call__(self, x, state):
    x = self.conv_in(x, state)
    for level, blocks in enumerate(self.blocks):
      for block in blocks:
        x = block(x, state)
      if level < len(self.downs):
        x = constrain(self.downs[level](x, state), "batch", None, None, None, None)
    if self.attention is not None:
      x = self.attention(x, state)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), state)


class Decoder(nnx.Module):
  def __init__(self, config, *, rngs):
    widths, kts = list(config.vae.widths), _time_kernels(config)
    self.conv_in = CausalConv(config.vae.latent_channels, widths[-1], (kts[-1], 3, 3), config=config, rngs=rngs)
    self.attention = FrameAttention(widths[-1], config=config, rngs=rngs) if config.vae.attention else None
    self.blocks, self.time_ups, self.ups = nnx.List(), nnx.List(), nnx.List()
    for level in reversed(range(len(widths))):
      width = widths[level]
      self.blocks.append(
          nnx.List([ResBlock(width, width, kts[level], config=config, rngs=rngs) for _ in range(config.vae.blocks_per_level)])
      )
      if level > 0:
        # Time: a causal conv to 2x channels, then channels -> two frames (depth-to-space).
        halve = _halves_time(config, level - 1)
        self.time_ups.append(CausalConv(width, 2 * width, (3, 3, 3), config=config, rngs=rngs) if halve else None)
        self.ups.append(CausalConv(width, widths[level - 1], (kts[level - 1], 3, 3), config=config, rngs=rngs))
    self.norm_out = FrameNorm(widths[0], rngs=rngs)
    # 3 RGB outputs do not split over an fsdp axis, so the output channel stays unsharded.
    self.conv_out = CausalConv(widths[0], 3, (kts[0], 3, 3), config=config, rngs=rngs, out_axis=None)

  def __call__(self, z, state):
    x = self.conv_in(z, state)
    if self.attention is not None:
      x = self.attention(x, state)
    for i, blocks in enumerate(self.blocks):
      for block in blocks:
        x = block(x, state)
      if i < len(self.ups):
        if self.time_ups[i] is not None:
          x = self.time_ups[i](x, state)
          b, t, h, w, c2 = x.shape
          x = x.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
          if state.first_chunk:
            x = x[:, 1:]  # Latent frame 0 stands for pixel frame 0 alone.
        b, t, h, w, c = x.shape
        _record("upsample", radius=1, width=w)  # Nearest: an output reaches 1 input position.
        x = jnp.broadcast_to(x[:, :, :, None, :, None], (b, t, h, 2, w, 2, c)).reshape(b, t, 2 * h, 2 * w, c)
        x = constrain(self.ups[i](x, state), "batch", None, None, None, None)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), state)


# ------------------------------------------------------------------ the model


class VideoVAE(nnx.Module):
  """The causal video VAE of config.vae. Build it under `mesh.activate(...)` for sharded
  params; outside a mesh it is built unsharded (the logical names are still recorded).

  Encoder: conv_in, then per level `blocks_per_level` residual blocks and a stride-2
  conv to the next level (the first log2(ct) of them also stride 2 in time, a causal
  3-tap window), then conv_out to (mean, logvar). Decoder mirrors it: time is doubled
  by a causal conv to 2x channels split into two frames (the first dropped, so latent
  frame 0 decodes to frame 0 alone), space by nearest upsampling and a conv.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    check_config(config)
    self.temporal_compression = config.vae.temporal_compression
    self.spatial_compression = config.vae.spatial_compression
    self.latent_channels = config.vae.latent_channels
    no_mesh = jax.sharding.get_abstract_mesh().empty
    with nnx.use_eager_sharding(False) if no_mesh else contextlib.nullcontext():
      self.encoder = Encoder(config, rngs=rngs)
      self.decoder = Decoder(config, rngs=rngs)

  def _check(self, video):
    if video.ndim != 5 or video.shape[-1] != 3:
      raise UsageError(f"VideoVAE expects video [B, T, H, W, 3], got shape {tuple(video.shape)}")

  def encode_chunk(self, video, state=None):
    """One temporal chunk -> (mean, logvar, state). `state` is None for the first chunk,
    else what the previous chunk returned; chunks after the first hold k*ct frames."""
    chunk = ChunkState(state)
    moments = self.encoder(video, chunk).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE), chunk.next

  def decode_chunk(self, z, state=None):
    """One temporal chunk of latents -> (video, state), like encode_chunk."""
    chunk = ChunkState(state)
    return self.decoder(z, chunk).astype(jnp.float32), chunk.next

  def encode(self, video):
    """video [B, T, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, t, h, w, c]."""
    self._check(video)
    _, t, h, w, _ = video.shape
    if (t - 1) % self.temporal_compression or h % self.spatial_compression or w % self.spatial_compression:
      raise UsageError(
          f"video shape {tuple(video.shape)}: frames must be 1 + k*{self.temporal_compression} and "
          f"height/width multiples of {self.spatial_compression} (use vae.check_video_shape for nearest sizes)"
      )
    mean, logvar, _ = self.encode_chunk(video)
    return mean, logvar

  def decode(self, z):
    """z [B, t, h, w, c] -> video [B, 1 + (t-1)*ct, h*cs, w*cs, 3]."""
    if z.ndim != 5 or z.shape[-1] != self.latent_channels:
      raise UsageError(f"VideoVAE.decode expects latents [B, t, h, w, {self.latent_channels}], got {tuple(z.shape)}")
    return self.decode_chunk(z)[0]

  def __call__(self, video, rng):
    """Encode, sample the posterior with `rng`, decode: (recon, mean, logvar)."""
    mean, logvar = self.encode(video)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar


# ------------------------------------------------------------------ loss


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over latent elements."""
  return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def psnr(recon, video):
  """Mean over clips of PSNR in dB, with [-1, 1] mapped to [0, 1] and recon clipped."""
  err = jnp.square((jnp.clip(recon, -1.0, 1.0) - video) / 2.0)
  mse = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def vae_loss(model, video, rng, config):
  """loss = recon (L1 or L2 per pixel) + kl_weight * KL (per latent element)
  [+ frame_diff_weight * L1 of frame differences]. Returns (loss, metrics)."""
  recon, mean, logvar = model(video, rng)
  diff = recon.astype(jnp.float32) - video.astype(jnp.float32)
  kind = config.vae_train.recon_loss
  if kind == "l1":
    recon_loss = jnp.mean(jnp.abs(diff))
  elif kind == "l2":
    recon_loss = jnp.mean(jnp.square(diff))
  else:
    raise UsageError(f"vae_train.recon_loss={kind!r}; valid: l1, l2")
  kl = kl_divergence(mean, logvar)
  loss = recon_loss + config.vae_train.kl_weight * kl
  metrics = {"recon": recon_loss, "kl": kl}
  if config.vae_train.frame_diff_weight > 0:
    # Matches motion, which a per-pixel loss underweights when most pixels are static.
    frame_diff = jnp.mean(jnp.abs(diff[:, 1:] - diff[:, :-1])) if video.shape[1] > 1 else jnp.zeros(())
    loss = loss + config.vae_train.frame_diff_weight * frame_diff
    metrics["frame_diff"] = frame_diff
  metrics["psnr"] = jax.lax.stop_gradient(psnr(recon, video))
  metrics["loss"] = loss
  return loss, metrics


# ------------------------------------------------------------------ FLOPs


def vae_flops(config, frames: int, height: int, width: int, train: bool = True) -> float:
  """Model FLOPs of one clip through encode + decode: per conv 2 * kernel volume * Cin *
  Cout * output positions, plus attention's QK^T and AV matmuls; norms and activations
  not counted. A train step counts 3x the forward (forward + backward)."""
  check_video_shape(config, frames, height, width)
  vae_key = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(config.vae.items()))
  forward = _forward_flops(vae_key, frames, height, width)
  return 3.0 * forward if train else forward


@functools.lru_cache(maxsize=256)
def _forward_flops(vae_key, frames, height, width):
  # Cached: tracing the model takes ~0.3 s, and training loops ask once per batch.
  config = base_config()
  for key, value in vae_key:
    config.vae[key] = value
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoVAE(config, rngs=nnx.Rngs(0))))
  video = jax.ShapeDtypeStruct((1, frames, height, width, 3), jnp.float32)
  with _recording_layers() as log:
    jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v, jax.random.key(0)), state, video)
  return sum(layer["flops"] for layer in log)


def receptive_radius(config) -> int:
  """Pixels of context on each side that the convs of encode or decode reach (an upper
  bound, rounded up to cs): the useful tiling `halo`. Beyond it only the per-frame norm
  statistics differ between a tile and the whole frame. Attention: -1 (unbounded)."""
  if config.vae.attention:
    return -1
  cs = config.vae.spatial_compression
  size = 8 * cs
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoVAE(config, rngs=nnx.Rngs(0))))
  video = jax.ShapeDtypeStruct((1, 1, size, size, 3), jnp.float32)
  latents = jax.ShapeDtypeStruct((1, 1, size // cs, size // cs, config.vae.latent_channels), jnp.float32)
  reach = []
  for run, inp in ((lambda m, x: m.encode(x), video), (lambda m, x: m.decode(x), latents)):
    with _recording_layers() as log:
      jax.eval_shape(lambda s, x, run=run: run(nnx.merge(graphdef, s), x), state, inp)
    # A layer reading an input of width w reaches radius * (size / w) pixels.
    reach.append(sum(layer["radius"] * size / layer["width"] for layer in log if layer["radius"]))
  return int(math.ceil(max(reach) / cs) * cs)


# ------------------------------------------------------------------ latent statistics


def latent_stats_from_sums(mean_sum, mean_sq_sum, variance_sum, count):
  """Per-channel (shift, scale) of posterior samples z = mean + std * eps from running
  sums over `count` latent positions of mean, mean^2 and exp(logvar):
  var(z) = var(mean) + E[std^2], so (z - shift) / scale has zero mean and unit variance.
  Sums (not arrays of latents) so callers can stream over any number of batches."""
  mean_sum, mean_sq_sum, variance_sum = (np.asarray(x, np.float64) for x in (mean_sum, mean_sq_sum, variance_sum))
  shift = mean_sum / count
  variance = np.maximum(mean_sq_sum / count - shift**2, 0.0) + variance_sum / count
  return shift.astype(np.float32), np.sqrt(np.maximum(variance, 1e-12)).astype(np.float32)
