"""Per-slot cross-attention: the packer's slot_tokens, and the DiT's general path giving the
same v, gradients and train-step update with it as with every token against all K x S
caption keys."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidsim import config as config_lib
from vidsim.data import packing
from vidsim.models import flops as flops_lib
from vidsim.models.dit import DiT, patch_features
from vidsim.models.text import tokenize_bytes

K, S, L = 3, 16, 24  # Caption slots per row, bytes per caption, tokens per row.
# Per row: (segment id, start, length). Padding between and after segments; a row with
# one segment; a row whose slot 3 caption is empty (no key: its tokens get 0).
LAYOUT = [[(1, 0, 7), (2, 7, 5), (3, 14, 9)], [(1, 0, 12)], [(1, 0, 3), (2, 3, 10), (3, 13, 11)]]
M = 12  # The largest segment.


@pytest.fixture(scope="module")
def config():
  c = config_lib.load_config(str(pathlib.Path(__file__).parent.parent / "experiments" / "digits_tiny.py"))
  with c.unlocked():
    c.text.max_length = S
  return c


def slot_tokens_of(segment_ids, capacity):
  out = np.full((segment_ids.shape[0], K, capacity), -1, np.int32)
  for r, row in enumerate(segment_ids):
    for k in range(K):
      where = np.flatnonzero(row == k + 1)
      out[r, k, : len(where)] = where
  return out


def packed(config, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(LAYOUT), L), np.int32)
  positions = np.zeros((len(LAYOUT), L, 3), np.int32)
  for i, row in enumerate(LAYOUT):
    for segment, start, length in row:
      ids[i, start : start + length] = segment
      within = np.arange(length)
      positions[i, start : start + length] = np.stack([within // 4, (within % 4) // 2, within % 2], -1)
  text_ids, text_mask = tokenize_bytes(["a red 3 moves right", "a blue 7 falls", "a green 0 moves left"], S)
  text = {"text_tokens": np.broadcast_to(text_ids, (len(LAYOUT), K, S)).copy(),
          "text_mask": np.broadcast_to(text_mask, (len(LAYOUT), K, S)).copy()}
  text["text_mask"][2, 2] = False  # An empty caption.
  return dict(
      x_t=rng.normal(size=(len(LAYOUT), L, patch_features(config))).astype(np.float32),
      t=np.where(ids > 0, rng.uniform(size=ids.shape), 0).astype(np.float32),
      positions=positions, segment_ids=ids, text=text,
      drop_text=np.array([[False, True, False], [False] * K, [True, False, False]]),
  )


def test_layout_rows_writes_each_slots_positions():
  c = config_lib.base_config()
  with c.unlocked():
    c.train.row_tokens, c.train.max_segments_per_row = 10, 3

  def segment(n):
    return {"tokens": np.zeros((n, 4), np.float32), "positions": np.zeros((n, 3), np.int32),
            "segment_frames": np.ones((1,), np.int32), "text_tokens": np.ones((1, 5), np.int32),
            "text_mask": np.ones((1, 5), bool)}

  batch = packing.layout_rows([[segment(3), segment(4)], [segment(5)]], c, capacity=5)
  np.testing.assert_array_equal(batch["slot_tokens"][0], [[0, 1, 2, -1, -1], [3, 4, 5, 6, -1], [-1] * 5])
  np.testing.assert_array_equal(batch["slot_tokens"][1], [[0, 1, 2, 3, 4], [-1] * 5, [-1] * 5])
  assert "slot_tokens" not in packing.layout_rows([[segment(3)]], c)
  with pytest.raises(ValueError, match="exceeds slot capacity 2"):
    packing.layout_rows([[segment(3)]], c, capacity=2)


def test_slot_capacity_only_for_samples_up_to_half_a_row():
  assert packing.slot_capacity(48, 256) == 48
  assert packing.slot_capacity(128, 256) == 128
  assert packing.slot_capacity(129, 256) == 0
  assert packing.slot_capacity(0, 256) == 0


def test_per_slot_cross_attention_equals_all_keys(config):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.dit.attention_impl = "einsum"  # The per-slot path calls attend(), whose backends agree (test_attention.py).
  model = DiT(c.dit, c.text, c.vae.latent_channels, rngs=nnx.Rngs(0))
  # Perturb every param: at init zero gates make each block the identity.
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  batch = packed(c)
  graphdef, params = nnx.split(model)

  def run(slot_tokens):
    def loss(params):
      v = nnx.merge(graphdef, params)(batch["x_t"], batch["t"], batch["positions"], batch["segment_ids"],
                                      batch["text"], batch["drop_text"], slot_tokens=slot_tokens)
      return jnp.sum(jnp.where(jnp.asarray(batch["segment_ids"] > 0)[..., None], jnp.sin(v), 0.0)), v

    (_, v), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(v), grads

  v_all, grads_all = run(None)
  v_slots, grads_slots = run(slot_tokens_of(batch["segment_ids"], M))
  assert np.abs(v_all).max() > 1e-2
  np.testing.assert_allclose(v_slots, v_all, atol=2e-5)  # Every token, padding included.
  relative = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max()
                                          / (np.abs(np.asarray(b)).max() + 1e-6), grads_slots, grads_all))
  assert max(relative) < 1e-4
  # A wider capacity than the largest segment changes nothing; the switch turns it off.
  np.testing.assert_allclose(run(slot_tokens_of(batch["segment_ids"], L))[0], v_all, atol=2e-5)
  with c.unlocked():
    c.dit.per_slot_cross_attention = False
  assert not DiT(c.dit, c.text, c.vae.latent_channels, rngs=nnx.Rngs(0)).per_slot_cross_attention()


def test_train_step_update_is_the_same_with_slot_tokens(config):
  from vidsim import mesh as mesh_lib
  from vidsim.train import stage as stage_lib

  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.train.row_tokens, c.train.rows_per_batch, c.train.max_segments_per_row = L, 8, K
  rows = [LAYOUT[i % len(LAYOUT)] for i in range(8)]  # One row a device.
  ids = np.zeros((8, L), np.int32)
  for i, row in enumerate(rows):
    for segment, start, length in row:
      ids[i, start : start + length] = segment
  rng = np.random.default_rng(0)
  text_ids, text_mask = tokenize_bytes(["a red 3 moves right", "a blue 7 falls", "a green 0 moves left"], S)
  batch = {
      "tokens": rng.normal(size=(8, L, patch_features(c))).astype(np.float32),
      "positions": np.zeros((8, L, 3), np.int32), "segment_ids": ids,
      "segment_frames": np.ones((8, K), np.int32),
      "text_tokens": np.broadcast_to(text_ids, (8, K, S)).copy(), "text_mask": np.broadcast_to(text_mask, (8, K, S)).copy(),
  }
  with_slots = dict(batch, slot_tokens=slot_tokens_of(ids, M))
  mesh = mesh_lib.make_mesh(c)
  results = []
  with mesh_lib.activate(mesh, c):
    stage = stage_lib.assemble(c, mesh, "dit")
    initial = jax.jit(stage.init_state, out_shardings=stage.state_shardings)()
    step = jax.jit(stage.train_step)
    for b in (batch, with_slots):
      state, metrics = step(initial, mesh_lib.make_global_batch(b, mesh, c))
      results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state["params"])))
  (loss_all, params_all), (loss_slots, params_slots) = results
  assert loss_slots == pytest.approx(loss_all, rel=1e-5)
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params_slots, params_all))) < 1e-6
  # The executed count follows: K x M query slots against S keys instead of L x K x S.
  flat, per_slot = (flops_lib.batch_work(c, b, "executed") for b in (batch, with_slots))
  assert flat.cross_pairs == 8 * L * K * S and per_slot.cross_pairs == 8 * K * M * S
