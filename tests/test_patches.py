"""Patchify / unpatchify: round trips, positions, feature layout, bad shapes."""

import jax
import numpy as np
import pytest

from vidsim import patches
from vidsim.errors import UsageError

SHAPES = [
    ((1, 4, 4, 3), (1, 2, 2)),  # An image.
    ((3, 8, 6, 4), (1, 2, 2)),  # A wide-ish video.
    ((4, 6, 10, 2), (2, 2, 2)),  # Temporal patches.
    ((2, 3, 5, 1), (1, 1, 1)),  # One cell per token.
    ((6, 4, 12, 4), (3, 4, 3)),
]


def _grid(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("shape,patch", SHAPES)
def test_numpy_round_trip_and_token_count(shape, patch):
  grid = _grid(shape)
  tokens, positions = patches.patchify(grid, patch)
  n = (shape[0] // patch[0]) * (shape[1] // patch[1]) * (shape[2] // patch[2])
  assert tokens.shape == (n, np.prod(patch) * shape[3])
  assert positions.shape == (n, 3) and positions.dtype == np.int32
  np.testing.assert_array_equal(patches.unpatchify(tokens, positions, patch, shape), grid)
  np.testing.assert_array_equal(patches.unpatchify(tokens, None, patch, shape), grid)


@pytest.mark.parametrize("shape,patch", SHAPES)
def test_each_token_is_the_patch_at_its_position(shape, patch):
  grid = _grid(shape, seed=1)
  tokens, positions = patches.patchify(grid, patch)
  pt, ph, pw = patch
  for token, (t, h, w) in zip(tokens, positions):
    block = grid[t * pt : (t + 1) * pt, h * ph : (h + 1) * ph, w * pw : (w + 1) * pw]
    np.testing.assert_array_equal(token, block.reshape(-1))
  # Row-major (t, h, w) order covering the patch grid once.
  patch_grid = patches.patch_grid_shape(shape, patch)
  flat = np.ravel_multi_index(tuple(positions.T), patch_grid)
  np.testing.assert_array_equal(flat, np.arange(len(tokens)))


def test_unpatchify_accepts_any_token_order():
  shape, patch = (3, 8, 6, 4), (1, 2, 2)
  grid = _grid(shape, seed=2)
  tokens, positions = patches.patchify(grid, patch)
  order = np.random.default_rng(0).permutation(len(tokens))
  np.testing.assert_array_equal(patches.unpatchify(tokens[order], positions[order], patch, shape), grid)


@pytest.mark.parametrize("shape,patch", SHAPES)
def test_jax_batched_matches_numpy_and_round_trips(shape, patch):
  batch = np.stack([_grid(shape, seed=s) for s in range(3)])
  to_tokens = jax.jit(lambda x: patches.patchify_batch(x, patch))
  tokens = np.asarray(to_tokens(batch))
  for i in range(3):
    np.testing.assert_array_equal(tokens[i], patches.patchify(batch[i], patch)[0])
  back = jax.jit(lambda x: patches.unpatchify_batch(x, patch, shape))(tokens)
  np.testing.assert_array_equal(np.asarray(back), batch)


def test_indivisible_grid_names_shape_and_nearest_sizes():
  with pytest.raises(UsageError, match=r"\(3, 7, 8\).*h=7 -> 6 or 8"):
    patches.patchify(np.zeros((3, 7, 8, 4), np.float32), (1, 2, 2))
  with pytest.raises(UsageError, match=r"t=1 -> 2"):
    patches.patchify(np.zeros((1, 4, 4, 4), np.float32), (2, 2, 2))
  with pytest.raises(UsageError, match="patch_size"):
    patches.patch_grid_shape((2, 4, 4), (1, 2))
