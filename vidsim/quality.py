"""Reconstruction quality of [-1, 1] videos: one PSNR for training metrics, hooks and evaluation.

PSNR is taken of the mean squared error pooled over every value given (all clips,
frames and pixels), on the [0, 1] scale, with the reconstruction clipped to [-1, 1]
first. Pooling (not a mean of per-clip PSNRs) makes the figure of a whole split the
same whether it is computed in one batch or accumulated batch by batch.
"""

import jax.numpy as jnp


def squared_error_01(video, recon):
  """Squared errors of [-1, 1] videos on the [0, 1] scale (recon clipped), per value:
  sum them over any axes and divide by the count for a pooled MSE."""
  return ((jnp.clip(recon, -1.0, 1.0) - video) / 2.0) ** 2


def mse_01(video, recon):
  """Mean squared error of [-1, 1] videos on the [0, 1] scale (recon clipped)."""
  return jnp.mean(squared_error_01(video, recon))


def psnr_of_mse(mse):
  """PSNR in dB of a [0, 1]-scale mean squared error."""
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def psnr(video, recon):
  """PSNR in dB of the MSE pooled over everything in `video` and `recon`."""
  return psnr_of_mse(mse_01(video, recon))
