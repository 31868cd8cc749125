"""Spacetime patches: latent grids (t, h, w, c) <-> tokens with integer (t, h, w) positions.

A grid is cut into non-overlapping (pt, ph, pw) patches in (t, h, w) row-major
order; each token holds its patch flattened as (pt, ph, pw, c), so
P = pt * ph * pw * c features per token. `positions[i]` is token i's index in the
patch grid (t / pt, h / ph, w / pw), which 3D RoPE reads.

`patchify` / `unpatchify` work on one numpy grid (the data pipeline);
`patchify_batch` / `unpatchify_batch` are jax-jittable and batched (sampling).
"""

import jax.numpy as jnp
import numpy as np

from vidsim import sizes
from vidsim.errors import UsageError


def patch_grid_shape(grid_shape, patch_size) -> tuple:
  """(t, h, w) of the latent grid -> (t/pt, h/ph, w/pw), or a UsageError naming the fix."""
  grid_shape = tuple(int(s) for s in grid_shape[:3])
  patch_size = tuple(int(p) for p in patch_size)
  if len(patch_size) != 3 or min(patch_size) < 1:
    raise UsageError(f"dit.patch_size must be three positive ints (pt, ph, pw), got {patch_size}")
  bad = [(name, s, p) for name, s, p in zip("thw", grid_shape, patch_size) if s % p or s < p]
  if bad:
    hints = "; ".join(f"{name}={s} -> {sizes.choices(sizes.nearest(s, p))}" for name, s, p in bad)
    raise UsageError(
        f"latent grid (t, h, w) = {grid_shape} is not divisible by dit.patch_size {patch_size}; "
        f"nearest valid sizes: {hints}"
    )
  return tuple(s // p for s, p in zip(grid_shape, patch_size))


def grid_positions(patch_grid) -> np.ndarray:
  """int32 [n, 3]: the (t, h, w) index of every patch, in patchify order."""
  t, h, w = patch_grid
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([tt, hh, ww], axis=-1).reshape(-1, 3).astype(np.int32)


def _to_patches(xp, x, patch_size):
  """[B, t, h, w, c] -> [B, n, pt*ph*pw*c] with the array module xp (numpy or jax.numpy)."""
  b, t, h, w, c = x.shape
  pt, ph, pw = patch_size
  x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
  x = xp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
  return x.reshape(b, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def _from_patches(xp, tokens, grid_shape, patch_size):
  """[B, n, P] in patchify order -> [B, t, h, w, c]."""
  t, h, w, c = grid_shape
  pt, ph, pw = patch_size
  b = tokens.shape[0]
  x = tokens.reshape(b, t // pt, h // ph, w // pw, pt, ph, pw, c)
  x = xp.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))
  return x.reshape(b, t, h, w, c)


def patchify(grid, patch_size):
  """One latent grid [t, h, w, c] (numpy) -> (tokens [n, P], positions int32 [n, 3])."""
  grid = np.asarray(grid)
  if grid.ndim != 4:
    raise UsageError(f"patchify expects a latent grid [t, h, w, c], got shape {grid.shape}")
  patch_grid = patch_grid_shape(grid.shape, patch_size)
  tokens = _to_patches(np, grid[None], tuple(patch_size))[0]
  return tokens, grid_positions(patch_grid)


def unpatchify(tokens, positions, patch_size, grid_shape):
  """Tokens [n, P] -> the latent grid [t, h, w, c] (numpy).

  `positions` int [n, 3] places each token by its patch index, so tokens may come in
  any order (e.g. one segment cut out of a packed row); None means patchify order.
  """
  tokens = np.asarray(tokens)
  grid_shape = tuple(int(s) for s in grid_shape)
  pt_, ph_, pw_ = patch_grid = patch_grid_shape(grid_shape, patch_size)
  n = pt_ * ph_ * pw_
  features = int(np.prod(patch_size)) * grid_shape[3]
  if tokens.shape != (n, features):
    raise UsageError(
        f"unpatchify: tokens of shape {tokens.shape} do not make a grid {grid_shape} "
        f"with patch {tuple(patch_size)}; expected ({n}, {features})"
    )
  if positions is not None:
    positions = np.asarray(positions)
    flat = np.ravel_multi_index(tuple(positions.T), patch_grid)
    if len(np.unique(flat)) != n:
      raise UsageError(f"unpatchify: positions do not cover the patch grid {patch_grid} exactly once")
    ordered = np.empty_like(tokens)
    ordered[flat] = tokens
    tokens = ordered
  return _from_patches(np, tokens[None], grid_shape, tuple(patch_size))[0]


def patchify_batch(x, patch_size):
  """jax: [B, t, h, w, c] -> tokens [B, n, P] (positions: `grid_positions`)."""
  patch_grid_shape(x.shape[1:4], patch_size)
  return _to_patches(jnp, x, tuple(patch_size))


def unpatchify_batch(tokens, patch_size, grid_shape):
  """jax: tokens [B, n, P] in patchify order -> [B, t, h, w, c] for grid_shape (t, h, w, c)."""
  patch_grid_shape(grid_shape, patch_size)
  return _from_patches(jnp, tokens, tuple(int(s) for s in grid_shape), tuple(patch_size))
