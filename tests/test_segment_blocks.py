"""dit.segment_blocks: rows of aligned segments run as blocks and give the same v and the
same gradients as the general path; batches that are not aligned fall back to it."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidsim import config as config_lib
from vidsim.models.dit import DiT, patch_features, segments_in_blocks
from vidsim.models.text import tokenize_bytes

K, S, L = 3, 16, 24  # Caption slots per row, bytes per caption, tokens per row.


@pytest.fixture(scope="module")
def config():
  c = config_lib.load_config(str(pathlib.Path(__file__).parent.parent / "experiments" / "digits_tiny.py"))
  with c.unlocked():
    c.text.max_length = S
    c.dit.segment_blocks = 2
  return c


@pytest.fixture(scope="module")
def model(config):
  model = DiT(config.dit, config.text, config.vae.latent_channels, rngs=nnx.Rngs(0))
  # Perturb every param: at init zero gates make each block the identity.
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  return model


def packed(config, layout, seed=0):
  """layout: per row, a list of (segment id, start, length); caption k+1 for slot k."""
  rng = np.random.default_rng(seed)
  r = len(layout)
  ids = np.zeros((r, L), np.int32)
  positions = np.zeros((r, L, 3), np.int32)
  for i, row in enumerate(layout):
    for segment, start, length in row:
      ids[i, start : start + length] = segment
      within = np.arange(length)
      positions[i, start : start + length] = np.stack([within // 6, (within % 6) // 3, within % 3], -1)
  captions = ["a red 3 moves right", "a blue 7 falls", "an unused slot"]
  text_ids, text_mask = tokenize_bytes(captions, S)
  return dict(
      x_t=rng.normal(size=(r, L, patch_features(config))).astype(np.float32),
      t=np.where(ids > 0, rng.uniform(size=(r, L)), 0).astype(np.float32),
      positions=positions, segment_ids=ids,
      text={"text_tokens": np.broadcast_to(text_ids, (r, K, S)).copy(),
            "text_mask": np.broadcast_to(text_mask, (r, K, S)).copy()},
      drop_text=np.array([[False, True, False]] + [[False] * K] * (r - 1)),
  )


# Two blocks of 12: a full segment and one with padding; an empty block; a row whose
# segments are in the other order (slot 2 in block 0).
ALIGNED = [[(1, 0, 12), (2, 12, 8)], [(1, 0, 9)], [(2, 0, 12), (1, 12, 12)]]
# A segment across the block boundary; an id in two blocks.
STRADDLING = [[(1, 0, 14), (2, 14, 10)], [(1, 0, 9)], [(2, 0, 12), (1, 12, 12)]]
SPLIT = [[(1, 0, 12), (2, 12, 8)], [(1, 0, 9), (1, 12, 4)], [(2, 0, 12), (1, 12, 12)]]


def args(batch):
  return tuple(batch[k] for k in ("x_t", "t", "positions", "segment_ids", "text", "drop_text"))


def test_alignment_check(config):
  assert bool(segments_in_blocks(jnp.asarray(packed(config, ALIGNED)["segment_ids"]), 2, K))
  for layout in (STRADDLING, SPLIT):
    assert not bool(segments_in_blocks(jnp.asarray(packed(config, layout)["segment_ids"]), 2, K))
  ids = packed(config, ALIGNED)["segment_ids"]
  assert not bool(segments_in_blocks(jnp.asarray(ids), 2, 1))  # Segment 2 has no caption slot.


def loss_and_grads(model, path, batch):
  graphdef, params = nnx.split(model)

  def loss(params):
    m = nnx.merge(graphdef, params)
    v = path(m)(*args(batch))
    real = jnp.asarray(batch["segment_ids"] > 0)[..., None]
    return jnp.sum(jnp.where(real, jnp.sin(v), 0.0)), v

  (value, v), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, np.asarray(v), grads


def test_blocked_path_equals_general_path(config, model):
  batch = packed(config, ALIGNED)
  dense = loss_and_grads(model, lambda m: m._dense, batch)
  blocked = loss_and_grads(model, lambda m: (lambda *a: m._blocked(2, *a)), batch)
  public = loss_and_grads(model, lambda m: m, batch)
  assert np.abs(dense[1]).max() > 1e-2
  for other in (blocked, public):
    np.testing.assert_allclose(other[1], dense[1], atol=2e-5)  # Every token, padding included.
    flat = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max()
                                        / (np.abs(np.asarray(b)).max() + 1e-6), other[2], dense[2]))
    assert max(flat) < 1e-4
  # The null caption reached the cross-attention: with slot 2 not dropped, v changes.
  undropped = dict(batch, drop_text=np.zeros_like(batch["drop_text"]))
  assert np.abs(loss_and_grads(model, lambda m: m, undropped)[1][0, 12:20] - public[1][0, 12:20]).max() > 1e-4


def test_batches_that_do_not_align_take_the_general_path(config, model):
  for layout in (STRADDLING, SPLIT):
    batch = packed(config, layout, seed=2)
    np.testing.assert_allclose(loss_and_grads(model, lambda m: m, batch)[1],
                               loss_and_grads(model, lambda m: m._dense, batch)[1], atol=1e-6)


def test_train_step_takes_either_path_with_the_general_paths_update(config):
  """The train step picks the path around the gradient (a lax.cond over both
  value_and_grads): an aligned batch and one that is not both give the update of a step
  with dit.segment_blocks off."""
  from vidsim import bench
  from vidsim import mesh as mesh_lib
  from vidsim.train import stage as stage_lib

  def with_blocks(blocks):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.dit.segment_blocks = blocks
      c.train.row_tokens, c.train.rows_per_batch = 32, 8  # One row a device.
    return c

  def steps(blocks, batches):
    """(loss, params) after one step from the same initial state, for each batch."""
    c = with_blocks(blocks)
    mesh = mesh_lib.make_mesh(c)
    with mesh_lib.activate(mesh, c):
      stage = stage_lib.assemble(c, mesh, "dit")
      initial = jax.jit(stage.init_state, out_shardings=stage.state_shardings)()
      step = jax.jit(stage.train_step)
      results = []
      for batch in batches:
        state, metrics = step(initial, mesh_lib.make_global_batch(batch, mesh, c))
        results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state["params"])))
    return results

  aligned = bench.synthetic_packed_batch(with_blocks(2))
  straddling = dict(aligned, segment_ids=np.concatenate(
      [np.full((8, 20), 1), np.full((8, 12), 2)], axis=1).astype(np.int32))
  slots = aligned["segment_frames"].shape[1]
  assert segments_in_blocks(aligned["segment_ids"], 2, slots)
  assert not segments_in_blocks(straddling["segment_ids"], 2, slots)
  for (loss_off, params_off), (loss_on, params_on) in zip(steps(0, [aligned, straddling]),
                                                          steps(2, [aligned, straddling])):
    assert loss_on == pytest.approx(loss_off, rel=1e-5)
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params_on, params_off)))
    assert worst < 1e-6
