"""Which clip sizes the models can make, and the nearest valid ones when a size is not.

The VAE maps T frames to 1 + (T-1)/ct latent frames (T = 1 + k*ct) and H x W pixels
to H/cs x W/cs; the DiT then cuts the latent grid into (pt, ph, pw) patches. Every
"nearest valid size" message in vidsim comes from `nearest` here.
"""

from vidsim.errors import UsageError


def nearest(value: int, step: int, offset: int = 0) -> list:
  """The valid sizes offset + k*step (k >= 0, size >= 1) just below and above `value`
  (one size when `value` is valid)."""
  below = offset + max((value - offset) // step, 0) * step
  if below < 1:
    below += step
  above = below if below >= value else below + step
  return sorted({below, above})


def choices(values) -> str:
  return " or ".join(str(v) for v in values)


def latent_frames(config, frames: int) -> int:
  """Latent frames of a clip of `frames` pixel frames (causal VAE: the first is alone)."""
  return 1 + (frames - 1) // config.vae.temporal_compression


def usable_frames(config, frames: int) -> int:
  """The longest prefix of a `frames`-frame clip that the VAE and the DiT's temporal
  patch can take whole (0 when none)."""
  pt = int(config.dit.patch_size[0])
  t = latent_frames(config, frames) if frames >= 1 else 0
  t -= t % pt
  return 1 + (t - 1) * config.vae.temporal_compression if t >= 1 else 0


def check_output_size(config, frames: int, height: int, width: int):
  """The latent grid (t, h, w, c) of a generated clip of this size, or a UsageError with
  the nearest valid sizes.

  Valid: frames = 1 + k*ct with a latent frame count divisible by pt; height and width
  multiples of cs * ph (cs * pw)."""
  ct, cs = config.vae.temporal_compression, config.vae.spatial_compression
  pt, ph, pw = (int(p) for p in config.dit.patch_size)
  problems = []
  if frames < 1 or (frames - 1) % ct or latent_frames(config, frames) % pt:
    # Valid frame counts: 1 + (m*pt - 1)*ct for m >= 1.
    problems.append(f"--frames {frames} -> nearest valid: {choices(nearest(frames, pt * ct, 1 + (pt - 1) * ct))}")
  for flag, size, step in (("--height", height, cs * ph), ("--width", width, cs * pw)):
    if size < step or size % step:
      problems.append(f"{flag} {size} -> nearest valid: {choices(nearest(size, step))} (multiples of {step})")
  if problems:
    raise UsageError(
        f"size (frames={frames}, height={height}, width={width}) cannot be made by the VAE "
        f"(temporal x{ct}, spatial x{cs}) with dit.patch_size {tuple(config.dit.patch_size)}: "
        + "; ".join(problems)
    )
  return (latent_frames(config, frames), height // cs, width // cs, config.vae.latent_channels)
